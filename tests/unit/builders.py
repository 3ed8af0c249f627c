"""Named test patients, orders and chart records built from the `rems.model` dataclasses.

Every builder returns a frozen domain value with clean defaults: an order that passes every REMS check
on its own (28 days, no refills, an authorization number, a risk category), a chart that raises no
clinical-review flag (aspirin on file, a CBC from yesterday). A test changes only what it is about,
passing it explicitly, so the data a test depends on is visible in the test.

The clock: `NOW` is Wednesday 18 June 2025, 10:00 in Los Angeles (PDT, UTC-07:00), so UTC and
clinic-local dates differ for any time after 17:00 local. Tests that move the clock pass `now=` to
`case()` and build their records relative to it.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import rems
from rems.findings import Finding, RuleCode, Severity
from rems.model import (
    Case,
    Chart,
    Dispense,
    Dose,
    Drug,
    ImidOrder,
    Indication,
    LabKind,
    LabValue,
    NrpEvidence,
    NrpEvidenceKind,
    OtherMedication,
    PatientFacts,
    PregnancyState,
    PregnancyStatus,
    PregnancyTest,
    Prescriber,
    RiskCategory,
    Sex,
    SupplyDays,
    TestResult,
)

LOS_ANGELES = ZoneInfo("America/Los_Angeles")
"""The default clinic zone: west of UTC (UTC-08:00 / UTC-07:00 with DST)."""
TOKYO = ZoneInfo("Asia/Tokyo")
"""A clinic zone east of UTC (UTC+09:00, no DST)."""
CLINIC = LOS_ANGELES

NOW = datetime(2025, 6, 18, 10, 0, tzinfo=CLINIC)
"""Default clock: Wednesday 18 June 2025, 10:00 PDT."""
TODAY = NOW.date()

HEMATOLOGY_ONCOLOGY = "207RH0003X"
"""NUCC: Internal Medicine, Hematology & Oncology (a specialist for the coverage rules)."""
FAMILY_MEDICINE = "207Q00000X"
"""NUCC: Family Medicine (not a specialist for the coverage rules)."""
ALLERGY_IMMUNOLOGY = "207K00000X"
"""NUCC: Allergy & Immunology (a specialist only for HIV-related Kaposi sarcoma)."""


# ------------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------------


def at(day: date, hour: int = 9, minute: int = 0, zone: tzinfo = CLINIC) -> datetime:
    """A timezone-aware moment at `hour:minute` on `day` in `zone` (default: the clinic zone)."""
    return datetime.combine(day, time(hour, minute), tzinfo=zone)


def days_before(n: int, hour: int = 9, minute: int = 0, *, today: date = TODAY, zone: tzinfo = CLINIC) -> datetime:
    """Local `hour:minute` in `zone` on the day `n` calendar days before `today`."""
    return at(today - timedelta(days=n), hour, minute, zone)


def utc(moment: datetime) -> datetime:
    """The same instant expressed in UTC (as a FHIR server that normalises to ``Z`` would send it)."""
    return moment.astimezone(UTC)


def birth_date_for(age: int, on: date = TODAY) -> date:
    """A birth date that makes the patient exactly `age` completed years old on `on` (born 1 January)."""
    return date(on.year - age, 1, 1)


# ------------------------------------------------------------------------------------------------
# Patients
# ------------------------------------------------------------------------------------------------


def patient(
    sex: Sex, age: int | None = 40, *, birth_date: date | None = None, reference: str = "Patient/p1"
) -> PatientFacts:
    """Any patient; `birth_date` wins over `age`; `age=None` and no birth date = birth date unknown."""
    born = birth_date if birth_date is not None else (None if age is None else birth_date_for(age))
    return PatientFacts(
        reference=reference,
        sex=sex,
        sex_source="gender" if sex is not Sex.UNKNOWN else "none",
        birth_date=born,
    )


def adult_male(age: int = 64, *, birth_date: date | None = None) -> PatientFacts:
    """Adam, a 64-year-old man with myeloma: the REMS 'adult-male' category, no pregnancy testing."""
    return patient(Sex.MALE, age, birth_date=birth_date, reference="Patient/adam")


def boy(age: int = 15, *, birth_date: date | None = None) -> PatientFacts:
    """Ben, a male child ('child-male')."""
    return patient(Sex.MALE, age, birth_date=birth_date, reference="Patient/ben")


def frp_woman(age: int = 32, *, birth_date: date | None = None) -> PatientFacts:
    """Fiona, a 32-year-old woman who can get pregnant ('adult-female-rp'): the pregnancy-test rules
    apply to her."""
    return patient(Sex.FEMALE, age, birth_date=birth_date, reference="Patient/fiona")


def nrp_woman(age: int = 61, *, birth_date: date | None = None) -> PatientFacts:
    """Nora, a 61-year-old woman; pair her with `hysterectomy()` evidence for 'adult-female-nrp'."""
    return patient(Sex.FEMALE, age, birth_date=birth_date, reference="Patient/nora")


def girl(age: int = 12, *, birth_date: date | None = None) -> PatientFacts:
    """Grace, a female child."""
    return patient(Sex.FEMALE, age, birth_date=birth_date, reference="Patient/grace")


def unknown_sex_patient(age: int | None = 40, *, birth_date: date | None = None) -> PatientFacts:
    """Pat, whose chart states no sex (gender unknown, no sex extension)."""
    return patient(Sex.UNKNOWN, age, birth_date=birth_date, reference="Patient/pat")


# ------------------------------------------------------------------------------------------------
# IMiD orders
# ------------------------------------------------------------------------------------------------

_STRENGTH_MG = {Drug.LENALIDOMIDE: Decimal(10), Drug.POMALIDOMIDE: Decimal(4), Drug.THALIDOMIDE: Decimal(100)}
_CYCLE = {Drug.LENALIDOMIDE: (21, 28), Drug.POMALIDOMIDE: (21, 28), Drug.THALIDOMIDE: (None, None)}


def supply_of(days: int | str | Decimal) -> SupplyDays:
    """A days' supply stated by `expectedSupplyDuration`."""
    return SupplyDays(Decimal(days), "expectedSupplyDuration")


