"""Refill drafts, pure: what the scan drafts for one patient, and the pre-check list of a drafted
prescription. No I/O: `cds_hooks.refill_scan` fetches the charts, `cds_hooks.refill_store` keeps the drafts.

**When a draft is made.** For each IMiD with an *active* order (`rems.status.rems_status` picks the newest
active order per drug), when the supply left today is at most the drafting horizon (default 10 days,
`Settings.refill_horizon_days`; the pharmacy may dispense at 7). The days left come from the newest
completed dispense (``whenHandedOver`` + ``daysSupply``), else the order itself (FHIR_CONTRACT "last fill").
A drug whose supply cannot be worked out is not drafted: the scan reports it (a safety check that could not
read its data says so; it never passes silently).

**The drafted prescription** (`fhir_mappings.writes.next_prescription`): a new MedicationRequest, status
draft, same drug, dose and dosing as the order it continues (``priorPrescription``), the order's supply when
it is 28 days or less (a 21-day cycle stays 21) else 28, no refills, the risk category *documented on the
order* carried over (a category the chart merely suggests is not written: the pharmacist enters the one the
REMS authorized, or the prescriber documents it), and no authorization number until the pharmacist enters
the one the REMS issued for this prescription.

**Pre-checks** (`precheck`): every rule of the engine run on the drafted prescription against the patient's
chart, one `Check` per finding (``blocking`` = the rule is a REMS hard stop: positive, stale or missing
pregnancy test, missing category or authorization number, supply over 28 days, refills), then what passed
for each area the pharmacist reviews (pregnancy tests, CBC, renal function, concurrent IMiD, VTE
prophylaxis, coverage), the supply (days left, run-out day, earliest dispense day) and the pregnancy-test
plan: the day to draw the next test so that it is at most `test_valid_days` (7) days old when the pharmacy
dispenses, aligned with the patient's next infusion appointment when one falls between the first day a test
could be drawn for the earliest dispense and the day before the supply runs out (seed 000: aligning tests and
refills with the infusion visit). Data the status could not read (``RemsStatus.problems``) is a warning check.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta, tzinfo
from typing import Any, Final

from cds_hooks.cards import draft_identifier
from cds_hooks.refill_store import Check, NewDraft, Severity
from fhir_mappings import writes
from fhir_mappings.case import build_case
from fhir_mappings.errors import InvalidInput
from fhir_mappings.resources import ResourceIndex, index_prefetch, parse_resource
from rems.config import Config, default_config
from rems.engine import evaluate
from rems.findings import RULES, Family, Finding, RuleCode
from rems.model import Case, ImidOrder
from rems.status import RemsStatus, rems_status
from rems.timing import local_day

Json = dict[str, Any]

DEFAULT_HORIZON_DAYS: Final = 10
PROBE_ID: Final = "imid-rems-refill-draft"
"""Id given to the drafted prescription while the rules judge it (it has none until written)."""

OPEN_APPOINTMENT: Final = frozenset({"proposed", "pending", "booked", "arrived", "checked-in", "waitlist"})
_INFUSION = re.compile(r"infus", re.IGNORECASE)

# Areas the pharmacist reviews, and the rule codes that speak for each (a "passed" check when none fired).
AREAS: Final[tuple[tuple[str, str, frozenset[RuleCode]], ...]] = (
    (
        "check-prescription",
        "Prescription meets the REMS: 28 days or less, no refills, category and authorization documented",
        frozenset(
            {
                RuleCode.SUPPLY_OVER_28_DAYS,
                RuleCode.SUPPLY_UNKNOWN,
                RuleCode.REFILLS_NOT_ALLOWED,
                RuleCode.RISK_CATEGORY_MISSING,
                RuleCode.RISK_CATEGORY_MISMATCH,
                RuleCode.AUTHORIZATION_MISSING,
            }
        ),
    ),
    (
        "check-pregnancy-test",
        "Pregnancy testing: nothing blocks the dispense",
        frozenset(
            {
                RuleCode.PREGNANCY_TEST_MISSING,
                RuleCode.PREGNANCY_TEST_STALE,
                RuleCode.PREGNANCY_TEST_POSITIVE,
                RuleCode.INITIATION_TESTS_INCOMPLETE,
                RuleCode.REPRODUCTIVE_STATUS_UNKNOWN,
            }
        ),
    ),
    (
        "check-cbc",
        "CBC within the protocol window; counts above the hold thresholds",
        frozenset({RuleCode.CBC_OVERDUE, RuleCode.NEUTROPENIA, RuleCode.THROMBOCYTOPENIA}),
    ),
    ("check-renal", "Renal function: no dose review flag", frozenset({RuleCode.RENAL_DOSE_REVIEW})),
    ("check-concurrent-imid", "No other IMiD active", frozenset({RuleCode.CONCURRENT_IMID})),
    ("check-vte-prophylaxis", "VTE prophylaxis active", frozenset({RuleCode.VTE_PROPHYLAXIS_MISSING})),
    (
        "check-coverage",
        "Coverage: within the health plan's criteria",
        frozenset(c for c, info in RULES.items() if info.family is Family.COVERAGE and c != RuleCode.CONCURRENT_IMID),
    ),
)


@dataclass(frozen=True, slots=True)
class PatientChart:
    """One patient's data as the scan fetched it: the Patient, the chart under the CDS prefetch keys
    (`cds_hooks.services.chart_templates`: ``medications``, ``dispenses``, ``observations``, ...; each a
    searchset Bundle or None) and the patient's Appointments."""

    patient: Json
    prefetch: Mapping[str, Any]
    appointments: Sequence[Json] = ()


