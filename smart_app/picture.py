"""The SMART app's patient REMS page, as data: who the patient is, and per IMiD the REMS status, the risk
category, the authorization number, the open findings for the next fill and a timeline of pregnancy tests
and fills (with an inline SVG drawing of it and the same events as a text table). Pure: the chart is
already fetched and parsed (`cds_hooks.refills.load_chart`); the web routes and templates live elsewhere.

**Open findings for the next fill.** For each drug (`rems.status.rems_status`, same order), the checks the
pharmacist would see (`cds_hooks.refills.precheck`) on what the pharmacy will dispense next:

- the drug's active order itself, when it is not dispensed yet and was written on or after the newest fill
  (or there is no fill at all): the same test `plan_patient` uses to say "it is the next fill". It is judged
  the way order-sign judges a new prescription: against the chart *without itself*, so its own supply is not
  counted as supply on hand (`rems_status` counts an undispensed order from its start, which would make the
  order an "early refill" of itself). The status the page shows for that drug carries the same supply facts
  (`DrugPicture.status`);
- otherwise (the active order has been filled, or the drug's order is completed) the drafted next 28-day
  prescription (`cds_hooks.refills.draft_prescription`), as the refill scan drafts it.

The checks split into `DrugPicture.passed` (the review areas where nothing fired: ``check-*``) and
`DrugPicture.findings` (everything else: rule findings, the supply and pregnancy-test-plan facts, data that
could not be read), blocking first, then critical, warning, info.

**The timeline** counts days in the clinic's zone, like the rules: a negative test collected on day D allows
a dispense through D + `test_valid_days` (7); a fill handed over on day D for N days runs out on D + N.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from html import escape
from typing import Any, Final, Literal

from cds_hooks.refill_store import Check
from cds_hooks.refills import AREAS, Loaded, draft_prescription, precheck
from fhir_mappings.resources import ResourceIndex
from rems.config import Config
from rems.derive import view_order
from rems.findings import RuleCode
from rems.model import Dispense, ImidOrder, PregnancyState, PregnancyTest, TestResult
from rems.status import CategorySource, RemsStatus, rems_status
from rems.timing import earliest_instant, local_day, supply_runs_out, test_good_through

DRAFTED_NEXT: Final = "drafted next prescription"
"""`DrugPicture.next_fill_order` when the findings were computed on the drafted next prescription."""
NO_NAME: Final = "(no name)"
AUTHORIZATION_ON_ORDER: Final = "on the order"
AUTHORIZATION_MISSING: Final = "missing: the pharmacy cannot dispense without it"
NEXT_NEEDS_NUMBER: Final = (
    "the next prescription needs its own new authorization number from the REMS (entered when it is written or "
    "approved)"
)
MAX_DAYS_AHEAD: Final = 60
"""The timeline never runs more than this many days past today."""
MARGIN_DAYS: Final = 7
"""Days drawn after the last thing the timeline shows."""

PASSED_CODES: Final = frozenset(code for code, _, _ in AREAS)
_SEVERITY_RANK: Final = {"critical": 0, "warning": 1, "info": 2}

TestKind = Literal["negative", "positive", "missing", "overdue", "other"]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthorizationStatus:
    """The REMS authorization number of the order the status is read from."""

    present: bool
    number: str | None
    on_order: str
    """Reference of that order (``MedicationRequest/...``)."""
    note: str
    """In words: `AUTHORIZATION_ON_ORDER` or `AUTHORIZATION_MISSING`."""
    next_prescription: str | None = None
    """When the findings are about the drafted next prescription: that it needs its own new number
    (`NEXT_NEEDS_NUMBER`). The drafted prescription never carries one, so its ``authorization-missing`` hard
    stop is a to-do for the next prescription, said here once, instead of a finding about the chart repeated on
    every patient's page."""


