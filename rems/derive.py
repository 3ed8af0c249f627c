"""What the rules need to know about one order, worked out once from the case.

`OrderView` is built per order under review and handed to every rule, so no rule re-derives the age,
the current supply, the reproductive status or the first dispense day.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import date, datetime, timedelta

from rems.config import Config
from rems.model import (
    Case,
    Drug,
    ImidOrder,
    NrpEvidence,
    NrpEvidenceKind,
    PregnancyTest,
    RiskCategory,
    Sex,
)
from rems.timing import (
    SupplyWindow,
    age_in_years,
    days_between,
    earliest_instant,
    local_day,
    months_between,
    supply_runs_out,
)

ORDER_STATUSES_IN_EFFECT = frozenset({"active", "completed"})
"""Orders whose supply counts when no dispense is on file for them."""
ORDER_STATUSES_IGNORED = frozenset({"entered-in-error", "cancelled", "draft"})
"""Orders that never happened (or are not yet signed): they start no therapy and supply nothing."""


class Reproductive(enum.Enum):
    """Whether pregnancy-test rules apply, and why."""

    CAN_GET_PREGNANT = "documented category: can get pregnant"
    CANNOT_DOCUMENTED = "documented category: cannot get pregnant or male"
    CANNOT_FROM_CHART = "chart: male, too young, or documented cannot get pregnant"
    UNKNOWN = "nothing settles it"

    @property
    def pregnancy_tests_apply(self) -> bool:
        """Unknown status is treated as "can get pregnant" (safety default): a finding we could not
        rule out is never a pass."""
        return self in (Reproductive.CAN_GET_PREGNANT, Reproductive.UNKNOWN)


@dataclass(frozen=True)
class OrderView:
    case: Case
    config: Config
    order: ImidOrder
    today: date
    order_day: date
    age: int | None
    supply_window: SupplyWindow | None
    first_dispense_day: date
    initiation: bool
    reproductive: Reproductive
    nrp_evidence: tuple[NrpEvidence, ...]
    """Evidence that settles "cannot get pregnant" on the order day (menopause only after 24 months)."""
    tests: tuple[PregnancyTest, ...]
    """Usable pregnancy tests, oldest first (entered-in-error and cancelled already dropped by the
    mapping; preliminary ones dropped here unless configured; none from the future)."""

    @property
    def is_adult(self) -> bool | None:
        return None if self.age is None else self.age >= self.config.rems.adult_age_years


def view_order(case: Case, config: Config, order: ImidOrder) -> OrderView:
    zone = case.clinic_zone
    today = local_day(case.now, zone)
    order_day = local_day(order.authored_on, zone) if order.authored_on else today
    birth = case.patient.birth_date
    age = age_in_years(birth, order_day) if birth else None
    window = current_supply(case, config, order)
    first_day = today
    if window is not None:
        first_day = max(today, window.dispensable_from(config.rems.dispense_when_days_left_at_most))
    evidence = settled_nrp_evidence(case, config, order_day)
    tests = tuple(
        sorted(
            (
                t
                for t in case.chart.pregnancy_tests
                if (config.rems.count_preliminary_tests or not t.preliminary)
                and earliest_instant(t.collected, zone) <= case.now
            ),
            key=lambda t: earliest_instant(t.collected, zone),
        )
    )
    return OrderView(
        case=case,
        config=config,
        order=order,
        today=today,
        order_day=order_day,
        age=age,
        supply_window=window,
        first_dispense_day=first_day,
        initiation=is_initiation(case, config, order),
        reproductive=reproductive_status(case, config, order, age, evidence),
        nrp_evidence=evidence,
        tests=tests,
    )


def current_supply(case: Case, config: Config, order: ImidOrder) -> SupplyWindow | None:
    """The supply of the same drug the patient has now: the latest-running dispense, or, for an order
    in effect with no dispense on file, its start + expected supply (FHIR_CONTRACT "last fill")."""
    zone = case.clinic_zone
    best: SupplyWindow | None = None

    def consider(w: SupplyWindow) -> None:
        nonlocal best
        if best is None or w.runs_out > best.runs_out:
            best = w

    dispensed_orders: set[str] = set()
    for d in case.chart.dispenses:
        if d.drug is not order.drug:
            continue
        if d.prescription:
            dispensed_orders.add(d.prescription)
        if d.days_supply is None:
            continue
        start = local_day(d.handed_over, zone)
        consider(
            SupplyWindow(
                d.reference,
                supply_runs_out(start, d.days_supply),
                f"handed over {start.isoformat()} for {d.days_supply} days",
            )
        )
    for o in case.chart.imid_orders:
        if (
            o.drug is not order.drug
            or o.reference == order.reference
            or o.status not in ORDER_STATUSES_IN_EFFECT
            or o.reference in dispensed_orders
            or o.start is None
            or o.supply is None
        ):
            continue
        consider(
            SupplyWindow(
                o.reference,
                supply_runs_out(o.start, o.supply.days),
                f"ordered from {o.start.isoformat()} for {o.supply.days} days (no dispense on file)",
            )
        )
    return best


def _when_day(moment: datetime | date | None, case: Case) -> date | None:
    return None if moment is None else local_day(moment, case.clinic_zone)


def is_initiation(case: Case, config: Config, order: ImidOrder) -> bool:
    """First prescription: no IMiD order (other than the ones under review) or dispense in the last
    `initiation_lookback_days` days (any IMiD)."""
    today = local_day(case.now, case.clinic_zone)
    since = today - timedelta(days=config.rems.initiation_lookback_days)
    under_review = {o.reference for o in case.orders}
    for o in case.chart.imid_orders:
        if o.reference in under_review or o.status in ORDER_STATUSES_IGNORED:
            continue
        day = _when_day(o.authored_on, case) or o.start
        if day is not None and since <= day <= today:
            return False
    for d in case.chart.dispenses:
        day = local_day(d.handed_over, case.clinic_zone)
        if since <= day <= today:
            return False
    return True


def settled_nrp_evidence(case: Case, config: Config, on: date) -> tuple[NrpEvidence, ...]:
    out = []
    for e in case.chart.nrp_evidence:
        if e.since is not None and e.since > on:
            continue
        too_recent = e.since is None or months_between(e.since, on) < config.rems.menopause_months
        if e.kind is NrpEvidenceKind.NATURAL_MENOPAUSE and too_recent:
            continue
        out.append(e)
    return tuple(out)


def reproductive_status(
    case: Case, config: Config, order: ImidOrder, age: int | None, evidence: tuple[NrpEvidence, ...]
) -> Reproductive:
    category = order.risk_category
    if category is not None:
        return Reproductive.CAN_GET_PREGNANT if category.can_get_pregnant else Reproductive.CANNOT_DOCUMENTED
    if case.patient.sex is Sex.MALE:
        return Reproductive.CANNOT_FROM_CHART
    if age is not None and age < config.rems.reproductive_age_years:
        return Reproductive.CANNOT_FROM_CHART
    if evidence:
        return Reproductive.CANNOT_FROM_CHART
    return Reproductive.UNKNOWN


def suggested_category(view: OrderView) -> RiskCategory | None:
    """The category the chart supports, when it settles one (offered as the fix for a missing one)."""
    sex, adult = view.case.patient.sex, view.is_adult
    if adult is None or sex is Sex.UNKNOWN:
        return None
    if sex is Sex.MALE:
        return RiskCategory.ADULT_MALE if adult else RiskCategory.CHILD_MALE
    if view.nrp_evidence:
        return RiskCategory.ADULT_FEMALE_NRP if adult else RiskCategory.CHILD_FEMALE_NRP
    return None


def therapy_start(view: OrderView, drug: Drug) -> date:
    """Start of the current course of `drug`: the earliest order or dispense of it on file, unless this
    is an initiation, when therapy starts today."""
    if view.initiation:
        return view.today
    days: list[date] = []
    for o in view.case.chart.imid_orders:
        if o.drug is drug and o.status not in ORDER_STATUSES_IGNORED:
            d = _when_day(o.authored_on, view.case) or o.start
            if d is not None:
                days.append(d)
    days.extend(local_day(d.handed_over, view.case.clinic_zone) for d in view.case.chart.dispenses if d.drug is drug)
    return min(days, default=view.today)


def age_days(moment: datetime | date, view: OrderView) -> int:
    return days_between(local_day(moment, view.case.clinic_zone), view.today)