def imid_order(
    drug: Drug,
    *,
    reference: str | None = None,
    category: RiskCategory | None = RiskCategory.ADULT_MALE,
    supply_days: int | str | Decimal | None = 28,
    refills: int | None = 0,
    authorization: str | None = "12345678",
    mg_per_day: int | str | Decimal | None = None,
    status: str = "draft",
    authored_on: datetime | None = None,
    start: date | None = None,
    brand: bool = False,
    indications: Iterable[str] = ("multiple-myeloma",),
    maintenance: bool = False,
    requester: str | None = None,
    **fields: Any,
) -> ImidOrder:
    """An IMiD order that passes every REMS check by itself: 28 days, 0 refills, authorization number
    12345678, risk category 'adult-male' (pass `category=` for any other patient), generic, at the
    drug's usual strength, for multiple myeloma. `authored_on=None` means "signed now" (the rules use
    the case clock). Any other `ImidOrder` field can be given in `fields`."""
    strength = _STRENGTH_MG[drug]
    mg = strength if mg_per_day is None else Decimal(mg_per_day)
    on_days, cycle = _CYCLE[drug]
    values: dict[str, Any] = {
        "reference": reference or f"MedicationRequest/{drug.value}-draft",
        "drug": drug,
        "medication_text": f"{'brand ' if brand else ''}{drug.value} {strength} mg capsule",
        "brand": brand,
        "strength_mg": strength,
        "status": status,
        "authored_on": authored_on,
        "start": start if start is not None else (authored_on.date() if authored_on else None),
        "supply": None if supply_days is None else supply_of(supply_days),
        "supply_problem": "no expectedSupplyDuration and no quantity" if supply_days is None else None,
        "refills": refills,
        "dose": Dose(mg_per_day=mg, capsules_per_day=Decimal(1), days_on_per_cycle=on_days, cycle_days=cycle),
        "authorization_number": authorization,
        "authorization_source": None,
        "risk_category": category,
        "risk_category_source": None,
        "risk_category_unrecognized": None,
        "indications": tuple(Indication(code, "reasonCode") for code in indications),
        "maintenance": maintenance,
        "requester": requester,
        "prior_prescription": None,
    }
    values.update(fields)
    return ImidOrder(**values)


