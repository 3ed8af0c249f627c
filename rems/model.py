"""Domain values: what we know about a patient and an IMiD order, as plain frozen dataclasses.

Nothing here knows FHIR. `fhir_mappings` builds these from FHIR R4 resources; the rules in
`rems.rules` read them. Every fact that came from a record carries a `source` (a FHIR-style reference
such as ``Observation/hcg-1``) so a finding can say which evidence it used.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date, datetime, tzinfo
from decimal import Decimal


class Drug(enum.StrEnum):
    """The three IMiDs under the shared REMS pattern."""

    LENALIDOMIDE = "lenalidomide"
    POMALIDOMIDE = "pomalidomide"
    THALIDOMIDE = "thalidomide"


class RiskCategory(enum.StrEnum):
    """The six REMS risk categories, one per Patient-Physician Agreement Form (seed 001)."""

    ADULT_FEMALE_RP = "adult-female-rp"
    CHILD_FEMALE_RP = "child-female-rp"
    ADULT_FEMALE_NRP = "adult-female-nrp"
    CHILD_FEMALE_NRP = "child-female-nrp"
    ADULT_MALE = "adult-male"
    CHILD_MALE = "child-male"

    @property
    def can_get_pregnant(self) -> bool:
        return self in (RiskCategory.ADULT_FEMALE_RP, RiskCategory.CHILD_FEMALE_RP)

    @property
    def is_female(self) -> bool:
        return self not in (RiskCategory.ADULT_MALE, RiskCategory.CHILD_MALE)

    @property
    def is_adult(self) -> bool:
        return self.value.startswith("adult-")

    @property
    def display(self) -> str:
        return _CATEGORY_DISPLAY[self]


_CATEGORY_DISPLAY = {
    RiskCategory.ADULT_FEMALE_RP: "Adult Female Who Can Get Pregnant",
    RiskCategory.CHILD_FEMALE_RP: "Female Child Who Can Get Pregnant",
    RiskCategory.ADULT_FEMALE_NRP: "Adult Female Who Can Not Get Pregnant",
    RiskCategory.CHILD_FEMALE_NRP: "Female Child Who Can Not Get Pregnant",
    RiskCategory.ADULT_MALE: "Adult Male",
    RiskCategory.CHILD_MALE: "Male Child",
}


class Sex(enum.StrEnum):
    FEMALE = "female"
    MALE = "male"
    UNKNOWN = "unknown"


class TestResult(enum.StrEnum):
    NEGATIVE = "negative"
    POSITIVE = "positive"
    UNREADABLE = "unreadable"
    """A result we could not interpret (indeterminate, unknown text, quantity without a unit we know).
    For a safety check this is never a pass."""


class PregnancyState(enum.StrEnum):
    PREGNANT = "pregnant"
    NOT_PREGNANT = "not-pregnant"
    UNKNOWN = "unknown"


class NrpEvidenceKind(enum.StrEnum):
    """Documented reasons a female cannot get pregnant (label language, CODES.md)."""

    HYSTERECTOMY = "hysterectomy"
    BILATERAL_OOPHORECTOMY = "bilateral-oophorectomy"
    NATURAL_MENOPAUSE = "natural-menopause"


class LabKind(enum.StrEnum):
    ANC = "anc"
    """Absolute neutrophil count, in 10^9/L (= 10^3/µL)."""
    PLATELETS = "platelets"
    """Platelets, in 10^9/L (= 10^3/µL)."""
    CREATININE = "creatinine"
    """Serum creatinine, in mg/dL."""
    WEIGHT = "weight"
    """Body weight, in kg."""


@dataclass(frozen=True)
class Sourced:
    """Where a value came from: a reference like ``MedicationRequest/123`` and a short description of
    the element (``extension rems-risk-category``, ``note text``)."""

    reference: str
    element: str


@dataclass(frozen=True)
class PatientFacts:
    reference: str
    sex: Sex
    sex_source: str
    """Which element settled the sex (``US Core sex extension``, ``birth sex``, ``gender``, ``none``)."""
    birth_date: date | None


@dataclass(frozen=True)
class Dose:
    """Dosing as far as the order states it unambiguously."""

    mg_per_day: Decimal | None
    capsules_per_day: Decimal | None
    days_on_per_cycle: int | None
    """For a cyclic schedule such as "days 1-21 of a 28-day cycle": 21; else None (continuous)."""
    cycle_days: int | None


@dataclass(frozen=True)
class SupplyDays:
    days: Decimal
    how: str
    """How we got it: ``expectedSupplyDuration``, or the quantity arithmetic in words."""


@dataclass(frozen=True)
class ImidOrder:
    """One IMiD MedicationRequest (a draft under review, or an order already in the chart)."""

    reference: str
    drug: Drug
    medication_text: str
    brand: bool
    strength_mg: Decimal | None
    status: str
    authored_on: datetime | date | None
    start: date | None
    """validityPeriod.start, else authoredOn (clinic-local date)."""
    supply: SupplyDays | None
    supply_problem: str | None
    """Why `supply` is None, in words, when it is."""
    refills: int | None
    dose: Dose
    authorization_number: str | None
    authorization_source: Sourced | None
    risk_category: RiskCategory | None
    risk_category_source: Sourced | None
    risk_category_unrecognized: str | None
    """Text that looked like a category but matched none of the six (quoted back in the finding)."""
    indications: tuple[Indication, ...]
    maintenance: bool
    requester: str | None
    prior_prescription: str | None


@dataclass(frozen=True)
class Indication:
    code: str
    """Key into the coverage dose caps: ``multiple-myeloma``, ``mds``, ``mcl``, ``mzl``, ``fl``,
    ``kaposi-sarcoma-hiv``, ``other``."""
    source: str


@dataclass(frozen=True)
class Dispense:
    reference: str
    drug: Drug
    handed_over: datetime | date
    days_supply: Decimal | None
    prescription: str | None
    """The MedicationRequest it fills (authorizingPrescription), if stated."""


@dataclass(frozen=True)
class PregnancyTest:
    reference: str
    collected: datetime | date
    """Specimen collection time; a bare date when only the day is known."""
    collected_from: str
    """``effectiveDateTime``, ``effectivePeriod.start`` or ``issued``."""
    result: TestResult
    result_text: str
    """The result as the record put it (quoted in findings)."""
    code: str
    preliminary: bool = False


@dataclass(frozen=True)
class PregnancyStatus:
    reference: str
    when: datetime | date
    state: PregnancyState


@dataclass(frozen=True)
class NrpEvidence:
    reference: str
    kind: NrpEvidenceKind
    since: date | None
    """When it happened or began (procedure date, menopause onset), if known."""
    text: str


@dataclass(frozen=True)
class LabValue:
    reference: str
    kind: LabKind
    value: Decimal
    """In the unit documented on `LabKind`."""
    when: datetime | date
    original: str
    """Value and unit as recorded, for the evidence line."""


@dataclass(frozen=True)
class OtherMedication:
    """A non-IMiD order that matters to a rule (anticoagulant / antiplatelet)."""

    reference: str
    text: str
    status: str


@dataclass(frozen=True)
class Prescriber:
    reference: str
    specialties: frozenset[str]
    """NUCC taxonomy codes from PractitionerRole.specialty (and Practitioner.qualification)."""
    specialty_text: str


@dataclass(frozen=True)
class Chart:
    """Everything about the patient beyond the orders under review."""

    imid_orders: tuple[ImidOrder, ...] = ()
    """IMiD orders already in the chart (any status except entered-in-error)."""
    dispenses: tuple[Dispense, ...] = ()
    pregnancy_tests: tuple[PregnancyTest, ...] = ()
    pregnancy_statuses: tuple[PregnancyStatus, ...] = ()
    nrp_evidence: tuple[NrpEvidence, ...] = ()
    labs: tuple[LabValue, ...] = ()
    antithrombotics: tuple[OtherMedication, ...] = ()
    """Active anticoagulant / antiplatelet orders, in the chart or in the same draft."""
    indications: tuple[Indication, ...] = ()
    """Active diagnoses that map to a coverage indication."""
    prescribers: tuple[Prescriber, ...] = ()
    regular_cycles: bool = False
    """Regular menstrual cycles documented (drives the 4- vs 2-weekly test schedule)."""
    unreadable: tuple[str, ...] = ()
    """Records we found but could not use, in words (e.g. a lab in a unit we do not know)."""
    unreadable_pregnancy_tests: tuple[str, ...] = ()
    """Pregnancy-test records we could not place in time (no usable collection date). Never a pass:
    the pregnancy rules report them when nothing else is wrong."""


@dataclass(frozen=True)
class Case:
    """One decision: the orders under review, the patient, the chart, and the clock."""

    now: datetime
    """Timezone-aware."""
    clinic_zone: tzinfo
    patient: PatientFacts
    orders: tuple[ImidOrder, ...]
    chart: Chart = field(default_factory=Chart)
    prescriber_reference: str | None = None
    """The ordering user (context.userId) when the order names no requester."""