@dataclass(frozen=True, slots=True)
class TestMark:
    """One mark in the pregnancy-test lane."""

    day: date
    """Clinic-local day collected (missing: the dispense day; overdue: the day the test was due)."""
    kind: TestKind
    """``negative`` / ``positive`` (a test, or a "pregnant" pregnancy status); ``other``: a result that could
    not be read, or a preliminary one the rules do not count; ``missing``: a dispense no valid negative test
    covered; ``overdue``: the next scheduled test is past due and none is on file since."""
    reference: str | None
    """The record (None for missing / overdue)."""
    text: str
    window_end: date | None
    """Negative tests: the last day the test allows a dispense. None otherwise."""


@dataclass(frozen=True, slots=True)
class FillMark:
    """One dispense in the fills lane (may start before `Timeline.start`: draw it clipped)."""

    day: date
    """Clinic-local day handed over."""
    days_supply: Decimal | None
    runs_out: date | None
    """First day without medication; None when the dispense states no days' supply."""
    reference: str


@dataclass(frozen=True, slots=True)
class Timeline:
    """Pregnancy tests and fills of one drug from `start` to `end` (clinic-local days, inclusive)."""

    start: date
    end: date
    today: date
    tests: tuple[TestMark, ...]
    """By day."""
    fills: tuple[FillMark, ...]
    """By day."""
    next_test_due: date | None
    next_fill_from: date | None
    runs_out: date | None
    tests_required: bool


@dataclass(frozen=True, slots=True)
class TimelineRow:
    """One timeline event as a table row (the page's text alternative to the drawing)."""

    day: date
    lane: str
    """``Pregnancy tests``, ``Fills`` or ``Plan`` (today, next test, next fill, supply runs out)."""
    what: str
    reference: str | None


@dataclass(frozen=True, slots=True)
class DrugPicture:
    """Everything the page shows for one IMiD."""

    drug: str
    status: RemsStatus
    """The drug's status (`rems_status`). When the next fill is an order not dispensed yet, the supply facts
    (``days_left``, ``runs_out``, ``next_fill_from``, ``supply_source``, ``supply_how``,
    ``valid_test_on_next_fill``) are those of the supply on hand without that order (see the module
    docstring)."""
    category_label: str
    """`RiskCategory.display`, or ``Unknown``."""
    category_source: CategorySource
    category_basis: str
    authorization: AuthorizationStatus
    findings: tuple[Check, ...]
    """Open findings for the next fill: blocking first, then critical, warning, info."""
    passed: tuple[Check, ...]
    """Review areas where nothing fired (``check-*``, info)."""
    next_fill_order: str
    """`DRAFTED_NEXT`, or the reference of the not-yet-dispensed order the findings were computed on."""
    timeline: Timeline


@dataclass(frozen=True, slots=True)
class PatientPicture:
    patient_id: str
    name: str
    birth_date: str | None
    gender: str | None
    today: date
    """Clinic-local."""
    drugs: tuple[DrugPicture, ...]
    """One per `RemsStatus`, in the same order; empty when the patient is on no IMiD."""
    problems: tuple[str, ...]
    """Chart records that could not be read, in words."""


# ------------------------------------------------------------------------------------------------
# The picture
# ------------------------------------------------------------------------------------------------


def patient_picture(loaded: Loaded, *, now: datetime, zone: tzinfo, config: Config, months: int = 6) -> PatientPicture:
    """The patient REMS page of `loaded` (parsed with the same `now`, `zone` and `config`), with timelines
    covering the last `months` months. Raises `InvalidInput` only if a drafted prescription cannot be read
    (never for a chart `load_chart` accepted)."""
    today = local_day(now, zone)
    patient = loaded.patient
    patient_id = str(patient.get("id") or "")
    chart = loaded.case.chart
    drugs = tuple(
        _drug_picture(loaded, status, patient_id, now=now, zone=zone, config=config, months=months)
        for status in rems_status(loaded.case, config)
    )
    problems = (
        *chart.unreadable,
        *(f"pregnancy test with no usable date: {text}" for text in chart.unreadable_pregnancy_tests),
    )
    return PatientPicture(
        patient_id=patient_id,
        name=patient_name(patient),
        birth_date=_str_or_none(patient.get("birthDate")),
        gender=_str_or_none(patient.get("gender")),
        today=today,
        drugs=drugs,
        problems=tuple(problems),
    )