def lenalidomide_order(**overrides: Any) -> ImidOrder:
    """A clean lenalidomide 10 mg order (days 1-21 of 28) for an adult male; see `imid_order`."""
    return imid_order(Drug.LENALIDOMIDE, **overrides)


def pomalidomide_order(**overrides: Any) -> ImidOrder:
    """A clean pomalidomide 4 mg order (days 1-21 of 28) for an adult male; see `imid_order`."""
    return imid_order(Drug.POMALIDOMIDE, **overrides)


def thalidomide_order(**overrides: Any) -> ImidOrder:
    """A clean thalidomide 100 mg daily order for an adult male; see `imid_order`."""
    return imid_order(Drug.THALIDOMIDE, **overrides)


def frp_order(**overrides: Any) -> ImidOrder:
    """A clean lenalidomide order with the 'adult-female-rp' category (for `frp_woman`)."""
    overrides.setdefault("category", RiskCategory.ADULT_FEMALE_RP)
    return lenalidomide_order(**overrides)


def chart_order(
    drug: Drug = Drug.LENALIDOMIDE,
    *,
    authored: datetime,
    status: str = "active",
    supply_days: int | None = 28,
    reference: str | None = None,
) -> ImidOrder:
    """An IMiD order already in the chart (a previous prescription), authored and started `authored`."""
    return imid_order(
        drug,
        reference=reference or f"MedicationRequest/{drug.value}-previous",
        status=status,
        authored_on=authored,
        start=authored.astimezone(CLINIC).date(),
        supply_days=supply_days,
    )


def dispense(
    handed_over: datetime | date,
    *,
    drug: Drug = Drug.LENALIDOMIDE,
    days_supply: int | str | Decimal | None = 28,
    prescription: str | None = None,
    reference: str = "MedicationDispense/fill-1",
) -> Dispense:
    """A completed dispense of `days_supply` days handed over at `handed_over`."""
    return Dispense(
        reference=reference,
        drug=drug,
        handed_over=handed_over,
        days_supply=None if days_supply is None else Decimal(days_supply),
        prescription=prescription,
    )


def last_fill(
    days_ago: int = 21, *, today: date = TODAY, zone: tzinfo = CLINIC, drug: Drug = Drug.LENALIDOMIDE
) -> Dispense:
    """The fill of an ongoing course: 28 days handed over at 14:00 (`zone`) `days_ago` days before
    `today`. The default 21 leaves exactly 7 days, so the new prescription can be dispensed today."""
    return dispense(days_before(days_ago, 14, today=today, zone=zone), drug=drug)


# ------------------------------------------------------------------------------------------------
# Pregnancy tests and status
# ------------------------------------------------------------------------------------------------


def pregnancy_test(
    collected: datetime | date,
    result: TestResult,
    *,
    text: str | None = None,
    reference: str = "Observation/hcg-1",
    preliminary: bool = False,
    collected_from: str = "effectiveDateTime",
) -> PregnancyTest:
    """A serum hCG result (LOINC 2106-3) collected at `collected` (a bare date = day known only)."""
    return PregnancyTest(
        reference=reference,
        collected=collected,
        collected_from=collected_from,
        result=result,
        result_text=text or result.value.capitalize(),
        code="2106-3",
        preliminary=preliminary,
    )