@dataclass(frozen=True, slots=True)
class Planned:
    """A draft the scan makes (or re-checks) for one order."""

    draft: NewDraft
    checks: tuple[Check, ...]


@dataclass(frozen=True, slots=True)
class Skipped:
    """An active IMiD order the scan did not draft, and why (``reason`` is short and names no patient)."""

    order: str
    reason: str
    days_left: int | None


@dataclass(frozen=True, slots=True)
class PatientPlan:
    patient_id: str
    planned: tuple[Planned, ...]
    skipped: tuple[Skipped, ...]
    current_orders: frozenset[str]
    """References of the active orders the statuses were read from (drafts for any other order of this
    patient are superseded)."""


@dataclass(frozen=True, slots=True)
class Loaded:
    """A patient's chart parsed once: the index and the case with no draft under review."""

    patient: Json
    index: ResourceIndex
    case: Case
    appointments: tuple[tuple[date, str, str], ...]
    """Open infusion appointments: (clinic-local day, ``Appointment/id``, description), by day."""


def load_chart(chart: PatientChart, *, now: datetime, zone: tzinfo, config: Config) -> Loaded:
    """Parse one patient's chart. Raises `InvalidInput` naming the field that could not be read."""
    patient = parse_resource(chart.patient, "patient", ("Patient",))
    index = index_prefetch(chart.prefetch, base="chart")
    case = build_case(
        patient=patient, patient_path="patient", drafts=[], chart=index, now=now, zone=zone, config=config
    )
    return Loaded(patient, index, case, infusion_appointments(chart.appointments, zone))


def plan_patient(
    chart: PatientChart, *, now: datetime, zone: tzinfo, config: Config | None = None, horizon_days: int
) -> PatientPlan:
    """The drafts due for one patient now (see the module docstring). Raises `InvalidInput` when the
    chart cannot be read."""
    config = config or default_config()
    loaded = load_chart(chart, now=now, zone=zone, config=config)
    patient_id = str(loaded.patient.get("id"))
    planned: list[Planned] = []
    skipped: list[Skipped] = []
    current: set[str] = set()
    orders = {o.reference: o for o in loaded.case.chart.imid_orders}
    dispensed = {d.prescription for d in loaded.case.chart.dispenses if d.prescription}
    for status in rems_status(loaded.case, config):
        order = orders.get(status.order)
        if order is None or order.status != "active":
            continue
        current.add(order.reference)
        if status.days_left is None or status.runs_out is None or status.next_fill_from is None:
            skipped.append(Skipped(order.reference, "supply unknown: days left cannot be worked out", None))
            continue
        fill, start = status.last_fill, order.start
        if order.reference not in dispensed and fill is not None and start is not None and start >= fill.day:
            # Written after the newest fill and not filled yet: this order *is* the next fill (an approved
            # draft, or a renewal the prescriber signed). Drafting again would duplicate it.
            skipped.append(Skipped(order.reference, "not dispensed yet: it is the next fill", status.days_left))
            continue
        if status.days_left > horizon_days:
            skipped.append(Skipped(order.reference, f"{status.days_left} days left", status.days_left))
            continue
        raw = loaded.index.by_ref[order.reference]
        resource = draft_prescription(order, raw, patient_id, config)
        checks, next_test = precheck(loaded, resource, status, now=now, zone=zone, config=config)
        draft = NewDraft(
            patient_id=patient_id,
            prior_order=order.reference,
            drug=order.drug.value,
            medication_request=resource,
            days_left=status.days_left,
            runs_out=status.runs_out,
            earliest_dispense=status.next_fill_from,
            next_test_due=next_test,
        )
        planned.append(Planned(draft, checks))
    return PatientPlan(patient_id, tuple(planned), tuple(skipped), frozenset(current))


