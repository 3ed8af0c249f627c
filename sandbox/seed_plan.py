"""The synthetic IMiD population, planned: who each patient is, what they take, and what is wrong.

A plan is pure data (no FHIR): `sandbox.seed_fhir` renders it into resources. Planning is in two
stages so it stays deterministic and independent of the population size:

1. **Profiles, by block of `BLOCK` patients.** Each block is a shuffled deck of risk categories in
   fixed proportions (block 0 also holds one patient of each child category, so any population of
   `BLOCK` or more has all six). Each patient then draws a drug, an indication, an age and the chart
   problems from its own random stream (``seed/index``). In block 0 every problem that was not drawn
   is given to the first clean patient it fits, so the first `BLOCK` patients show every problem.
2. **Timeline, per patient** (its own stream again): the monthly cycles (visit, order, dispense), the
   days of supply left today, and the days of the labs, pregnancy tests and infusions.

Patient `i` is the same whatever the population size: ``plan(30, s, d)`` is the start of
``plan(1000, s, d)``.

**Problems.** Each name in `PROBLEMS` is a defect put in the chart on purpose, with the rule code
(`rems.findings.RuleCode`) the product must raise for it on an order-sign renewal of the active order
today (`PatientPlan.expected_rules`). A plan without one is ``("clean",)``. Two codes follow from the
situation rather than from a defect: ``early-refill`` (more than 7 days of supply left today) and
``age-under-18`` (children: the health plan's age limit).

**Timeline.** Everything happened before `today` (on the clinic's days; nothing is dated today), so
a check run at any time of `today` sees the same chart. Cycle k: the visit ``V_k`` (labs in the
morning, pregnancy test, infusion, order signed in the afternoon), then the dispense ``H_k`` one or two
days later (28 days, 21 or 28 capsules). The current order is the last one; its supply runs out on
``today + days_left``. With 7 or fewer days left the next visit has happened (one to three days ago:
labs and the pregnancy test aligned with the refill, seed 000) and the renewal is due now.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from rems.model import Drug, RiskCategory
from rems.timing import age_in_years

BLOCK = 50
"""Patients per planning block (and per transaction Bundle)."""

SUPPLY_DAYS = 28
DISPENSE_WHEN_DAYS_LEFT_AT_MOST = 7

PROBLEMS: dict[str, str] = {
    "stale-test": "pregnancy-test-stale",
    "missing-test": "pregnancy-test-missing",
    "positive-test": "pregnancy-test-positive",
    "missing-authorization": "authorization-missing",
    "missing-category": "risk-category-missing",
    "nrp-undocumented": "risk-category-mismatch",
    "cbc-overdue": "cbc-overdue",
    "low-anc": "neutropenia",
    "low-platelets": "thrombocytopenia",
    "renal": "renal-dose-review",
    "no-prophylaxis": "vte-prophylaxis-missing",
    "non-specialist": "prescriber-not-specialist",
    "brand-revlimid": "generic-preferred",
}
"""Injected problem → the rule code it must raise (REMS_RULES.md)."""
CLEAN = "clean"

_TEST_PROBLEMS = ("stale-test", "missing-test", "positive-test")
_LAB_PROBLEMS = ("cbc-overdue", "low-anc", "low-platelets")

# Protocol thresholds the planned lab values stay clear of (rems/data/protocol.toml), 10^9/L.
ANC_HOLD = {Drug.LENALIDOMIDE: 1.0, Drug.POMALIDOMIDE: 0.5, Drug.THALIDOMIDE: 0.75}
PLATELET_HOLD = {Drug.LENALIDOMIDE: 30.0, Drug.POMALIDOMIDE: 25.0}
CRCL_REVIEW_BELOW = 60.0  # lenalidomide, mL/min (Cockcroft-Gault)
CREATININE_REVIEW_ABOVE = 3.0  # pomalidomide, mg/dL
CBC_INTENSIVE_WEEKS = {Drug.LENALIDOMIDE: 8, Drug.POMALIDOMIDE: 8, Drug.THALIDOMIDE: 0}


@dataclass(frozen=True, slots=True)
class Indication:
    """One indication as the chart codes it (ICD-10-CM, SNOMED CT when there is a sure one)."""

    key: str
    text: str
    icd10: str
    icd10_display: str
    snomed: str | None = None
    clinical_status: str = "active"


INDICATIONS: dict[str, Indication] = {
    i.key: i
    for i in (
        Indication(
            "myeloma-maintenance",
            "Multiple myeloma in remission, maintenance after autologous stem cell transplant",
            "C90.01",
            "Multiple myeloma in remission",
            "109989006",
        ),
        Indication(
            "myeloma",
            "Multiple myeloma not having achieved remission",
            "C90.00",
            "Multiple myeloma not having achieved remission",
            "109989006",
        ),
        Indication(
            "myeloma-relapsed",
            "Relapsed and refractory multiple myeloma",
            "C90.02",
            "Multiple myeloma in relapse",
            "109989006",
            "relapse",
        ),
        Indication(
            "mds-del5q",
            "Myelodysplastic syndrome with isolated del(5q)",
            "D46.C",
            "Myelodysplastic syndrome with isolated del(5q) chromosomal abnormality",
            "109995007",
        ),
        Indication(
            "mantle-cell-lymphoma",
            "Mantle cell lymphoma, relapsed",
            "C83.18",
            "Mantle cell lymphoma, lymph nodes of multiple sites",
            "443487006",
        ),
        Indication(
            "follicular-lymphoma",
            "Follicular lymphoma, previously treated",
            "C82.98",
            "Follicular lymphoma, unspecified, lymph nodes of multiple sites",
            "308121000",
        ),
        Indication(
            "marginal-zone-lymphoma",
            "Marginal zone lymphoma (MALT), previously treated",
            "C88.4",
            "Extranodal marginal zone B-cell lymphoma of mucosa-associated lymphoid tissue [MALT-lymphoma]",
        ),
        Indication("kaposi-sarcoma-hiv", "AIDS-related Kaposi sarcoma of skin", "C46.0", "Kaposi's sarcoma of skin"),
        Indication(
            "kaposi-sarcoma", "Classic Kaposi sarcoma of skin (HIV-negative)", "C46.0", "Kaposi's sarcoma of skin"
        ),
        Indication(
            "erythema-nodosum-leprosum",
            "Erythema nodosum leprosum (lepromatous leprosy)",
            "A30.5",
            "Lepromatous leprosy",
        ),
    )
}

# (drug, indication, weight) per population: adults who cannot get pregnant and men (mostly myeloma,
# lenalidomide maintenance first), women who can get pregnant (younger: ENL, Kaposi, lymphoma, some
# myeloma), children (thalidomide for erythema nodosum leprosum).
_ADULT_MIX: tuple[tuple[Drug, str, float], ...] = (
    (Drug.LENALIDOMIDE, "myeloma-maintenance", 0.37),
    (Drug.LENALIDOMIDE, "myeloma", 0.17),
    (Drug.LENALIDOMIDE, "mds-del5q", 0.06),
    (Drug.LENALIDOMIDE, "mantle-cell-lymphoma", 0.035),
    (Drug.LENALIDOMIDE, "follicular-lymphoma", 0.03),
    (Drug.LENALIDOMIDE, "marginal-zone-lymphoma", 0.02),
    (Drug.POMALIDOMIDE, "myeloma-relapsed", 0.18),
    (Drug.POMALIDOMIDE, "kaposi-sarcoma-hiv", 0.015),
    (Drug.POMALIDOMIDE, "kaposi-sarcoma", 0.01),
    (Drug.THALIDOMIDE, "myeloma", 0.08),
    (Drug.THALIDOMIDE, "erythema-nodosum-leprosum", 0.03),
)
_RP_MIX: tuple[tuple[Drug, str, float], ...] = (
    (Drug.LENALIDOMIDE, "myeloma", 0.15),
    (Drug.LENALIDOMIDE, "myeloma-maintenance", 0.15),
    (Drug.LENALIDOMIDE, "follicular-lymphoma", 0.08),
    (Drug.LENALIDOMIDE, "marginal-zone-lymphoma", 0.05),
    (Drug.POMALIDOMIDE, "myeloma-relapsed", 0.12),
    (Drug.POMALIDOMIDE, "kaposi-sarcoma-hiv", 0.15),
    (Drug.THALIDOMIDE, "myeloma", 0.05),
    (Drug.THALIDOMIDE, "erythema-nodosum-leprosum", 0.25),
)

# Ages (mean, sd, low, high) by indication for adults; clamped further by category.
_AGES: dict[str, tuple[float, float, int, int]] = {
    "myeloma-maintenance": (66, 8, 38, 86),
    "myeloma": (69, 9, 38, 90),
    "myeloma-relapsed": (70, 8, 40, 90),
    "mds-del5q": (74, 7, 50, 92),
    "mantle-cell-lymphoma": (68, 8, 40, 88),
    "follicular-lymphoma": (63, 10, 30, 88),
    "marginal-zone-lymphoma": (66, 10, 30, 88),
    "kaposi-sarcoma-hiv": (45, 9, 24, 68),
    "kaposi-sarcoma": (74, 7, 55, 92),
    "erythema-nodosum-leprosum": (38, 12, 19, 75),
}

_BLOCK_DECK: tuple[tuple[RiskCategory, int], ...] = (
    (RiskCategory.ADULT_MALE, 28),
    (RiskCategory.ADULT_FEMALE_NRP, 17),
    (RiskCategory.ADULT_FEMALE_RP, 4),
)
"""Categories of each block of 50, plus one child drawn from `_CHILD_MIX` (block 0: one of each child
category in place of one man and one NRP woman)."""
_CHILD_MIX = (
    (RiskCategory.CHILD_MALE, 0.4),
    (RiskCategory.CHILD_FEMALE_RP, 0.35),
    (RiskCategory.CHILD_FEMALE_NRP, 0.25),
)

INFUSIONS = {
    "daratumumab": "Daratumumab and hyaluronidase 1800 mg subcutaneous",
    "rituximab": "Rituximab 375 mg/m2 intravenous infusion",
}


@dataclass(frozen=True, slots=True)
class Regimen:
    """The IMiD as ordered: capsule strength, one capsule a day on days 1-`days_on` of 28."""

    dose_mg: Decimal
    days_on: int
    brand: bool
    maintenance: bool
    bedtime: bool = False

    @property
    def capsules(self) -> int:
        return self.days_on


@dataclass(frozen=True, slots=True)
class Labs:
    """Lab values by day (clinic days): `anc`/`platelets`/`hemoglobin` at each CBC, `creatinine` and
    `weight` at each visit. The values on the latest day are the ones the rules judge."""

    cbc: tuple[tuple[date, float, float, float], ...]
    """(day, ANC 10^9/L, platelets 10^9/L, hemoglobin g/dL)"""
    chemistry: tuple[tuple[date, float, float], ...]
    """(day, creatinine mg/dL, weight kg)"""


@dataclass(frozen=True, slots=True)
class NrpEvidence:
    """Why an adult woman cannot get pregnant (or, for nrp-undocumented, what falls short)."""

    kind: str
    """``menopause`` (Condition), ``menopause-age`` (Observation 42802-9), ``hysterectomy`` or
    ``oophorectomy`` (Procedure)."""
    since: date


@dataclass(frozen=True, slots=True)
class PatientPlan:
    """One synthetic patient: what was planned, and what the product must find.

    `problems` are the defects put in the chart (keys of `PROBLEMS`), or ``("clean",)``. Dates are
    clinic-local days. Fields after `expected_rules` are the timeline the FHIR renderer reads."""

    index: int
    patient_id: str
    category: RiskCategory
    sex: str
    age: int
    """Completed years on `today`."""
    birth_date: date
    drug: Drug
    indication: str
    """Key of `INDICATIONS`."""
    problems: tuple[str, ...]
    days_left: int
    """Days of supply left today (0: runs out today)."""
    runs_out: date
    cycles: int
    """IMiD prescriptions filled so far (the last one is the active order)."""
    active_order: str
    """``MedicationRequest`` id of the current (active) IMiD order."""
    prescriber_role: str
    """``PractitionerRole`` id that signs the IMiD orders."""
    prescriber: str
    """``Practitioner`` id behind `prescriber_role`."""
    antithrombotic: str | None
    """``aspirin``, ``apixaban``, ``enoxaparin`` (active), or None."""
    infusion: str | None
    """Infusion given at the cycle visits (key of `INFUSIONS`), or None."""
    last_negative_test: date | None
    """Day of the newest negative pregnancy test (patients who can get pregnant), or None."""
    today: date
    regimen: Regimen = field(repr=False)
    visits: tuple[date, ...] = field(repr=False)
    """Cycle visit days V_0..V_n-1 (order signed that day)."""
    dispensed: tuple[date, ...] = field(repr=False)
    """Dispense days H_0..H_n-1."""
    next_visit: date | None = field(repr=False)
    """The renewal visit already done (7 or fewer days left), else None."""
    pregnancy_tests: tuple[tuple[date, bool], ...] = field(repr=False)
    """(day, positive) of each pregnancy test."""
    labs: Labs = field(repr=False)
    infusions: tuple[tuple[date, str], ...] = field(repr=False)
    """(day, status ``fulfilled``/``booked``) of each infusion appointment."""
    nrp_evidence: NrpEvidence | None = field(repr=False)
    hiv: bool = field(repr=False)
    stopped_aspirin: bool = field(repr=False)
    """no-prophylaxis: an aspirin order stopped in the past (else no antithrombotic ever)."""

    @property
    def clean(self) -> bool:
        return self.problems == (CLEAN,)

    @property
    def is_child(self) -> bool:
        return not self.category.is_adult

    @property
    def expected_rules(self) -> frozenset[str]:
        """Rule codes an order-sign of a renewal of the active order, signed today by the same
        prescriber, must raise: one per injected problem, plus ``early-refill`` (more than 7 days of
        supply left) and ``age-under-18`` (children)."""
        codes = {PROBLEMS[p] for p in self.problems if p != CLEAN}
        if self.days_left > DISPENSE_WHEN_DAYS_LEFT_AT_MOST:
            codes.add("early-refill")
        if self.is_child:
            codes.add("age-under-18")
        return frozenset(codes)

    @property
    def therapy_start(self) -> date:
        return self.visits[0]

    def manifest(self) -> dict[str, Any]:
        """The plan as JSON-ready data (what was planned, not the timeline)."""
        return {
            "index": self.index,
            "patient": self.patient_id,
            "category": self.category.value,
            "sex": self.sex,
            "age": self.age,
            "drug": self.drug.value,
            "indication": self.indication,
            "problems": list(self.problems),
            "expectedRules": sorted(self.expected_rules),
            "daysLeft": self.days_left,
            "runsOut": self.runs_out.isoformat(),
            "cycles": self.cycles,
            "activeOrder": self.active_order,
            "prescriberRole": self.prescriber_role,
            "antithrombotic": self.antithrombotic,
            "infusion": self.infusion,
            "lastNegativeTest": self.last_negative_test.isoformat() if self.last_negative_test else None,
        }


@dataclass(frozen=True, slots=True)
class StaffMember:
    """A practitioner of the sandbox clinic, with the one PractitionerRole the product reads."""

    practitioner_id: str
    role_id: str
    given: str
    family: str
    suffix: str
    npi: str
    taxonomy: str
    """NUCC provider taxonomy code (PractitionerRole.specialty)."""
    taxonomy_display: str
    role_code: str
    """``doctor`` or ``pharmacist`` (http://terminology.hl7.org/CodeSystem/practitioner-role)."""

    @property
    def display(self) -> str:
        return f"{self.given} {self.family}, {self.suffix}"


def _npi(base: int) -> str:
    """A 10-digit NPI with its Luhn check digit (computed over the 80840 prefix, as CMS specifies)."""
    digits = f"{base:09d}"
    total = 24  # the constant contribution of the "80840" prefix
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return digits + str((10 - total % 10) % 10)


def _staff(
    key: str, given: str, family: str, suffix: str, n: int, taxonomy: str, display: str, role: str
) -> StaffMember:
    return StaffMember(
        f"sb-prac-{key}", f"sb-role-{key}", given, family, suffix, _npi(193_400_000 + n * 7919), taxonomy, display, role
    )


STAFF: tuple[StaffMember, ...] = (
    _staff("onc1", "Helen", "Marchetti", "MD", 1, "207RH0003X", "Hematology & Oncology Physician", "doctor"),
    _staff("onc2", "Samuel", "Achebe", "MD", 2, "207RH0003X", "Hematology & Oncology Physician", "doctor"),
    _staff("onc3", "Priya", "Raman", "MD", 3, "207RX0202X", "Medical Oncology Physician", "doctor"),
    _staff("heme1", "Thomas", "Lindgren", "MD", 4, "207RH0000X", "Hematology Physician", "doctor"),
    _staff("peds1", "Laura", "Castillo", "MD", 5, "2080P0207X", "Pediatric Hematology-Oncology Physician", "doctor"),
    _staff("im1", "Robert", "Haskins", "MD", 6, "207R00000X", "Internal Medicine Physician", "doctor"),
    _staff("rph1", "Amara", "Nwosu", "PharmD", 7, "1835X0200X", "Oncology Pharmacist", "pharmacist"),
    _staff("rph2", "Kenji", "Watanabe", "PharmD", 8, "1835X0200X", "Oncology Pharmacist", "pharmacist"),
    _staff("rph3", "Sofia", "Marquez", "PharmD", 9, "1835P1200X", "Pharmacotherapy Pharmacist", "pharmacist"),
)
STAFF_BY_ROLE = {s.role_id: s for s in STAFF}
ONCOLOGISTS = tuple(s for s in STAFF if s.taxonomy in ("207RH0003X", "207RX0202X", "207RH0000X"))
PEDIATRIC_ONCOLOGIST = STAFF_BY_ROLE["sb-role-peds1"]
NON_SPECIALIST = STAFF_BY_ROLE["sb-role-im1"]
PHARMACISTS = tuple(s for s in STAFF if s.role_code == "pharmacist")


# --------------------------------------------------------------------------------------------------
# Stage 1: profiles
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Profile:
    category: RiskCategory
    drug: Drug
    indication: str
    age: int
    problems: list[str]


def _rng(seed: int, *parts: object) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`: the same on every run and platform.
    return random.Random("/".join(["imid-rems-sandbox", str(seed), *map(str, parts)]))  # noqa: S311 (not crypto)


def _pick(rng: random.Random, mix: Sequence[tuple[Drug, str, float]]) -> tuple[Drug, str]:
    drug, indication, _ = rng.choices(mix, weights=[w for _, _, w in mix])[0]
    return drug, indication


def _adult_age(rng: random.Random, indication: str, low: int, high: int) -> int:
    mean, sd, lo, hi = _AGES[indication]
    lo, hi = max(low, lo), min(high, hi)
    if not lo <= mean <= hi:  # e.g. myeloma in a woman who can get pregnant: the young end of the range
        return rng.randint(lo, hi)
    return max(lo, min(hi, round(rng.gauss(mean, sd))))


def _block_categories(seed: int, block: int) -> list[RiskCategory]:
    rng = _rng(seed, "block", block)
    deck = [c for c, n in _BLOCK_DECK for _ in range(n)]
    if block == 0:
        deck.remove(RiskCategory.ADULT_MALE)
        deck.remove(RiskCategory.ADULT_FEMALE_NRP)
        deck += [c for c, _ in _CHILD_MIX]
    else:
        deck.append(rng.choices([c for c, _ in _CHILD_MIX], weights=[w for _, w in _CHILD_MIX])[0])
    rng.shuffle(deck)
    return deck


def _fits(problem: str, category: RiskCategory, drug: Drug) -> bool:
    if problem in _TEST_PROBLEMS:
        return category.can_get_pregnant
    if problem == "missing-category":
        return category in (RiskCategory.ADULT_MALE, RiskCategory.ADULT_FEMALE_NRP)
    if problem == "nrp-undocumented":
        return category is RiskCategory.ADULT_FEMALE_NRP
    if problem in ("low-platelets", "renal"):
        return drug is not Drug.THALIDOMIDE  # thalidomide has no platelet or renal review threshold
    if problem == "brand-revlimid":
        return drug is Drug.LENALIDOMIDE
    return True


def _exclusive(problem: str, have: Sequence[str]) -> bool:
    """Whether `problem` can join `have` (one pregnancy-test problem, one CBC problem, and an NRP woman
    without a category must have the evidence that settles it)."""
    for group in (_TEST_PROBLEMS, _LAB_PROBLEMS, ("missing-category", "nrp-undocumented")):
        if problem in group and any(p in group for p in have):
            return False
    return True


def _draw_problems(rng: random.Random, category: RiskCategory, drug: Drug) -> list[str]:
    problems: list[str] = []
    if category.can_get_pregnant:
        u = rng.random()
        if u < 0.15:
            problems.append("stale-test")
        elif u < 0.22:
            problems.append("missing-test")
        elif u < 0.27:
            problems.append("positive-test")
    if rng.random() < 0.05:
        problems.append("missing-authorization")
    if category is RiskCategory.ADULT_FEMALE_NRP and rng.random() < 0.10:
        problems.append("nrp-undocumented")
    if _fits("missing-category", category, drug) and "nrp-undocumented" not in problems and rng.random() < 0.03:
        problems.append("missing-category")
    u = rng.random()
    if u < 0.06:
        problems.append("cbc-overdue")
    elif u < 0.11:
        problems.append("low-anc")
    elif u < 0.14 and _fits("low-platelets", category, drug):
        problems.append("low-platelets")
    if _fits("renal", category, drug) and rng.random() < 0.06:
        problems.append("renal")
    if rng.random() < 0.07:
        problems.append("no-prophylaxis")
    if rng.random() < 0.03:
        problems.append("non-specialist")
    if drug is Drug.LENALIDOMIDE and rng.random() < 0.10:
        problems.append("brand-revlimid")
    return problems


def _profile(seed: int, index: int, category: RiskCategory) -> _Profile:
    rng = _rng(seed, "patient", index)
    if not category.is_adult:
        drug, indication = Drug.THALIDOMIDE, "erythema-nodosum-leprosum"
        # A girl who cannot get pregnant is one before menarche.
        age = rng.randint(8, 11) if category is RiskCategory.CHILD_FEMALE_NRP else rng.randint(12, 17)
    elif category.can_get_pregnant:
        drug, indication = _pick(rng, _RP_MIX)
        age = _adult_age(rng, indication, 19, 49)
    else:
        drug, indication = _pick(rng, _ADULT_MIX)
        low = 40 if category is RiskCategory.ADULT_FEMALE_NRP else 19
        age = _adult_age(rng, indication, low, 95)
    return _Profile(category, drug, indication, age, _draw_problems(rng, category, drug))


def _block_profiles(seed: int, block: int) -> list[_Profile]:
    profiles = [_profile(seed, block * BLOCK + i, c) for i, c in enumerate(_block_categories(seed, block))]
    if block == 0:
        # Every problem at least once among the first BLOCK patients: given to the first clean patient
        # it fits (deterministic; the random draws above are unchanged).
        drawn = {p for prof in profiles for p in prof.problems}
        for problem in PROBLEMS:
            if problem in drawn:
                continue
            fitting = [
                prof
                for prof in profiles
                if _fits(problem, prof.category, prof.drug) and _exclusive(problem, prof.problems)
            ]
            chosen = next((prof for prof in fitting if not prof.problems), fitting[0] if fitting else None)
            if chosen is not None:
                chosen.problems.append(problem)
    return profiles


# --------------------------------------------------------------------------------------------------
# Stage 2: timeline
# --------------------------------------------------------------------------------------------------


def _days_left(rng: random.Random, category: RiskCategory, problems: Sequence[str]) -> int:
    if "positive-test" in problems:
        return rng.randint(1, 7)  # the test aligned with the refill came back positive
    if "stale-test" in problems:
        return rng.randint(0, 7)  # the refill is due and the aligned test was not done
    u = rng.random()
    if category.can_get_pregnant:
        # Tests every two weeks (cycle day 16) keep the newest good through the day the next fill may be
        # dispensed up to 12 days ahead; later than that the renewal would need a new test anyway.
        return rng.randint(0, 7) if u < 0.65 else rng.randint(8, 12)
    if u < 0.05:
        return 0
    if u < 0.50:
        return rng.randint(1, 7)
    if u < 0.62:
        return rng.randint(8, 10)
    return rng.randint(11, 27)


def _cycles(rng: random.Random) -> int:
    u = rng.random()
    n = 1 if u < 0.07 else 2 if u < 0.14 else rng.randint(3, 6) if u < 0.44 else rng.randint(7, 12)
    return n  # at most 12: the chart holds the last year (R2 for lymphoma is 12 cycles in all)


def _regimen(rng: random.Random, p: _Profile) -> Regimen:
    renal = "renal" in p.problems
    brand = "brand-revlimid" in p.problems
    if p.drug is Drug.LENALIDOMIDE:
        if p.indication == "myeloma-maintenance":
            mg = "5" if renal else rng.choice(("10", "10", "10", "15"))
            return Regimen(Decimal(mg), 28, brand, maintenance=True)
        if p.indication == "mds-del5q":
            return Regimen(Decimal("5" if renal else "10"), 28 if renal else 21, brand, maintenance=False)
        if renal:
            return Regimen(Decimal("10"), 28, brand, maintenance=False)
        if p.indication in ("follicular-lymphoma", "marginal-zone-lymphoma"):
            return Regimen(Decimal(rng.choice(("20", "20", "10"))), 21, brand, maintenance=False)
        return Regimen(Decimal(rng.choice(("25", "25", "25", "20", "15"))), 21, brand, maintenance=False)
    if p.drug is Drug.POMALIDOMIDE:
        mg = "3" if renal else rng.choice(("4", "4", "4", "3", "2"))
        return Regimen(Decimal(mg), 21, False, maintenance=False)
    if p.indication == "erythema-nodosum-leprosum":
        mg = "50" if p.age < 12 else rng.choice(("100", "100", "50", "200"))
        return Regimen(Decimal(mg), 28, True, maintenance=False, bedtime=True)
    return Regimen(Decimal(rng.choice(("100", "100", "50", "200"))), 28, True, maintenance=False, bedtime=True)


def _infusion(rng: random.Random, p: _Profile) -> str | None:
    if p.indication in ("myeloma", "myeloma-relapsed") and p.drug is not Drug.THALIDOMIDE:
        return "daratumumab" if rng.random() < 0.6 else None
    if p.indication == "myeloma-maintenance":
        return "daratumumab" if rng.random() < 0.15 else None
    if p.indication in ("follicular-lymphoma", "marginal-zone-lymphoma"):
        return "rituximab"
    return None


def _pregnancy_tests(
    rng: random.Random,
    problems: Sequence[str],
    visits: Sequence[date],
    dispensed: Sequence[date],
    next_visit: date | None,
    today: date,
) -> tuple[tuple[date, bool], ...]:
    """Initiation (10-14 days and the day before the first order), weekly in the first cycle, then at
    each cycle visit and on cycle day 16; the test aligned with the refill at the renewal visit."""
    if "missing-test" in problems:
        return ()
    days = {visits[0] - timedelta(days=12), visits[0]}
    days |= {dispensed[0] + timedelta(days=d) for d in (7, 15, 21)}
    for v, h in zip(visits[1:], dispensed[1:], strict=True):
        days |= {v, h + timedelta(days=15)}
    if next_visit is not None:
        days = {d for d in days if d < next_visit - timedelta(days=2)} | {next_visit}
    days = {d for d in days if d < today}
    if "stale-test" in problems:
        cutoff = today - timedelta(days=rng.randint(8, 16))
        days = {d for d in days if d <= cutoff}
    positive = next_visit if "positive-test" in problems else None
    return tuple((d, d == positive) for d in sorted(days))


def _cockcroft_gault(age: int, weight: float, creatinine: float, male: bool) -> float:
    return (140 - age) * weight * (1.0 if male else 0.85) / (72 * creatinine)


def _labs(
    rng: random.Random,
    p: _Profile,
    sex: str,
    visits: Sequence[date],
    next_visit: date | None,
    today: date,
) -> Labs:
    drug = p.drug
    visit_days = [*visits, *([next_visit] if next_visit else [])]
    cbc_days = set(visit_days)
    intensive = CBC_INTENSIVE_WEEKS[drug]
    if intensive:
        cbc_days |= {visits[0] + timedelta(weeks=j) for j in range(intensive)}
    cbc_days = {d for d in cbc_days if d < today}
    if "cbc-overdue" in p.problems:
        in_intensive = (today - visits[0]).days // 7 < intensive
        window = 7 if in_intensive else 31
        cutoff = today - timedelta(days=window + rng.randint(2, 25))
        cbc_days = {d for d in cbc_days if d <= cutoff}
    anc_floor = ANC_HOLD[drug] + 0.3
    plt_floor = PLATELET_HOLD.get(drug, 20.0) + 25
    anc0 = rng.uniform(max(anc_floor, 1.4), 4.2)
    plt0 = rng.uniform(max(plt_floor, 110), 320)
    hgb0 = rng.uniform(9.8, 14.2) if sex == "male" else rng.uniform(9.4, 13.4)
    cbc: list[tuple[date, float, float, float]] = []
    ordered = sorted(cbc_days)
    for i, d in enumerate(ordered):
        anc = max(anc_floor, anc0 + rng.uniform(-0.4, 0.4))
        plt = max(plt_floor, plt0 + rng.uniform(-25, 25))
        if i == len(ordered) - 1 and "low-anc" in p.problems:
            anc = rng.uniform(0.3, ANC_HOLD[drug] - 0.1) if drug is not Drug.POMALIDOMIDE else rng.uniform(0.2, 0.45)
        if i == len(ordered) - 1 and "low-platelets" in p.problems:
            plt = rng.uniform(12, PLATELET_HOLD[drug] - 3)
        hgb = hgb0 + rng.uniform(-0.5, 0.5)
        cbc.append((d, round(anc, 2), float(round(plt)), round(hgb, 1)))

    male = sex == "male"
    if p.category.is_adult:
        weight = max(45.0, min(135.0, rng.gauss(84, 13) if male else rng.gauss(70, 13)))
    else:
        weight = max(22.0, min(80.0, p.age * 3.4 + 8 + rng.uniform(-6, 8)))
    weight = round(weight, 1)
    chem_days = [d for d in visit_days if d < today]
    last_creat = _last_creatinine(rng, p, weight, male)
    chemistry: list[tuple[date, float, float]] = []
    for i, d in enumerate(chem_days):
        if i == len(chem_days) - 1:
            chemistry.append((d, last_creat, weight))
        else:
            drift = rng.uniform(-0.06, 0.06)
            chemistry.append((d, round(max(0.4, last_creat + drift), 2), round(weight + rng.uniform(-1.5, 1.5), 1)))
    return Labs(tuple(cbc), tuple(chemistry))


def _last_creatinine(rng: random.Random, p: _Profile, weight: float, male: bool) -> float:
    """The latest serum creatinine (mg/dL): clear of the renal review for every patient but the `renal`
    ones, whom it puts clearly beyond it (lenalidomide: CrCl 30-55 mL/min; pomalidomide: above 3.0)."""
    renal = "renal" in p.problems
    if p.drug is Drug.POMALIDOMIDE:
        high = CREATININE_REVIEW_ABOVE
        return round(rng.uniform(high + 0.2, high + 1.6) if renal else rng.uniform(0.6, high / 2), 2)
    if p.drug is Drug.THALIDOMIDE or not p.category.is_adult:
        return round(rng.uniform(0.45, 1.2) if p.category.is_adult else rng.uniform(0.35, 0.7), 2)
    # Lenalidomide: creatinine from a target clearance (Cockcroft-Gault, the product's formula).
    at_1 = _cockcroft_gault(p.age, weight, 1.0, male)  # CrCl for a creatinine of 1 mg/dL
    if renal:
        creat = at_1 / rng.uniform(30, 55)
        creat = max(creat, 0.01 + at_1 / (CRCL_REVIEW_BELOW - 3))
        return round(creat + 0.005, 2)
    creat = min(at_1 / rng.uniform(68, 115), at_1 / (CRCL_REVIEW_BELOW + 3))
    return max(0.3, round(creat - 0.005, 2))


def _nrp_evidence(rng: random.Random, p: _Profile, birth: date, today: date) -> NrpEvidence | None:
    if p.category is not RiskCategory.ADULT_FEMALE_NRP:
        return None
    if "nrp-undocumented" in p.problems:
        if p.age >= 46 and rng.random() < 0.5:
            # Menopause recorded, but too recently to count (the label needs 24 consecutive months).
            return NrpEvidence("menopause", today - timedelta(days=rng.randint(120, 600)))
        return None
    u = rng.random()
    if p.age >= 52 and u < 0.62:
        onset_age = rng.randint(46, min(55, p.age - 3))
        return NrpEvidence("menopause", _years_after(birth, onset_age) + timedelta(days=rng.randint(0, 300)))
    if p.age >= 52 and u < 0.68:
        return NrpEvidence("menopause-age", _years_after(birth, rng.randint(45, min(55, p.age - 3))))
    kind = "hysterectomy" if rng.random() < 0.7 else "oophorectomy"
    at = rng.randint(min(34, p.age - 2), p.age - 1)
    return NrpEvidence(kind, _years_after(birth, at) + timedelta(days=rng.randint(0, 200)))


def _years_after(birth: date, years: int) -> date:
    try:
        return birth.replace(year=birth.year + years)
    except ValueError:  # 29 February
        return date(birth.year + years, 3, 1)


def _birth_date(rng: random.Random, age: int, today: date) -> date:
    """A birth date giving exactly `age` completed years on `today`."""
    latest = _years_after(today, -age)  # turned `age` today at the latest
    while age_in_years(latest, today) < age:  # today is 29 February
        latest -= timedelta(days=1)
    earliest = _years_after(today, -(age + 1)) + timedelta(days=1)
    while age_in_years(earliest, today) > age:
        earliest += timedelta(days=1)
    return earliest + timedelta(days=rng.randint(0, (latest - earliest).days))


def _prescriber(rng: random.Random, p: _Profile) -> StaffMember:
    if "non-specialist" in p.problems:
        return NON_SPECIALIST
    if not p.category.is_adult:
        return PEDIATRIC_ONCOLOGIST
    return rng.choice(ONCOLOGISTS)


def _timeline(seed: int, index: int, p: _Profile, today: date) -> PatientPlan:
    rng = _rng(seed, "timeline", index)
    sex = "male" if p.category in (RiskCategory.ADULT_MALE, RiskCategory.CHILD_MALE) else "female"
    birth = _birth_date(rng, p.age, today)
    days_left = _days_left(rng, p.category, p.problems)
    n = _cycles(rng)
    dispensed = [today - timedelta(days=SUPPLY_DAYS - days_left)]
    for _ in range(n - 1):
        dispensed.append(dispensed[-1] - timedelta(days=SUPPLY_DAYS + rng.choice((-1, 0, 0, 0, 1, 2))))
    dispensed.reverse()
    visits = [h - timedelta(days=rng.choice((1, 1, 2))) for h in dispensed]
    next_visit = today - timedelta(days=rng.randint(1, 3)) if days_left <= DISPENSE_WHEN_DAYS_LEFT_AT_MOST else None
    tests = (
        _pregnancy_tests(rng, p.problems, visits, dispensed, next_visit, today) if p.category.can_get_pregnant else ()
    )
    negatives = [d for d, positive in tests if not positive]
    infusion = _infusion(rng, p)
    infusions: list[tuple[date, str]] = []
    if infusion is not None:
        given = [v for k, v in enumerate(visits) if infusion == "daratumumab" or k < 5]
        if next_visit is not None and (infusion == "daratumumab" or n < 5):
            given.append(next_visit)
        infusions = [(d, "fulfilled") for d in given]
        if next_visit is None and (infusion == "daratumumab" or n < 5):
            infusions.append((today + timedelta(days=days_left - 2), "booked"))
    antithrombotic: str | None = None
    if "no-prophylaxis" not in p.problems:
        if not p.category.is_adult:
            antithrombotic = "aspirin" if p.age >= 16 else "enoxaparin"
        else:
            antithrombotic = rng.choices(("aspirin", "apixaban", "enoxaparin"), weights=(0.65, 0.2, 0.15))[0]
    stopped_aspirin = "no-prophylaxis" in p.problems and rng.random() < 0.5
    prescriber = _prescriber(rng, p)
    patient_id = f"sb-p{index:06d}"
    return PatientPlan(
        index=index,
        patient_id=patient_id,
        category=p.category,
        sex=sex,
        age=p.age,
        birth_date=birth,
        drug=p.drug,
        indication=p.indication,
        problems=tuple(p.problems) or (CLEAN,),
        days_left=days_left,
        runs_out=today + timedelta(days=days_left),
        cycles=n,
        active_order=f"{patient_id}-rx{n - 1:02d}",
        prescriber_role=prescriber.role_id,
        prescriber=prescriber.practitioner_id,
        antithrombotic=antithrombotic,
        infusion=infusion,
        last_negative_test=max(negatives) if negatives else None,
        today=today,
        regimen=_regimen(rng, p),
        visits=tuple(visits),
        dispensed=tuple(dispensed),
        next_visit=next_visit,
        pregnancy_tests=tests,
        labs=_labs(rng, p, sex, visits, next_visit, today),
        infusions=tuple(infusions),
        nrp_evidence=_nrp_evidence(rng, p, birth, today),
        hiv=p.indication == "kaposi-sarcoma-hiv",
        stopped_aspirin=stopped_aspirin,
    )


def plan_block(seed: int, block: int, today: date, count: int = BLOCK) -> list[PatientPlan]:
    """The first `count` patients of block `block`."""
    profiles = _block_profiles(seed, block)[:count]
    return [_timeline(seed, block * BLOCK + i, p, today) for i, p in enumerate(profiles)]


def plan(patients: int, seed: int, today: date) -> list[PatientPlan]:
    """The manifest: what was planned for each of the first `patients` patients."""
    if patients < 0:
        raise ValueError(f"patients must be 0 or more, got {patients}")
    out: list[PatientPlan] = []
    for block in range((patients + BLOCK - 1) // BLOCK):
        out.extend(plan_block(seed, block, today, min(BLOCK, patients - block * BLOCK)))
    return out