def patient_name(patient: Mapping[str, Any]) -> str:
    """Display name from ``Patient.name``: the official (else usual, else first current) name's ``text``,
    else its given names and family name; `NO_NAME` when there is none."""
    raw = patient.get("name")
    names = [n for n in raw if isinstance(n, dict)] if isinstance(raw, list) else []
    rank = {"official": 0, "usual": 1, None: 2, "old": 4}
    for name in sorted(names, key=lambda n: rank.get(n.get("use"), 3)):
        text = name.get("text")
        if isinstance(text, str) and text.strip():
            return text.strip()
        given = name.get("given")
        parts = [g.strip() for g in given if isinstance(g, str) and g.strip()] if isinstance(given, list) else []
        family = name.get("family")
        if isinstance(family, str) and family.strip():
            parts.append(family.strip())
        if parts:
            return " ".join(parts)
    return NO_NAME


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _drug_picture(
    loaded: Loaded, status: RemsStatus, patient_id: str, *, now: datetime, zone: tzinfo, config: Config, months: int
) -> DrugPicture:
    chart = loaded.case.chart
    order = next(o for o in chart.imid_orders if o.reference == status.order)
    raw = loaded.index.by_ref[order.reference]
    if _is_next_fill(order, status, chart.dispenses):
        status = _supply_without(loaded, status, order, config)
        checks, _ = precheck(_chart_without(loaded, raw), raw, status, now=now, zone=zone, config=config)
        next_fill_order = order.reference
    else:
        draft = draft_prescription(order, raw, patient_id, config)
        checks, _ = precheck(loaded, draft, status, now=now, zone=zone, config=config)
        next_fill_order = DRAFTED_NEXT
    passed = tuple(c for c in checks if c.code in PASSED_CODES)
    drafted = next_fill_order == DRAFTED_NEXT
    findings = tuple(
        sorted(
            (c for c in checks if c.code not in PASSED_CODES and not (drafted and c.code == _AUTHORIZATION_MISSING)),
            key=lambda c: (not c.blocking, _SEVERITY_RANK[c.severity]),
        )
    )
    number = status.authorization_number
    return DrugPicture(
        drug=status.drug.value,
        status=status,
        category_label=status.risk_category.display if status.risk_category is not None else "Unknown",
        category_source=status.category_source,
        category_basis=status.category_basis,
        authorization=AuthorizationStatus(
            present=number is not None,
            number=number,
            on_order=status.order,
            note=AUTHORIZATION_ON_ORDER if number is not None else AUTHORIZATION_MISSING,
            next_prescription=NEXT_NEEDS_NUMBER if drafted else None,
        ),
        findings=findings,
        passed=passed,
        next_fill_order=next_fill_order,
        timeline=drug_timeline(loaded, status, now=now, zone=zone, config=config, months=months),
    )


_AUTHORIZATION_MISSING: Final = RuleCode.AUTHORIZATION_MISSING.value


def _is_next_fill(order: ImidOrder, status: RemsStatus, dispenses: Iterable[Dispense]) -> bool:
    """An active order not dispensed yet, written on or after the newest fill (or with no fill on file)."""
    if order.status != "active" or any(d.prescription == order.reference for d in dispenses):
        return False
    fill = status.last_fill
    return fill is None or (order.start is not None and order.start >= fill.day)


def _chart_without(loaded: Loaded, resource: Mapping[str, Any]) -> Loaded:
    """The chart without `resource` (matched by identity), as order-sign sees a prescription not yet saved."""
    index = ResourceIndex()
    for resources in loaded.index.by_type.values():
        for r in resources:
            if r is not resource:
                index.add(r, loaded.index.paths[id(r)])
    return dataclasses.replace(loaded, index=index)


