"""The REMS status of a patient on an IMiD: what the patient-view card shows.

`rems_status(case)` summarises, for each IMiD the patient has an *active* order of in the chart, where
the patient stands with the REMS right now: risk category and where it came from, whether pregnancy
tests are required, the newest negative test and the last day it still allows a dispense, a positive
result since, the next test due, the last fill, days of supply left, the earliest next fill day and
whether the order carries an authorization number.

Decisions:

- **One status per drug, not per order.** Tests, supply and the early-refill date belong to the drug
  the patient takes, not to a prescription; two active orders of one drug (a renewal signed while the
  last one is still active) would otherwise repeat the same facts twice. The status speaks for the
  newest active order of the drug (by authoredOn, else start); the others are listed in
  `other_orders` and named in `problems`. Two *different* IMiDs give two statuses.
- **Only active orders.** `case.chart.imid_orders` with status ``active``; a patient with none gets no
  status (the service shows no card). The orders under review (`case.orders`) are not summarised: the
  status describes the chart, and order-sign judges the drafts.
- **The same arithmetic as the rules.** Each status is computed from `rems.derive.view_order` for the
  drug, so the clinic-local day, usable tests, reproductive status, supply window and first dispense
  day are exactly those the order-sign rules use. The supply is the one a *new* order of the drug
  would see (`current_supply`), which includes the status order itself when no dispense refers to it:
  an active order with no dispense on file is counted from its start (DECISIONS "Supply").
- **Nothing silently dropped.** What could not be determined (unknown sex or birth date, an
  unrecognised category, unreadable, undated, preliminary or future-dated pregnancy tests, an unknown
  days' supply, records the mappings could not use) is a short line in `problems`. An unknown
  reproductive status is shown as such and pregnancy tests count as required (the safety default).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from rems.config import Config, default_config
from rems.derive import OrderView, Reproductive, suggested_category, therapy_start, view_order
from rems.model import (
    Case,
    Drug,
    ImidOrder,
    PregnancyState,
    PregnancyTest,
    RiskCategory,
    Sex,
    TestResult,
)
from rems.timing import earliest_instant, local_day, next_test_due, test_good_through

_STATUS_PROBE = "#rems-status"
"""Suffix of the reference given to the order when its view is built, so `current_supply` (which skips
the order under review) counts the order's own supply like any other order in effect."""


class CategorySource(enum.StrEnum):
    """Where the risk category shown came from."""

    ORDER = "order"
    """Documented on the order (extension, supportingInformation or note): what the REMS authorized."""
    SUGGESTED = "suggested"
    """Not on the order; the chart settles it (sex and age, or documented evidence she cannot get
    pregnant). Shown as a suggestion, never as the authorized category."""
    UNKNOWN = "unknown"
    """Neither the order nor the chart settles it."""


@dataclass(frozen=True)
class PregnancyRecord:
    """A pregnancy test or a pregnancy-status record, as the card names it."""

    reference: str
    day: date
    """Clinic-local day it was collected / recorded."""
    text: str
    """The result as the record put it (``Negative``, ``POSITIVE``) or ``pregnancy status: pregnant``."""


@dataclass(frozen=True)
class Fill:
    """The newest dispense of the drug."""

    reference: str
    day: date
    """Clinic-local day it was handed over."""
    days_supply: Decimal | None