def draft_prescription(order: ImidOrder, raw: Json, patient_id: str, config: Config) -> Json:
    max_days = min(config.rems.max_supply_days, 28)
    days = max_days
    if order.supply is not None and 0 < order.supply.days <= max_days:
        days = int(order.supply.days)
    category = order.risk_category
    return writes.next_prescription(
        raw,
        prior_reference=order.reference,
        patient_id=patient_id,
        supply_days=days,
        category_code=category.value if category else "",
        category_display=category.display if category else "",
        authorization=None,
        draft_identifier=draft_identifier(order.reference),
        authored_on=None,
        requester=None,
    )


def status_for(loaded: Loaded, prior_order: str, config: Config) -> RemsStatus | None:
    """The REMS status of the drug `prior_order` is for, when that order is still the current one."""
    for status in rems_status(loaded.case, config):
        if status.order == prior_order:
            return status
    return None


def precheck(
    loaded: Loaded,
    resource: Mapping[str, Any],
    status: RemsStatus,
    *,
    now: datetime,
    zone: tzinfo,
    config: Config,
) -> tuple[tuple[Check, ...], date | None]:
    """The pre-check list of a drafted prescription `resource` (FHIR JSON, as stored or as edited) against
    the patient's chart, and the day the next pregnancy test should be drawn (None: not required).
    Raises `InvalidInput` when the drafted prescription itself cannot be read (an edit made it invalid)."""
    probe = {**resource, "id": PROBE_ID}
    case = build_case(
        patient=loaded.patient,
        patient_path="patient",
        drafts=[probe],
        draft_paths=["medication_request"],
        chart=loaded.index,
        now=now,
        zone=zone,
        config=config,
    )
    findings = evaluate(case, config)
    checks = [_finding_check(f) for f in findings]
    fired = {f.code for f in findings}
    for code, summary, codes in AREAS:
        if code == "check-pregnancy-test" and not status.pregnancy_tests_required:
            checks.append(Check(code, "info", False, "No pregnancy test required for this risk category"))
        elif not (fired & codes):
            checks.append(Check(code, "info", False, summary))
    for problem in status.problems:
        checks.append(Check("chart-unreadable", "warning", False, _clip(f"Could not be read: {problem}")))
    checks.append(_supply_check(status))
    plan, next_test = test_plan(status, loaded.appointments, config)
    if plan is not None:
        checks.append(plan)
    return tuple(checks), next_test


def _finding_check(f: Finding) -> Check:
    detail = f.detail
    dispensable = f.data.get("dispensable_from")
    if dispensable and dispensable not in detail:
        detail += f" Dispensable from {dispensable}."
    return Check(f.code.value, f.severity.value, f.info.hard_stop, f.summary, detail)


def _supply_check(status: RemsStatus) -> Check:
    if status.days_left is None or status.runs_out is None or status.next_fill_from is None:
        return Check("earliest-dispense", "warning", False, "Days of supply left unknown", status.supply_how)
    summary = (
        f"{status.days_left} days left: runs out {status.runs_out.isoformat()}; "
        f"the pharmacy may dispense from {status.next_fill_from.isoformat()}"
    )
    severity: Severity = "warning" if status.days_left == 0 else "info"
    return Check("earliest-dispense", severity, False, summary, status.supply_how)