def _supply_without(loaded: Loaded, status: RemsStatus, order: ImidOrder, config: Config) -> RemsStatus:
    """`status` with the supply on hand not counting `order` itself (an order never supplies its own fill)."""
    view = view_order(loaded.case, config, order)  # current_supply skips the order it is asked about
    window = view.supply_window
    next_fill = view.first_dispense_day
    valid_on_next: bool | None = None
    if status.pregnancy_tests_required:
        good = status.negative_good_through
        valid_on_next = status.positive_since_negative is None and good is not None and good >= next_fill
    if window is None:
        return dataclasses.replace(
            status,
            supply_source=None,
            supply_how=f"no earlier supply of {order.drug.value} on file: {order.reference} is the first fill",
            days_left=None,
            runs_out=None,
            next_fill_from=next_fill,
            valid_test_on_next_fill=valid_on_next,
        )
    return dataclasses.replace(
        status,
        supply_source=window.source,
        supply_how=window.how,
        days_left=window.days_left(status.today, config.rems.max_supply_days),
        runs_out=window.runs_out,
        next_fill_from=next_fill,
        valid_test_on_next_fill=valid_on_next,
    )


# ------------------------------------------------------------------------------------------------
# The timeline
# ------------------------------------------------------------------------------------------------


def drug_timeline(
    loaded: Loaded, status: RemsStatus, *, now: datetime, zone: tzinfo, config: Config, months: int = 6
) -> Timeline:
    """Pregnancy tests and fills of `status.drug` over the last `months` months (module docstring)."""
    chart = loaded.case.chart
    today = local_day(now, zone)
    start = today - timedelta(days=round(months * 365.25 / 12))
    valid_days = config.rems.test_valid_days

    def counted(t: PregnancyTest) -> bool:
        return config.rems.count_preliminary_tests or not t.preliminary

    on_file = [t for t in chart.pregnancy_tests if earliest_instant(t.collected, zone) <= now]
    pregnant = [
        s
        for s in chart.pregnancy_statuses
        if s.state is PregnancyState.PREGNANT and earliest_instant(s.when, zone) <= now
    ]
    marks: list[TestMark] = []
    for t in on_file:
        day = local_day(t.collected, zone)
        if not start <= day <= today:
            continue
        if not counted(t):
            marks.append(TestMark(day, "other", t.reference, f"{t.result_text} (preliminary: not counted)", None))
        elif t.result is TestResult.NEGATIVE:
            end = test_good_through(t.collected, zone, valid_days)
            marks.append(TestMark(day, "negative", t.reference, t.result_text, end))
        elif t.result is TestResult.POSITIVE:
            marks.append(TestMark(day, "positive", t.reference, t.result_text, None))
        else:
            marks.append(TestMark(day, "other", t.reference, f"could not be read: {t.result_text}", None))
    for s in pregnant:
        day = local_day(s.when, zone)
        if start <= day <= today:
            marks.append(TestMark(day, "positive", s.reference, "pregnancy status: pregnant", None))

    fills: list[FillMark] = []
    dispenses: list[Dispense] = []
    for d in chart.dispenses:
        day = local_day(d.handed_over, zone)
        if d.drug is not status.drug or not start - timedelta(days=28) <= day <= today:
            continue
        runs_out = supply_runs_out(day, d.days_supply) if d.days_supply is not None else None
        if (runs_out > start) if runs_out is not None else (day >= start):
            fills.append(FillMark(day, d.days_supply, runs_out, d.reference))
            dispenses.append(d)

    required = status.pregnancy_tests_required
    if required:
        negatives = [t for t in on_file if counted(t) and t.result is TestResult.NEGATIVE]
        positives = [t.collected for t in on_file if counted(t) and t.result is TestResult.POSITIVE]
        positives.extend(s.when for s in pregnant)
        for d in dispenses:
            day = local_day(d.handed_over, zone)
            if day >= start and not _covered(d, negatives, positives, zone, valid_days):
                marks.append(TestMark(day, "missing", None, "no valid negative test at this dispense", None))
        due = status.next_test_due
        results = [t for t in on_file if counted(t) and t.result is not TestResult.UNREADABLE]
        if due is not None and due < today and not any(local_day(t.collected, zone) >= due for t in results):
            marks.append(TestMark(due, "overdue", None, f"test due {due.isoformat()} not on file", None))

    kind_order = {"positive": 0, "negative": 1, "other": 2, "missing": 3, "overdue": 4}
    marks.sort(key=lambda m: (m.day, kind_order[m.kind], m.reference or ""))
    fills.sort(key=lambda f: (f.day, f.reference))
    ends = [today, *(m.window_end for m in marks if m.window_end is not None)]
    ends.extend(d for d in (status.next_fill_from, status.next_test_due) if d is not None)
    end = min(max(ends) + timedelta(days=MARGIN_DAYS), today + timedelta(days=MAX_DAYS_AHEAD))
    return Timeline(
        start=start,
        end=end,
        today=today,
        tests=tuple(marks),
        fills=tuple(fills),
        next_test_due=status.next_test_due,
        next_fill_from=status.next_fill_from,
        runs_out=status.runs_out,
        tests_required=required,
    )