@dataclass(frozen=True)
class RemsStatus:
    """Where one patient stands with the REMS for one IMiD, on `today` (clinic-local)."""

    drug: Drug
    order: str
    """The newest active order of the drug: the one the category and authorization are read from."""
    other_orders: tuple[str, ...]
    """Other active orders of the same drug (normally none)."""
    today: date
    risk_category: RiskCategory | None
    category_source: CategorySource
    category_basis: str
    """In words: the element it was read from, or the chart facts that suggest it, or why unknown."""
    pregnancy_tests_required: bool
    """True for a category that can get pregnant, and when nothing settles it (safety default)."""
    last_negative_test: PregnancyRecord | None
    """Newest usable negative test. None for a male patient (hCG in a male is not a pregnancy test)."""
    negative_good_through: date | None
    """Last clinic-local day the newest negative test still allows a dispense (collection day + 7)."""
    positive_since_negative: PregnancyRecord | None
    """Newest positive test, or "pregnant" status, recorded after the newest negative (or with none)."""
    valid_test_today: bool | None
    """A negative test good today and nothing positive since. None when tests are not required."""
    valid_test_on_next_fill: bool | None
    """The same on `next_fill_from` (what order-sign checks). None when not required or no fill day."""
    next_test_due: date | None
    """Next test under the ongoing schedule (weekly for 4 weeks, then every 2 or 4 weeks); today when
    there is no negative test. None when tests are not required."""
    last_fill: Fill | None
    supply_source: str | None
    """Reference of the dispense (or the order, when no dispense is on file) that sets the supply."""
    supply_how: str | None
    days_left: int | None
    """Days of medication left today: 0 once run out, at most 28; None when unknown."""
    runs_out: date | None
    """First clinic-local day without medication."""
    next_fill_from: date | None
    """Earliest day the pharmacy may dispense the next prescription: today, or when 7 or fewer days
    are left (the early-refill rule), if later. None when the supply is unknown."""
    authorization_number: str | None
    """REMS authorization number on the order; None = absent."""
    problems: tuple[str, ...]
    """What could not be determined or read, one short line each. Empty when everything was read."""

    @property
    def authorization_present(self) -> bool:
        return self.authorization_number is not None


RECENT_THERAPY_DAYS = 28
"""A drug with no active order still gets a status when its newest *completed* order's supply ran out
less than this many days ago: many EHRs mark a prescription completed once it is dispensed, and the
patient is then still on the drug (or between cycles, awaiting the renewal) — exactly when the status
matters."""


def rems_status(case: Case, config: Config | None = None) -> tuple[RemsStatus, ...]:
    """One `RemsStatus` per IMiD the patient is on, in `Drug` order: a drug with an active order, or
    with a completed order whose supply ran out less than `RECENT_THERAPY_DAYS` ago. Empty otherwise."""
    cfg = config or default_config()
    by_drug: dict[Drug, list[ImidOrder]] = {}
    completed: dict[Drug, list[ImidOrder]] = {}
    for order in case.chart.imid_orders:
        if order.status == "active":
            by_drug.setdefault(order.drug, []).append(order)
        elif order.status == "completed":
            completed.setdefault(order.drug, []).append(order)
    out: list[RemsStatus] = []
    for drug in Drug:
        orders = by_drug.get(drug)
        if orders:
            orders.sort(key=lambda o: _order_key(o, case), reverse=True)
            out.append(_status(case, cfg, orders[0], tuple(o.reference for o in orders[1:])))
        elif completed.get(drug):
            newest = max(completed[drug], key=lambda o: _order_key(o, case))
            status = _status(case, cfg, newest, ())
            if status.runs_out is not None and (status.runs_out - status.today).days > -RECENT_THERAPY_DAYS:
                out.append(status)
    return tuple(out)


def _order_key(order: ImidOrder, case: Case) -> tuple[int, float, str]:
    """Newest first when sorted in reverse: by authoredOn (else start) as an instant; undated orders
    count as the oldest."""
    moment: datetime | date | None = order.authored_on or order.start
    if moment is None:
        return 0, 0.0, order.reference
    return 1, earliest_instant(moment, case.clinic_zone).timestamp(), order.reference