def negative_test(collected: datetime | date, **kw: Any) -> PregnancyTest:
    """A negative hCG collected at `collected`."""
    return pregnancy_test(collected, TestResult.NEGATIVE, **kw)


def positive_test(collected: datetime | date, **kw: Any) -> PregnancyTest:
    """A positive hCG collected at `collected`."""
    kw.setdefault("reference", "Observation/hcg-pos")
    return pregnancy_test(collected, TestResult.POSITIVE, **kw)


def unreadable_test(collected: datetime | date, text: str = "indeterminate", **kw: Any) -> PregnancyTest:
    """An hCG whose result could not be read as negative or positive."""
    kw.setdefault("reference", "Observation/hcg-unreadable")
    return pregnancy_test(collected, TestResult.UNREADABLE, text=text, **kw)


def pregnancy_status(when: datetime | date, state: PregnancyState) -> PregnancyStatus:
    """A pregnancy status observation (LOINC 82810-3)."""
    return PregnancyStatus("Observation/pregnancy-status-1", when, state)


def hysterectomy(since: date | None = date(2010, 5, 4)) -> NrpEvidence:
    """A documented total hysterectomy: settles 'cannot get pregnant'."""
    return NrpEvidence("Procedure/hysterectomy", NrpEvidenceKind.HYSTERECTOMY, since, "Total hysterectomy")


def menopause(since: date | None) -> NrpEvidence:
    """Natural menopause with onset `since` (counts only from 24 months after onset)."""
    return NrpEvidence("Condition/menopause", NrpEvidenceKind.NATURAL_MENOPAUSE, since, "Natural menopause")


# ------------------------------------------------------------------------------------------------
# Labs, antithrombotics, prescribers
# ------------------------------------------------------------------------------------------------


def lab(kind: LabKind, value: int | str | Decimal, when: datetime | date, unit: str) -> LabValue:
    return LabValue(f"Observation/{kind.value}-{value}", kind, Decimal(value), when, f"{value} {unit}")


def anc(value: int | str | Decimal, when: datetime | date) -> LabValue:
    """Absolute neutrophil count in 10^9/L."""
    return lab(LabKind.ANC, value, when, "10*3/uL")


def platelets(value: int | str | Decimal, when: datetime | date) -> LabValue:
    """Platelet count in 10^9/L."""
    return lab(LabKind.PLATELETS, value, when, "10*3/uL")


def creatinine(value: int | str | Decimal, when: datetime | date) -> LabValue:
    """Serum creatinine in mg/dL."""
    return lab(LabKind.CREATININE, value, when, "mg/dL")


def weight(kg: int | str | Decimal, when: datetime | date) -> LabValue:
    """Body weight in kg."""
    return lab(LabKind.WEIGHT, kg, when, "kg")


def normal_cbc(when: datetime | date) -> tuple[LabValue, ...]:
    """ANC 2.5 and platelets 210 (10^9/L): above every hold threshold."""
    return (anc("2.5", when), platelets(210, when))


def aspirin(status: str = "active") -> OtherMedication:
    """Aspirin 81 mg daily: VTE prophylaxis."""
    return OtherMedication("MedicationRequest/aspirin", "aspirin 81 mg tablet", status)


def prescriber(*specialties: str, reference: str = "Practitioner/dr-h") -> Prescriber:
    """A prescriber with the given NUCC specialty codes."""
    return Prescriber(reference, frozenset(specialties), ", ".join(specialties) or "unknown")


# ------------------------------------------------------------------------------------------------
# Cases and findings
# ------------------------------------------------------------------------------------------------