def _not_after(earlier: datetime | date, later: datetime | date, zone: tzinfo) -> bool:
    """`earlier` is no later than `later`: by clock time when both have one, else by clinic-local day."""
    if isinstance(earlier, datetime) and isinstance(later, datetime):
        return earliest_instant(earlier, zone) <= earliest_instant(later, zone)
    return local_day(earlier, zone) <= local_day(later, zone)


def _covered(
    fill: Dispense,
    negatives: Iterable[PregnancyTest],
    positives: Iterable[datetime | date],
    zone: tzinfo,
    valid_days: int,
) -> bool:
    """A negative test taken before the dispense was still good on its day, with nothing positive between."""
    day = local_day(fill.handed_over, zone)
    for n in negatives:
        if not (
            test_good_through(n.collected, zone, valid_days) >= day and _not_after(n.collected, fill.handed_over, zone)
        ):
            continue
        taken = earliest_instant(n.collected, zone)
        if any(earliest_instant(p, zone) > taken and _not_after(p, fill.handed_over, zone) for p in positives):
            continue
        return True
    return False


_LANE_TESTS: Final = "Pregnancy tests"
_LANE_FILLS: Final = "Fills"
_LANE_PLAN: Final = "Plan"


def timeline_rows(timeline: Timeline) -> list[TimelineRow]:
    """The timeline's events as a chronological table (the drawing's text alternative)."""
    rows: list[tuple[int, TimelineRow]] = []
    for m in timeline.tests:
        if m.kind == "negative":
            what = f"Negative pregnancy test ({m.text})"
            if m.window_end is not None:
                what += f": allows a dispense through {m.window_end.isoformat()}"
        elif m.kind == "positive":
            what = f"Positive pregnancy test: {m.text}"
        elif m.kind == "missing":
            what = "Dispensed with no valid negative pregnancy test"
        elif m.kind == "overdue":
            what = f"Pregnancy test due {m.day.isoformat()}: not on file"
        else:
            what = f"Pregnancy test not counted: {m.text}"
        rows.append((0, TimelineRow(m.day, _LANE_TESTS, what, m.reference)))
    for f in timeline.fills:
        what = f"Dispensed {_days(f.days_supply)}"
        what += f", runs out {f.runs_out.isoformat()}" if f.runs_out else " (days' supply not stated)"
        rows.append((1, TimelineRow(f.day, _LANE_FILLS, what, f.reference)))
    rows.append((2, TimelineRow(timeline.today, _LANE_PLAN, "Today", None)))
    if timeline.next_test_due is not None:
        rows.append((2, TimelineRow(timeline.next_test_due, _LANE_PLAN, "Next pregnancy test due", None)))
    if timeline.next_fill_from is not None:
        rows.append((2, TimelineRow(timeline.next_fill_from, _LANE_PLAN, "Next fill possible from", None)))
    if timeline.runs_out is not None:
        rows.append((2, TimelineRow(timeline.runs_out, _LANE_PLAN, "Current supply runs out", None)))
    rows.sort(key=lambda r: (r[1].day, r[0]))
    return [row for _, row in rows]