def _status(case: Case, cfg: Config, order: ImidOrder, others: tuple[str, ...]) -> RemsStatus:
    probe = dataclasses.replace(order, reference=order.reference + _STATUS_PROBE)
    view = view_order(case, cfg, probe)
    problems: list[str] = []
    if others:
        problems.append(
            f"{len(others) + 1} active {order.drug.value} orders ({', '.join(others)} besides {order.reference}): "
            "status shown for the newest"
        )
    problems.extend(_patient_problems(view))
    category, source, basis = _category(view, order)
    if order.risk_category_unrecognized:
        problems.append(f"risk category on the order not recognised: {order.risk_category_unrecognized!r}")
    if view.reproductive is Reproductive.UNKNOWN:
        problems.append(
            "nothing on the order or chart settles whether the patient can get pregnant: "
            "pregnancy tests treated as required"
        )
    required = view.reproductive.pregnancy_tests_apply
    tests = _tests(view, order, required, problems)
    supply = _supply(view, order, problems)
    return RemsStatus(
        drug=order.drug,
        order=order.reference,
        other_orders=others,
        today=view.today,
        risk_category=category,
        category_source=source,
        category_basis=basis,
        pregnancy_tests_required=required,
        last_negative_test=tests.negative,
        negative_good_through=tests.good_through,
        positive_since_negative=tests.positive,
        valid_test_today=tests.valid_today,
        valid_test_on_next_fill=tests.valid_on_next_fill,
        next_test_due=tests.next_due,
        last_fill=supply.last_fill,
        supply_source=supply.source,
        supply_how=supply.how,
        days_left=supply.days_left,
        runs_out=supply.runs_out,
        next_fill_from=supply.next_fill_from,
        authorization_number=order.authorization_number or None,
        problems=tuple(problems),
    )


def _patient_problems(view: OrderView) -> list[str]:
    patient = view.case.patient
    out = []
    if patient.sex is Sex.UNKNOWN:
        out.append(f"sex unknown (read from: {patient.sex_source})")
    if patient.birth_date is None:
        out.append("birth date unknown: adult or child category cannot be checked")
    return out


def _category(view: OrderView, order: ImidOrder) -> tuple[RiskCategory | None, CategorySource, str]:
    if order.risk_category is not None:
        src = order.risk_category_source
        where = f"{src.element} ({src.reference})" if src else f"the order ({order.reference})"
        return order.risk_category, CategorySource.ORDER, f"documented on the order: {where}"
    suggestion = suggested_category(view)
    patient = view.case.patient
    if suggestion is not None:
        facts = [f"sex {patient.sex.value} ({patient.sex_source})", f"age {view.age}"]
        facts.extend(f"{e.text} ({e.reference})" for e in view.nrp_evidence)
        return suggestion, CategorySource.SUGGESTED, "not on the order; suggested by the chart: " + ", ".join(facts)
    return (
        None,
        CategorySource.UNKNOWN,
        f"not on the order, and the chart does not settle it ({view.reproductive.value})",
    )


@dataclass(frozen=True)
class _Tests:
    negative: PregnancyRecord | None = None
    good_through: date | None = None
    positive: PregnancyRecord | None = None
    valid_today: bool | None = None
    valid_on_next_fill: bool | None = None
    next_due: date | None = None


def _record(t: PregnancyTest, view: OrderView) -> PregnancyRecord:
    return PregnancyRecord(t.reference, local_day(t.collected, view.case.clinic_zone), t.result_text)