def test_plan(
    status: RemsStatus, appointments: Sequence[tuple[date, str, str]], config: Config
) -> tuple[Check | None, date | None]:
    """When to draw the next pregnancy test for this refill (module docstring). Returns the check and
    the day (None when no test is required)."""
    if not status.pregnancy_tests_required:
        return None, None
    valid = config.rems.test_valid_days
    today = status.today
    earliest = status.next_fill_from or today
    runs_out = status.runs_out or earliest
    first = max(today, earliest - timedelta(days=valid))
    last = max(first, runs_out - timedelta(days=1))
    good = status.negative_good_through
    if status.positive_since_negative is None and good is not None and good >= earliest:
        neg = status.last_negative_test
        when = neg.day.isoformat() if neg else "on file"
        summary = (
            f"Pregnancy test of {when} is good through {good.isoformat()}, which covers the earliest "
            f"dispense day {earliest.isoformat()}"
        )
        return Check("pregnancy-test-plan", "info", False, _clip(summary)), status.next_test_due
    for day, ref, text in appointments:
        if first <= day <= last:
            summary = (
                f"Draw the pregnancy test at the infusion visit on {day.isoformat()}: it allows dispensing "
                f"{day.isoformat()} to {(day + timedelta(days=valid)).isoformat()}"
            )
            detail = f"{ref}: {text}" if text else ref
            return Check("pregnancy-test-plan", "info", False, _clip(summary), detail), day
    severity: Severity = "warning" if earliest <= today else "info"
    summary = (
        f"Draw the next pregnancy test between {first.isoformat()} and {earliest.isoformat()}: it must be at "
        f"most {valid} days old on the earliest dispense day {earliest.isoformat()}"
    )
    if earliest <= today:  # the refill may be dispensed today: the test is needed now
        summary = f"Draw the next pregnancy test today ({today.isoformat()}): the refill can be dispensed now"
    return Check("pregnancy-test-plan", severity, False, _clip(summary)), max(today, min(earliest, last))


def infusion_appointments(appointments: Iterable[Any], zone: tzinfo) -> tuple[tuple[date, str, str], ...]:
    """Open (``booked``, ``pending``, ...) appointments whose service, type or description says infusion,
    as (clinic-local day of ``start``, reference, description), earliest first. Malformed ones are
    skipped (they only move a suggested date; they never make a check pass)."""
    out: list[tuple[date, str, str]] = []
    for a in appointments:
        if not isinstance(a, dict) or a.get("resourceType") != "Appointment" or a.get("status") not in OPEN_APPOINTMENT:
            continue
        if not _INFUSION.search(" ".join(_texts(a))):
            continue
        start = a.get("start")
        if not isinstance(start, str):
            continue
        try:
            moment = datetime.fromisoformat(start.replace("Z", "+00:00"))
        except ValueError:
            continue
        if moment.tzinfo is None:
            continue
        out.append((local_day(moment, zone), f"Appointment/{a.get('id')}", str(a.get("description") or "")[:200]))
    out.sort()
    return tuple(out)


def _texts(a: Mapping[str, Any]) -> Iterable[str]:
    if isinstance(a.get("description"), str):
        yield a["description"]
    for key in ("serviceCategory", "serviceType", "specialty", "appointmentType"):
        value = a.get(key)
        for concept in value if isinstance(value, list) else [value]:
            if not isinstance(concept, dict):
                continue
            if isinstance(concept.get("text"), str):
                yield concept["text"]
            for coding in concept.get("coding") or []:
                if isinstance(coding, dict) and isinstance(coding.get("display"), str):
                    yield coding["display"]


def _clip(text: str) -> str:
    return text if len(text) <= 300 else text[:299] + "…"


def describe_failure(exc: Exception) -> str:
    """A short reason for a chart that could not be read (names the field, never a value)."""
    if isinstance(exc, InvalidInput):
        # The message quotes the bad value ("..., got '1961-02-30'"): keep only what is wrong, not the value.
        what = re.split(r",? got |: '|: \"| \(got ", exc.message, maxsplit=1)[0].rstrip(" ,;:")
        return f"{exc.path}: {what or 'not valid'}"[:300]
    return type(exc).__name__