def case(
    who: PatientFacts,
    *orders: ImidOrder,
    now: datetime = NOW,
    zone: tzinfo = CLINIC,
    prescriber_reference: str | None = None,
    **chart: Any,
) -> Case:
    """One decision for `who` on `orders` (default: a clean lenalidomide order) at `now` in `zone`.

    `chart` holds `Chart` fields. Unless given, the chart is quiet for the clinical-review rules:
    aspirin is active and a normal CBC was taken a day before `now`. Nothing else is on file: no
    prior IMiD order or dispense (so a pregnancy-capable patient is at initiation), no pregnancy
    test, no creatinine.
    """
    chart.setdefault("antithrombotics", (aspirin(),))
    chart.setdefault("labs", normal_cbc(now - timedelta(days=1)))
    return Case(
        now=now,
        clinic_zone=zone,
        patient=who,
        orders=orders or (lenalidomide_order(),),
        chart=Chart(**chart),
        prescriber_reference=prescriber_reference,
    )


def run(c: Case, config: rems.Config | None = None) -> list[Finding]:
    """Evaluate the case with every rule (default configuration unless `config`)."""
    return rems.evaluate(c, config)


def codes(findings: Iterable[Finding]) -> list[RuleCode]:
    """The rule codes of `findings`, in the engine's order, duplicates kept."""
    return [f.code for f in findings]


def only(findings: Iterable[Finding], code: RuleCode) -> Finding:
    """The single finding with `code` (fails the test if there is none or more than one)."""
    found = list(findings)
    matching = [f for f in found if f.code is code]
    assert len(matching) == 1, f"expected exactly one {code}, got {codes(found)!r}"
    return matching[0]


def severity_of(findings: Iterable[Finding], code: RuleCode) -> Severity:
    """Severity of the single finding with `code`."""
    return only(findings, code).severity


def cases_firing_every_rule() -> list[Case]:
    """A handful of bad cases that, between them, raise every rule in the catalogue at least once,
    with long free text and long decimals where a summary quotes them."""
    gp = prescriber(FAMILY_MEDICINE)
    kitchen_sink = case(
        adult_male(64),
        lenalidomide_order(
            supply_days=29,
            refills=2,
            authorization=None,
            brand=True,
            mg_per_day=Decimal(100) / Decimal(3),
            maintenance=True,
            requester=gp.reference,
        ),
        pomalidomide_order(requester=gp.reference),
        prescribers=(gp,),
        antithrombotics=(),
        labs=(
            anc("0.123456789012345678901234567", NOW - timedelta(days=1)),
            platelets(20, NOW - timedelta(days=1)),
            creatinine("2.0", NOW - timedelta(days=2)),
            weight(60, NOW - timedelta(days=2)),
        ),
    )
    child_unknown_supply = case(
        boy(15),
        lenalidomide_order(category=None, supply_days=None, risk_category_unrecognized="x" * 300),
        labs=(),
    )
    frp_initiation_wrong_category = case(frp_woman(), lenalidomide_order(category=RiskCategory.ADULT_MALE))
    frp_no_test = case(frp_woman(), frp_order(), dispenses=(last_fill(21),))
    frp_stale_early = case(
        frp_woman(), frp_order(), dispenses=(last_fill(18),), pregnancy_tests=(negative_test(days_before(9)),)
    )
    frp_positive = case(
        frp_woman(),
        frp_order(),
        dispenses=(last_fill(21),),
        pregnancy_tests=(positive_test(days_before(1), text="POSITIVE " * 40),),
    )
    frp_unreadable = case(
        frp_woman(),
        frp_order(),
        dispenses=(last_fill(21),),
        pregnancy_tests=(negative_test(days_before(3)), unreadable_test(days_before(1), "?" * 400)),
    )
    status_unknown = case(patient(Sex.FEMALE, 45), lenalidomide_order(category=None))
    pomalidomide_kidneys = case(
        adult_male(),
        pomalidomide_order(mg_per_day=5),
        labs=(*normal_cbc(NOW - timedelta(days=1)), creatinine("3.14159265358979323846264338", NOW)),
    )
    return [
        kitchen_sink,
        child_unknown_supply,
        frp_initiation_wrong_category,
        frp_no_test,
        frp_stale_early,
        frp_positive,
        frp_unreadable,
        status_unknown,
        pomalidomide_kidneys,
    ]