def _days(supply: Decimal | None) -> str:
    if supply is None:
        return "unknown days' supply"
    return f"{supply.normalize():f} days' supply"


# ------------------------------------------------------------------------------------------------
# The drawing
# ------------------------------------------------------------------------------------------------

_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LABEL_W: Final = 100
_PAD_R: Final = 14
_TOP_LINE: Final = 38
_TEST_Y: Final = 56
_FILL_Y: Final = (76, 92)
_FILL_H: Final = 12
_STAGGER: Final = (0, -9, 9)
_AXIS_Y: Final = 114
_HEIGHT: Final = 136

_NEGATIVE: Final = "#2e7d32"
_POSITIVE: Final = "#c62828"
_MISSING: Final = "#e65100"
_OTHER: Final = "#616161"
_FILL: Final = "#1565c0"
_NEXT_TEST: Final = "#6a1b9a"


def _el(tag: str, attrs: Mapping[str, object], *children: str) -> str:
    attr = "".join(f' {k}="{escape(str(v), quote=True)}"' for k, v in attrs.items())
    if not children:
        return f"<{tag}{attr}/>"
    return f"<{tag}{attr}>{''.join(children)}</{tag}>"


def _text(attrs: Mapping[str, object], text: str) -> str:
    return _el("text", attrs, escape(text, quote=True))


def _title(text: str) -> str:
    return _el("title", {}, escape(text, quote=True))