def _tests(view: OrderView, order: ImidOrder, required: bool, problems: list[str]) -> _Tests:
    """Pregnancy-test facts. Read for anyone who could be pregnant (not male, or a female category:
    the rules' reading); hCG in a male is a tumour marker and is not shown."""
    case, zone, rules = view.case, view.case.clinic_zone, view.config.rems
    could_be_pregnant = case.patient.sex is not Sex.MALE or (
        order.risk_category is not None and order.risk_category.is_female
    )
    if not could_be_pregnant:
        return _Tests()
    negatives = [t for t in view.tests if t.result is TestResult.NEGATIVE]
    last_negative = negatives[-1] if negatives else None
    since = earliest_instant(last_negative.collected, zone) if last_negative else None

    def after_negative(moment: datetime | date) -> bool:
        return since is None or earliest_instant(moment, zone) > since

    # Newest positive test or "pregnant" status after the newest negative (the rules' reading).
    candidates = [
        (earliest_instant(t.collected, zone), _record(t, view))
        for t in view.tests
        if t.result is TestResult.POSITIVE and after_negative(t.collected)
    ]
    statuses = [st for st in case.chart.pregnancy_statuses if earliest_instant(st.when, zone) <= case.now]
    newest_status = max(statuses, key=lambda st: earliest_instant(st.when, zone), default=None)
    if (
        newest_status is not None
        and newest_status.state is PregnancyState.PREGNANT
        and after_negative(newest_status.when)
    ):
        candidates.append(
            (
                earliest_instant(newest_status.when, zone),
                PregnancyRecord(
                    newest_status.reference, local_day(newest_status.when, zone), "pregnancy status: pregnant"
                ),
            )
        )
    positive = max(candidates, key=lambda c: c[0])[1] if candidates else None

    for t in view.tests:
        if t.result is TestResult.UNREADABLE and after_negative(t.collected):
            problems.append(
                f"pregnancy test of {_day(t.collected, view)} could not be read: {t.result_text[:60]!r} ({t.reference})"
            )
    for t in case.chart.pregnancy_tests:
        if earliest_instant(t.collected, zone) > case.now:
            problems.append(
                f"pregnancy test dated in the future ({_day(t.collected, view)}, {t.reference}): not counted"
            )
        elif t.preliminary and not rules.count_preliminary_tests and after_negative(t.collected):
            problems.append(
                f"preliminary pregnancy test of {_day(t.collected, view)} not counted: "
                f"{t.result_text[:60]!r} ({t.reference})"
            )
    problems.extend(f"pregnancy test with no usable date: {text}" for text in case.chart.unreadable_pregnancy_tests)

    good_through = (
        test_good_through(last_negative.collected, zone, rules.test_valid_days) if last_negative is not None else None
    )
    if not required:
        return _Tests(
            negative=_record(last_negative, view) if last_negative else None,
            good_through=good_through,
            positive=positive,
        )
    next_fill = view.first_dispense_day if view.supply_window is not None else None
    return _Tests(
        negative=_record(last_negative, view) if last_negative else None,
        good_through=good_through,
        positive=positive,
        valid_today=positive is None and good_through is not None and good_through >= view.today,
        valid_on_next_fill=(
            None if next_fill is None else positive is None and good_through is not None and good_through >= next_fill
        ),
        next_due=next_test_due(
            therapy_start=therapy_start(view, order.drug),
            last_negative=local_day(last_negative.collected, zone) if last_negative else None,
            today=view.today,
            regular_cycles=case.chart.regular_cycles,
            schedule=rules.test_schedule,
        ),
    )


def _day(moment: datetime | date, view: OrderView) -> str:
    return local_day(moment, view.case.clinic_zone).isoformat()


@dataclass(frozen=True)
class _Supply:
    last_fill: Fill | None = None
    source: str | None = None
    how: str | None = None
    days_left: int | None = None
    runs_out: date | None = None
    next_fill_from: date | None = None


def _supply(view: OrderView, order: ImidOrder, problems: list[str]) -> _Supply:
    case, zone, rules = view.case, view.case.clinic_zone, view.config.rems
    fills = [d for d in case.chart.dispenses if d.drug is order.drug]
    for d in fills:
        if d.days_supply is None:
            problems.append(f"dispense of {_day(d.handed_over, view)} states no days' supply ({d.reference})")
    newest = max(fills, key=lambda d: (earliest_instant(d.handed_over, zone), d.reference), default=None)
    last_fill = Fill(newest.reference, local_day(newest.handed_over, zone), newest.days_supply) if newest else None
    problems.extend(f"record not read: {text}" for text in case.chart.unreadable)
    w = view.supply_window
    if w is None:
        reasons = []
        if order.supply is None:
            reasons.append(f"the order's days' supply is unknown ({order.supply_problem or 'not stated'})")
        if order.start is None:
            reasons.append("the order has no start date (validityPeriod.start or authoredOn)")
        problems.append("days of supply left unknown: " + ("; ".join(reasons) or "no dispense or order supply on file"))
        return _Supply(last_fill=last_fill)
    cap = rules.max_supply_days
    raw_left = (w.runs_out - view.today).days
    if raw_left > cap:
        problems.append(f"the supply on record leaves {raw_left} days ({w.how}); shown as {cap}, the REMS maximum")
    return _Supply(
        last_fill=last_fill,
        source=w.source,
        how=w.how,
        days_left=w.days_left(view.today, cap),
        runs_out=w.runs_out,
        next_fill_from=view.first_dispense_day,
    )