def _num(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def timeline_svg(
    timeline: Timeline, *, width: int = 720, label: str | None = None, id_prefix: str | None = None
) -> str:
    """The timeline as a self-contained inline SVG (scales to its container: ``width="100%"`` and a viewBox
    `width` units wide). `label` (e.g. patient and drug) starts the title; `id_prefix` makes the ids of the
    title and description unique on the page (default: derived from the timeline). All text is escaped."""
    width = max(width, 320)
    x0, x1 = _LABEL_W, width - _PAD_R
    span = max((timeline.end - timeline.start).days + 1, 1)
    day_w = (x1 - x0) / span

    def left(day: date) -> float:
        return min(max(x0 + (day - timeline.start).days * day_w, x0), x1)

    def mid(day: date) -> float:
        return min(max(x0 + ((day - timeline.start).days + 0.5) * day_w, x0), x1)

    def anchor(x: float) -> str:
        return "start" if x < x0 + 30 else "end" if x > x1 - 30 else "middle"

    prefix = id_prefix or f"tl-{zlib.crc32(repr(timeline).encode()):08x}"
    title_id, desc_id = f"{prefix}-title", f"{prefix}-desc"
    title = f"Pregnancy tests and fills, {timeline.start.isoformat()} to {timeline.end.isoformat()}"
    if label:
        title = f"{label}: {title}"

    parts: list[str] = [
        _el("title", {"id": title_id}, escape(title, quote=True)),
        _el("desc", {"id": desc_id}, escape(_summary(timeline), quote=True)),
    ]
    parts.append(_axis(timeline, x0, x1, left))
    lane_font = {"font-size": 11, "fill": "#212121"}
    parts.append(_text({"class": "tl-lane", "x": 4, "y": _TEST_Y + 4, **lane_font}, _LANE_TESTS))
    parts.append(_text({"class": "tl-lane", "x": 4, "y": _FILL_Y[0] + _FILL_H + 2, **lane_font}, _LANE_FILLS))

    # Validity windows under the markers.
    for m in timeline.tests:
        if m.kind == "negative" and m.window_end is not None and m.window_end >= timeline.start:
            x, end = left(m.day), left(m.window_end + timedelta(days=1))
            parts.append(
                _el(
                    "rect",
                    {
                        "class": "tl-window",
                        "data-from": m.day.isoformat(),
                        "data-to": m.window_end.isoformat(),
                        "x": _num(x),
                        "y": _TEST_Y - 6,
                        "width": _num(max(end - x, 1)),
                        "height": 12,
                        "fill": _NEGATIVE,
                        "fill-opacity": "0.18",
                    },
                    _title(f"{m.day.isoformat()} test allows a dispense through {m.window_end.isoformat()}"),
                )
            )
    parts.extend(_fill_marks(timeline, left, x1))
    # Guide lines under the test markers: (class, kind, day, label, tooltip, colour, dash, label y).
    lines = [
        ("tl-today", "today", timeline.today, "Today", "Today", "#000000", None, 11),
        (
            "tl-next-test",
            "next-test",
            timeline.next_test_due,
            "Next test",
            "Next pregnancy test due",
            _NEXT_TEST,
            "4 3",
            22,
        ),
        (
            "tl-next-fill",
            "next-fill",
            timeline.next_fill_from,
            "Next fill",
            "Next fill possible from",
            _FILL,
            "4 3",
            33,
        ),
    ]
    for cls, kind, day, name, tip, colour, dash, label_y in lines:
        if day is None:
            continue
        x = mid(day)
        line: dict[str, object] = {
            "x1": _num(x),
            "x2": _num(x),
            "y1": _TOP_LINE,
            "y2": _AXIS_Y,
            "stroke": colour,
            "stroke-width": 1.5,
        }
        if dash:
            line["stroke-dasharray"] = dash
        parts.append(
            _el(
                "g",
                {"class": cls, "data-kind": kind, "data-day": day.isoformat()},
                _title(f"{tip} {day.isoformat()}"),
                _el("line", line),
                _text(
                    {"x": _num(x), "y": label_y, "text-anchor": anchor(x), "font-size": 10, "fill": colour},
                    f"{name} {day.strftime('%m-%d')}",
                ),
            )
        )
    previous, level = float("-inf"), 0
    for m in timeline.tests:  # by day: marks closer than a marker's width are staggered up and down
        x = mid(m.day)
        level = (level + 1) % len(_STAGGER) if x - previous < 11 else 0
        previous = x
        parts.append(_test_mark(m, x, _TEST_Y + _STAGGER[level]))

    root = {
        "xmlns": "http://www.w3.org/2000/svg",
        "class": "tl",
        "viewBox": f"0 0 {width} {_HEIGHT}",
        "width": "100%",
        "preserveAspectRatio": "xMinYMin meet",
        "role": "img",
        "aria-labelledby": f"{title_id} {desc_id}",
        "font-family": "system-ui, sans-serif",
    }
    return _el("svg", root, *parts)


def _summary(timeline: Timeline) -> str:
    count: dict[str, int] = {}
    for m in timeline.tests:
        count[m.kind] = count.get(m.kind, 0) + 1
    tests = [f"{count.get('negative', 0)} negative", f"{count.get('positive', 0)} positive"]
    tests.extend(f"{count[k]} {k}" for k in ("missing", "overdue", "other") if count.get(k))
    fills = len(timeline.fills)
    out = (
        f"Pregnancy tests and fills, {timeline.start.isoformat()} to {timeline.end.isoformat()}: "
        f"{', '.join(tests)}; {fills} fill{'' if fills == 1 else 's'}"
    )
    if not timeline.tests_required:
        out += "; pregnancy tests not required"
    elif timeline.next_test_due is not None:
        out += f"; next test due {timeline.next_test_due.isoformat()}"
    if timeline.next_fill_from is not None:
        out += f"; next fill from {timeline.next_fill_from.isoformat()}"
    if timeline.runs_out is not None:
        out += f"; supply runs out {timeline.runs_out.isoformat()}"
    return out + "."


def _axis(timeline: Timeline, x0: float, x1: float, left: Callable[[date], float]) -> str:
    parts = [_el("line", {"x1": x0, "x2": x1, "y1": _AXIS_Y, "y2": _AXIS_Y, "stroke": "#757575"})]
    first = True
    month = date(timeline.start.year, timeline.start.month, 1)
    while month <= timeline.end:
        if month >= timeline.start:
            x = left(month)
            parts.append(
                _el("line", {"x1": _num(x), "x2": _num(x), "y1": _AXIS_Y, "y2": _AXIS_Y + 5, "stroke": "#757575"})
            )
            name = _MONTHS[month.month - 1]
            if first or month.month == 1:
                name += f" {month.year}"
            if x < x1 - 16:
                parts.append(_text({"x": _num(x + 2), "y": _AXIS_Y + 16, "font-size": 10, "fill": "#424242"}, name))
            first = False
        month = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return _el("g", {"class": "tl-axis", "aria-hidden": "true"}, *parts)


def _test_mark(m: TestMark, x: float, y: float) -> str:
    tip = _title(f"{m.day.isoformat()}: {m.text}" + (f" ({m.reference})" if m.reference else ""))
    attrs: dict[str, object] = {"data-kind": m.kind, "data-day": m.day.isoformat()}
    if m.kind == "negative":
        shape = _el("circle", {"cx": _num(x), "cy": y, "r": 5, "fill": _NEGATIVE, "stroke": "#ffffff"})
        return _el("g", {"class": "tl-mark tl-negative", **attrs}, tip, shape)
    if m.kind == "positive":
        points = f"{_num(x)},{y - 7} {_num(x + 7)},{y} {_num(x)},{y + 7} {_num(x - 7)},{y}"
        shape = _el("polygon", {"points": points, "fill": _POSITIVE, "stroke": "#ffffff"})
        return _el("g", {"class": "tl-mark tl-positive", **attrs}, tip, shape)
    if m.kind in ("missing", "overdue"):
        ring = _el(
            "circle",
            {
                "cx": _num(x),
                "cy": y,
                "r": 6,
                "fill": "#ffffff",
                "stroke": _MISSING,
                "stroke-width": 1.5,
                "stroke-dasharray": "2 2",
            },
        )
        bang = _text(
            {
                "x": _num(x),
                "y": y + 3.5,
                "text-anchor": "middle",
                "font-size": 9,
                "font-weight": "bold",
                "fill": _MISSING,
            },
            "!",
        )
        cls = "tl-mark tl-missing" + (" tl-overdue" if m.kind == "overdue" else "")
        return _el("g", {"class": cls, **attrs}, tip, ring, bang)
    square = _el(
        "rect",
        {"x": _num(x - 4.5), "y": y - 4.5, "width": 9, "height": 9, "fill": "#ffffff", "stroke": _OTHER},
    )
    mark = _text({"x": _num(x), "y": y + 3, "text-anchor": "middle", "font-size": 8, "fill": _OTHER}, "?")
    return _el("g", {"class": "tl-mark tl-other", **attrs}, tip, square, mark)


def _fill_marks(timeline: Timeline, left: Callable[[date], float], x1: float) -> list[str]:
    out: list[str] = []
    row_ends = [date.min] * len(_FILL_Y)
    for f in timeline.fills:
        until = f.runs_out or f.day + timedelta(days=1)
        row = next(
            (i for i, e in enumerate(row_ends) if e <= f.day), min(range(len(row_ends)), key=row_ends.__getitem__)
        )
        row_ends[row] = until
        x = left(f.day)
        end = min(left(until), x1) if f.runs_out else x + 4
        y = _FILL_Y[row]
        days = f"{f.days_supply.normalize():f}d" if f.days_supply is not None else "?d"
        tip = f"{f.day.isoformat()}: dispensed {_days(f.days_supply)}"
        tip += f", runs out {f.runs_out.isoformat()}" if f.runs_out else ""
        children = [
            _title(f"{tip} ({f.reference})"),
            _el(
                "rect",
                {
                    "x": _num(x),
                    "y": y,
                    "width": _num(max(end - x, 2)),
                    "height": _FILL_H,
                    "fill": _FILL,
                    "fill-opacity": "0.3",
                    "stroke": _FILL,
                },
            ),
        ]
        if end - x >= 22:
            children.append(_text({"x": _num(x + 3), "y": y + _FILL_H - 3, "font-size": 9, "fill": "#0d47a1"}, days))
        out.append(
            _el("g", {"class": "tl-mark tl-fill", "data-kind": "fill", "data-day": f.day.isoformat()}, *children)
        )
    return out
