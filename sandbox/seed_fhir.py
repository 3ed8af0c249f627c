"""Plans → FHIR R4 resources (plain dicts), in exactly the shapes `fhir_mappings` reads.

- IMiD orders: RxNorm (`fhir_mappings/data/codes.toml`), the REMS risk category as the
  ``rems-risk-category`` extension and the authorization number as an identifier in the
  ``rems-authorization`` system, both also in a note (FHIR_CONTRACT.md: what the product writes), 28
  days' supply, no refills, a cycle in the dosage text ("days 1-21 of each 28-day cycle").
- Dispenses: ``whenHandedOver`` + ``daysSupply`` (28 d), ``authorizingPrescription``.
- Observations: LOINC codes of codes.toml (hCG, ANC, platelets, creatinine, weight, age at menopause),
  results the way labs send them (coded Negative/Positive with NEG/POS, or mIU/mL against a range).
- Evidence of "cannot get pregnant": SNOMED Procedure (hysterectomy, bilateral oophorectomy) or
  Condition (postmenopausal state) with its date.
- Prescribers: PractitionerRole with a NUCC specialty.

Times are clinic-local with the zone's offset on that day. Every resource carries the sandbox's
``synthetic`` tag. For speed, resources share constant sub-objects (codings, categories): treat them
as read-only and deep-copy one before changing it.
"""

from __future__ import annotations

import random
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from fhir_mappings.medication import AUTHORIZATION_SYSTEM, RISK_CATEGORY_EXTENSION, RISK_CATEGORY_SYSTEM
from rems.model import Drug, RiskCategory
from rems.timing import age_in_years
from sandbox.seed_plan import INDICATIONS, INFUSIONS, STAFF, STAFF_BY_ROLE, PatientPlan, StaffMember

Json = dict[str, Any]

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
NUCC = "http://nucc.org/provider-taxonomy"
NPI = "http://hl7.org/fhir/sid/us-npi"
SANDBOX = "https://imid-rems.github.io/fhir/sandbox"
MRN_SYSTEM = f"{SANDBOX}/sid/mrn"
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

SYNTHETIC_TAG: Json = {"system": f"{SANDBOX}/CodeSystem/tag", "code": "synthetic", "display": "Synthetic sandbox data"}
_META: Json = {"tag": [SYNTHETIC_TAG]}

CANCER_CENTER = "sb-org-cancer-center"
SPECIALTY_PHARMACY = "sb-org-specialty-pharmacy"
INFUSION_CENTER = "sb-loc-infusion"

# --- shared constant sub-objects -------------------------------------------------------------------


def _cc(system: str, code: str, display: str, text: str | None = None) -> Json:
    out: Json = {"coding": [{"system": system, "code": code, "display": display}]}
    if text is not None:
        out["text"] = text
    return out


_LAB = [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "Laboratory")]
_VITALS = [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "vital-signs", "Vital Signs")]
_SOCIAL = [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "social-history", "Social History")]
_COMMUNITY = [_cc("http://terminology.hl7.org/CodeSystem/medicationrequest-category", "community", "Community")]
_CONTINUOUS = _cc(
    "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy",
    "continuous",
    "Continuous long term therapy",
)
_ORAL = _cc(SNOMED, "26643006", "Oral route", "oral")
_SUBCUT = _cc(SNOMED, "34206005", "Subcutaneous route", "subcutaneous")
_ORDERED = [_cc("http://terminology.hl7.org/CodeSystem/dose-rate-type", "ordered", "Ordered")]
_DAILY: Json = {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}}
_TWICE_DAILY: Json = {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}}
_ONE_CAPSULE: Json = {
    "value": 1,
    "unit": "capsule",
    "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
    "code": "CAP",
}
_28_DAYS: Json = {"value": 28, "unit": "days", "system": UCUM, "code": "d"}
_FIRST_FILL = _cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "FF", "First Fill")
_REFILL = _cc("http://terminology.hl7.org/CodeSystem/v3-ActCode", "RF", "Refill")
_CLINICAL = {
    s: _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", s, s.capitalize())
    for s in ("active", "relapse", "remission")
}
_CONFIRMED = _cc("http://terminology.hl7.org/CodeSystem/condition-ver-status", "confirmed", "Confirmed")
_PROBLEM_LIST = [
    _cc("http://terminology.hl7.org/CodeSystem/condition-category", "problem-list-item", "Problem List Item")
]
_MR_TYPE = _cc("http://terminology.hl7.org/CodeSystem/v2-0203", "MR", "Medical Record Number")
_INTERP = {
    c: [_cc("http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation", c, d)]
    for c, d in (("NEG", "Negative"), ("POS", "Positive"), ("L", "Low"), ("H", "High"), ("LL", "Critical low"))
}
_AUTH_TYPE: Json = {"text": "REMS authorization number"}
_PHARMACY_PERFORMER = [{"actor": {"reference": f"Organization/{SPECIALTY_PHARMACY}"}}]
_SUPPLY_DAYS: Json = {"value": 28, "unit": "day", "system": UCUM, "code": "d"}


def _quantity(value: float, unit: str, code: str) -> Json:
    return {"value": value, "unit": unit, "system": UCUM, "code": code}


def _range(low: float | None, high: float | None, unit: str, code: str, text: str | None = None) -> list[Json]:
    rr: Json = {}
    if low is not None:
        rr["low"] = _quantity(low, unit, code)
    if high is not None:
        rr["high"] = _quantity(high, unit, code)
    if text is not None:
        rr["text"] = text
    return [rr]


_ANC = _cc(LOINC, "751-8", "Neutrophils [#/volume] in Blood by Automated count", "Absolute neutrophil count")
_PLT = _cc(LOINC, "777-3", "Platelets [#/volume] in Blood by Automated count", "Platelet count")
_HGB = _cc(LOINC, "718-7", "Hemoglobin [Mass/volume] in Blood", "Hemoglobin")
_CREAT = _cc(LOINC, "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "Creatinine")
_WEIGHT = _cc(LOINC, "29463-7", "Body weight", "Body weight")
_MENOPAUSE_AGE = _cc(LOINC, "42802-9", "Age at menopause", "Age at menopause")
_URINE_HCG = _cc(LOINC, "2106-3", "Choriogonadotropin (pregnancy test) [Presence] in Urine", "Urine pregnancy test")
_SERUM_HCG = _cc(
    LOINC, "21198-7", "Choriogonadotropin.beta subunit [Units/volume] in Serum or Plasma", "Serum beta-hCG"
)
_NEGATIVE = _cc(SNOMED, "260385009", "Negative", "Negative")
_POSITIVE = _cc(SNOMED, "10828004", "Positive", "Positive")
_K_UL = ("K/uL", "10*3/uL")
_ANC_RANGE = _range(1.8, 7.7, *_K_UL)
_PLT_RANGE = _range(150, 400, *_K_UL)
_HGB_RANGE = {"male": _range(13.5, 17.5, "g/dL", "g/dL"), "female": _range(12.0, 15.5, "g/dL", "g/dL")}
_CREAT_RANGE = {"male": _range(0.7, 1.3, "mg/dL", "mg/dL"), "female": _range(0.5, 1.1, "mg/dL", "mg/dL")}
_HCG_RANGE = _range(None, 5, "mIU/mL", "m[IU]/mL", "<5 mIU/mL: not pregnant")

_NRP_CODES = {
    "hysterectomy": _cc(SNOMED, "236886002", "Hysterectomy", "Hysterectomy"),
    "oophorectomy": _cc(SNOMED, "29827000", "Bilateral oophorectomy", "Bilateral oophorectomy"),
    "menopause": _cc(SNOMED, "76498008", "Postmenopausal state", "Postmenopausal state"),
}
_HIV = {
    "coding": [
        {"system": ICD10CM, "code": "B20", "display": "Human immunodeficiency virus [HIV] disease"},
        {"system": SNOMED, "code": "86406008", "display": "Human immunodeficiency virus infection"},
    ],
    "text": "HIV disease",
}

# RxNorm by strength (CODES.md). Pomalidomide strengths are not confirmed in RxNorm order: the
# ingredient code and the strength in the text, which the product reads (codes.toml).
_LENALIDOMIDE = {
    "2.5": ("1242231", "1242233"),
    "5": ("602912", "616116"),
    "10": ("602910", "616114"),
    "15": ("643712", "643714"),
    "20": ("1428947", "1429367"),
    "25": ("643720", "643722"),
}
_THALOMID = {"50": "213360", "100": "404449", "150": "700418", "200": "404450"}

_ANTITHROMBOTICS: dict[str, tuple[Json, str, Json, Json]] = {
    "aspirin": (
        _cc(RXNORM, "243670", "aspirin 81 MG Oral Tablet", "aspirin 81 mg tablet"),
        "Take 1 tablet (81 mg) by mouth daily.",
        _DAILY,
        _ORAL,
    ),
    "apixaban": (
        _cc(RXNORM, "1364435", "apixaban 2.5 MG Oral Tablet", "apixaban 2.5 mg tablet"),
        "Take 1 tablet (2.5 mg) by mouth twice daily.",
        _TWICE_DAILY,
        _ORAL,
    ),
    "enoxaparin": (
        _cc(RXNORM, "67108", "enoxaparin", "enoxaparin 40 mg/0.4 mL prefilled syringe"),
        "Inject 40 mg under the skin once daily.",
        _DAILY,
        _SUBCUT,
    ),
}
_VTE_REASON = [{"text": "Thromboprophylaxis during IMiD therapy (boxed warning: thromboembolism)"}]


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST_NAMES = {
    "male": _words(
        "James Robert John Michael David William Richard Joseph Thomas Charles Daniel Matthew Anthony Mark "
        "Donald Steven Paul Andrew Kenneth Joshua Kevin Brian George Edward Ronald Luis Carlos Wei Hiroshi "
        "Kwame"
    ),
    "female": _words(
        "Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Nancy Lisa Margaret Betty "
        "Sandra Ashley Dorothy Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Maria Rosa Mei Yuki "
        "Abena"
    ),
}
_FAMILY_NAMES = _words(
    "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez Lopez Gonzalez "
    "Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson White Harris Sanchez Clark "
    "Ramirez Lewis Robinson Walker Young Allen King Wright Scott Torres Nguyen Hill Flores Green Adams "
    "Nelson Baker Hall Rivera Campbell Mitchell Carter Roberts Okafor Mensah Kowalski Novak Rossi Tanaka "
    "Sato Cohen Murphy O'Brien"
)
_CITIES = (
    ("New Haven", "CT", "065"),
    ("Hartford", "CT", "061"),
    ("Bridgeport", "CT", "066"),
    ("Stamford", "CT", "069"),
    ("Waterbury", "CT", "067"),
    ("Providence", "RI", "029"),
    ("Springfield", "MA", "011"),
    ("White Plains", "NY", "106"),
)
_STREETS = ("Elm St", "Chapel St", "Whitney Ave", "Orange St", "Prospect St", "Main St", "Maple Ave", "Park Rd")


_MINUTES = (0, 5, 10, 15, 20, 30, 40, 45, 50)

# --- time -----------------------------------------------------------------------------------------


class Clock:
    """Clinic-local timestamps with the zone's UTC offset on that day (all sandbox times are between
    07:00 and 19:00, never in a DST change)."""

    def __init__(self, zone: str) -> None:
        self.zone = ZoneInfo(zone)
        self._offsets: dict[date, str] = {}

    def offset(self, day: date) -> str:
        off = self._offsets.get(day)
        if off is None:
            off = datetime.combine(day, time(12), self.zone).isoformat()[19:]
            self._offsets[day] = off
        return off

    def at(self, day: date, hour: int, minute: int) -> str:
        return f"{day.isoformat()}T{hour:02d}:{minute:02d}:00{self.offset(day)}"


# --- practitioners and places ---------------------------------------------------------------------


def _practitioner(s: StaffMember) -> Json:
    degree = {"MD": "Doctor of Medicine", "PharmD": "Doctor of Pharmacy"}[s.suffix]
    return {
        "resourceType": "Practitioner",
        "id": s.practitioner_id,
        "meta": _META,
        "identifier": [{"use": "official", "system": NPI, "value": s.npi}],
        "active": True,
        "name": [{"use": "official", "family": s.family, "given": [s.given], "suffix": [s.suffix]}],
        "telecom": [{"system": "email", "value": f"{s.given.lower()}.{s.family.lower()}@sandbox.example.org"}],
        "qualification": [{"code": _cc("http://terminology.hl7.org/CodeSystem/v2-0360", s.suffix, degree)}],
    }


def _practitioner_role(s: StaffMember) -> Json:
    role_display = {"doctor": "Doctor", "pharmacist": "Pharmacist"}[s.role_code]
    return {
        "resourceType": "PractitionerRole",
        "id": s.role_id,
        "meta": _META,
        "active": True,
        "practitioner": {"reference": f"Practitioner/{s.practitioner_id}", "display": s.display},
        "organization": {"reference": f"Organization/{CANCER_CENTER}"},
        "code": [_cc("http://terminology.hl7.org/CodeSystem/practitioner-role", s.role_code, role_display)],
        "specialty": [_cc(NUCC, s.taxonomy, s.taxonomy_display, s.taxonomy_display)],
        "telecom": [{"system": "phone", "value": "555-0100", "use": "work"}],
    }


def staff_resources() -> list[Json]:
    """The clinic: its two organizations, the infusion center, and every practitioner with a role."""
    out: list[Json] = [
        {
            "resourceType": "Organization",
            "id": CANCER_CENTER,
            "meta": _META,
            "active": True,
            "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")],
            "name": "Sandbox Cancer Center",
            "telecom": [{"system": "phone", "value": "555-0100", "use": "work"}],
        },
        {
            "resourceType": "Organization",
            "id": SPECIALTY_PHARMACY,
            "meta": _META,
            "active": True,
            "type": [_cc("http://terminology.hl7.org/CodeSystem/organization-type", "prov", "Healthcare Provider")],
            "name": "Sandbox REMS-Certified Specialty Pharmacy (mail order)",
            "telecom": [{"system": "phone", "value": "555-0199", "use": "work"}],
        },
        {
            "resourceType": "Location",
            "id": INFUSION_CENTER,
            "meta": _META,
            "status": "active",
            "name": "Sandbox Cancer Center Infusion Suite",
            "mode": "instance",
            "managingOrganization": {"reference": f"Organization/{CANCER_CENTER}"},
        },
    ]
    out += [_practitioner(s) for s in STAFF]
    out += [_practitioner_role(s) for s in STAFF]
    return out


# --- patients -------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _imid_concept(drug: Drug, mg: Decimal, brand: bool) -> Json:
    strength = f"{mg.normalize():f}"
    if drug is Drug.LENALIDOMIDE:
        generic, branded = _LENALIDOMIDE[strength]
        if brand:
            return _cc(
                RXNORM,
                branded,
                f"lenalidomide {strength} MG Oral Capsule [Revlimid]",
                f"Revlimid {strength} mg capsule",
            )
        return _cc(RXNORM, generic, f"lenalidomide {strength} MG Oral Capsule", f"lenalidomide {strength} mg capsule")
    if drug is Drug.THALIDOMIDE:
        return _cc(
            RXNORM,
            _THALOMID[strength],
            f"thalidomide {strength} MG Oral Capsule [Thalomid]",
            f"Thalomid {strength} mg capsule",
        )
    return _cc(RXNORM, "1369713", "pomalidomide", f"pomalidomide {strength} mg capsule")


@lru_cache(maxsize=64)
def _dosage(mg: Decimal, days_on: int, maintenance: bool, bedtime: bool) -> list[Json]:
    strength = f"{mg.normalize():f}"
    if bedtime:
        text = f"Take 1 capsule ({strength} mg) by mouth once daily at bedtime."
    else:
        text = f"Take 1 capsule ({strength} mg) by mouth once daily on days 1-{days_on} of each 28-day cycle."
        if maintenance:
            text += " Maintenance therapy."
    return [
        {
            "sequence": 1,
            "text": text,
            "timing": _DAILY,
            "route": _ORAL,
            "doseAndRate": [{"type": _ORDERED[0], "doseQuantity": _ONE_CAPSULE}],
        }
    ]


@lru_cache(maxsize=8)
def _capsules(n: int) -> Json:
    return {
        "value": n,
        "unit": "capsule",
        "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
        "code": "CAP",
    }


@lru_cache(maxsize=8)
def _category_extension(category: RiskCategory) -> list[Json]:
    return [
        {
            "url": RISK_CATEGORY_EXTENSION,
            "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": category.value, "display": category.display},
        }
    ]


def _ymd(day: date) -> str:
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


class _Patient:
    """Renders one plan; `rng` draws only what the plan leaves open (names, times, numbers)."""

    def __init__(self, plan: PatientPlan, seed: int, clock: Clock) -> None:
        self.p = plan
        self.clock = clock
        self.rng = random.Random(f"imid-rems-sandbox/{seed}/render/{plan.index}")  # noqa: S311 (not crypto)
        self.pid = plan.patient_id
        self.subject = {"reference": f"Patient/{plan.patient_id}"}
        self.out: list[Json] = []

    def at(self, day: date, hour_from: int, hour_to: int) -> str:
        """A clinic time on `day` between `hour_from`:00 and `hour_to`:50."""
        return self.clock.at(day, self.rng.randint(hour_from, hour_to), self.rng.choice(_MINUTES))

    def render(self) -> list[Json]:
        p = self.p
        self.patient()
        self.conditions()
        self.nrp_evidence()
        self.imid_orders()
        self.antithrombotic()
        for day, anc, plt, hgb in p.labs.cbc:
            self.cbc(day, anc, plt, hgb)
        for day, creat, weight in p.labs.chemistry:
            self.chemistry(day, creat, weight)
        for day, positive in p.pregnancy_tests:
            self.pregnancy_test(day, positive)
        for day, status in p.infusions:
            self.appointment(day, status)
        return self.out

    def patient(self) -> None:
        p, rng = self.p, self.rng
        city, state, zip3 = rng.choice(_CITIES)
        self.out.append(
            {
                "resourceType": "Patient",
                "id": self.pid,
                "meta": _META,
                "extension": [{"url": US_CORE_BIRTHSEX, "valueCode": "M" if p.sex == "male" else "F"}],
                "identifier": [
                    {"use": "usual", "type": _MR_TYPE, "system": MRN_SYSTEM, "value": f"SB{p.index + 1000000:07d}"}
                ],
                "active": True,
                "name": [
                    {
                        "use": "official",
                        "family": rng.choice(_FAMILY_NAMES),
                        "given": [rng.choice(_FIRST_NAMES[p.sex])],
                    }
                ],
                "telecom": [{"system": "phone", "value": f"555-01{rng.randint(0, 99):02d}", "use": "home"}],
                "gender": p.sex,
                "birthDate": p.birth_date.isoformat(),
                "address": [
                    {
                        "use": "home",
                        "line": [f"{rng.randint(10, 999)} {rng.choice(_STREETS)}"],
                        "city": city,
                        "state": state,
                        "postalCode": f"{zip3}{rng.randint(10, 99)}",
                        "country": "US",
                    }
                ],
                "managingOrganization": {"reference": f"Organization/{CANCER_CENTER}"},
            }
        )

    def conditions(self) -> None:
        p = self.p
        ind = INDICATIONS[p.indication]
        coding = [{"system": ICD10CM, "code": ind.icd10, "display": ind.icd10_display}]
        if ind.snomed:
            coding.append({"system": SNOMED, "code": ind.snomed, "display": ind.icd10_display})
        diagnosed = p.therapy_start - timedelta(days=self.rng.randint(30, 900 if "maintenance" in ind.key else 400))
        self.out.append(
            {
                "resourceType": "Condition",
                "id": f"{self.pid}-dx1",
                "meta": _META,
                "clinicalStatus": _CLINICAL[ind.clinical_status],
                "verificationStatus": _CONFIRMED,
                "category": _PROBLEM_LIST,
                "code": {"coding": coding, "text": ind.text},
                "subject": self.subject,
                "onsetDateTime": diagnosed.isoformat(),
                "recordedDate": diagnosed.isoformat(),
            }
        )
        if p.hiv:
            since = diagnosed - timedelta(days=self.rng.randint(365, 5000))
            self.out.append(
                {
                    "resourceType": "Condition",
                    "id": f"{self.pid}-dx2",
                    "meta": _META,
                    "clinicalStatus": _CLINICAL["active"],
                    "verificationStatus": _CONFIRMED,
                    "category": _PROBLEM_LIST,
                    "code": _HIV,
                    "subject": self.subject,
                    "onsetDateTime": since.isoformat(),
                    "recordedDate": since.isoformat(),
                }
            )

    def nrp_evidence(self) -> None:
        e = self.p.nrp_evidence
        if e is None:
            return
        if e.kind == "menopause":
            self.out.append(
                {
                    "resourceType": "Condition",
                    "id": f"{self.pid}-menopause",
                    "meta": _META,
                    "clinicalStatus": _CLINICAL["active"],
                    "verificationStatus": _CONFIRMED,
                    "category": _PROBLEM_LIST,
                    "code": _NRP_CODES["menopause"],
                    "subject": self.subject,
                    "onsetDateTime": e.since.isoformat(),
                    "recordedDate": max(e.since, self.p.therapy_start - timedelta(days=30)).isoformat(),
                }
            )
        elif e.kind == "menopause-age":
            years = age_in_years(self.p.birth_date, e.since)
            self.out.append(
                {
                    "resourceType": "Observation",
                    "id": f"{self.pid}-menopause-age",
                    "meta": _META,
                    "status": "final",
                    "category": _SOCIAL,
                    "code": _MENOPAUSE_AGE,
                    "subject": self.subject,
                    "effectiveDateTime": self.at(self.p.therapy_start - timedelta(days=14), 9, 16),
                    "valueQuantity": _quantity(years, "years", "a"),
                }
            )
        else:
            self.out.append(
                {
                    "resourceType": "Procedure",
                    "id": f"{self.pid}-{'hysterectomy' if e.kind == 'hysterectomy' else 'bso'}",
                    "meta": _META,
                    "status": "completed",
                    "code": _NRP_CODES[e.kind],
                    "subject": self.subject,
                    "performedDateTime": e.since.isoformat(),
                }
            )

    def imid_orders(self) -> None:
        p, rng = self.p, self.rng
        reg = p.regimen
        med = _imid_concept(p.drug, reg.dose_mg, reg.brand)
        dosage = _dosage(reg.dose_mg, reg.days_on, reg.maintenance, reg.bedtime)
        quantity = _capsules(reg.capsules)
        prescriber = STAFF_BY_ROLE[p.prescriber_role]
        requester = {"reference": f"PractitionerRole/{prescriber.role_id}", "display": prescriber.display}
        reason = [{"reference": f"Condition/{self.pid}-dx1", "display": INDICATIONS[p.indication].text}]
        last = p.cycles - 1
        previous: str | None = None
        for k, (visit, handed) in enumerate(zip(p.visits, p.dispensed, strict=True)):
            rx = f"{self.pid}-rx{k:02d}"
            auth = f"{rng.randrange(10_000_000, 100_000_000)}"
            with_auth = not (k == last and "missing-authorization" in p.problems)
            with_category = not (k == last and "missing-category" in p.problems)
            note = []
            if with_auth:
                note.append(f"REMS Authorization #: {auth}")
            if with_category:
                note.append(f"Risk category: {p.category.display}")
            order: Json = {"resourceType": "MedicationRequest", "id": rx, "meta": _META}
            if with_category:
                order["extension"] = _category_extension(p.category)
            if with_auth:
                order["identifier"] = [
                    {"use": "official", "type": _AUTH_TYPE, "system": AUTHORIZATION_SYSTEM, "value": auth}
                ]
            order.update(
                {
                    "status": "active" if k == last else "completed",
                    "intent": "order",
                    "category": _COMMUNITY,
                    "medicationCodeableConcept": med,
                    "subject": self.subject,
                    "authoredOn": self.at(visit, 13, 16),
                    "requester": requester,
                    "reasonReference": reason,
                    "courseOfTherapyType": _CONTINUOUS,
                    "note": [{"text": "\n".join(note)}],
                    "dosageInstruction": dosage,
                    "dispenseRequest": {
                        "numberOfRepeatsAllowed": 0,
                        "quantity": quantity,
                        "expectedSupplyDuration": _28_DAYS,
                        "performer": {"reference": f"Organization/{SPECIALTY_PHARMACY}"},
                    },
                }
            )
            if previous is not None:
                order["priorPrescription"] = {"reference": f"MedicationRequest/{previous}"}
            if not note:
                del order["note"]
            self.out.append(order)
            self.out.append(
                {
                    "resourceType": "MedicationDispense",
                    "id": f"{self.pid}-fill{k:02d}",
                    "meta": _META,
                    "status": "completed",
                    "medicationCodeableConcept": med,
                    "subject": self.subject,
                    "performer": _PHARMACY_PERFORMER,
                    "authorizingPrescription": [{"reference": f"MedicationRequest/{rx}"}],
                    "type": _FIRST_FILL if k == 0 else _REFILL,
                    "quantity": quantity,
                    "daysSupply": _SUPPLY_DAYS,
                    "whenPrepared": self.at(visit, 17, 18),
                    "whenHandedOver": self.at(handed, 10, 17),
                }
            )
            previous = rx

    def antithrombotic(self) -> None:
        p = self.p
        prescriber = STAFF_BY_ROLE[p.prescriber_role]
        requester = {"reference": f"PractitionerRole/{prescriber.role_id}", "display": prescriber.display}
        if p.antithrombotic is not None:
            kind, status, day = p.antithrombotic, "active", p.therapy_start
        elif p.stopped_aspirin:
            kind, status, day = "aspirin", "stopped", p.therapy_start - timedelta(days=self.rng.randint(200, 900))
        else:
            return
        med, text, timing, route = _ANTITHROMBOTICS[kind]
        self.out.append(
            {
                "resourceType": "MedicationRequest",
                "id": f"{self.pid}-vte",
                "meta": _META,
                "status": status,
                "intent": "order",
                "category": _COMMUNITY,
                "medicationCodeableConcept": med,
                "subject": self.subject,
                "authoredOn": self.at(day, 13, 16),
                "requester": requester,
                "reasonCode": _VTE_REASON,
                "dosageInstruction": [{"sequence": 1, "text": text, "timing": timing, "route": route}],
            }
        )

    def cbc(self, day: date, anc: float, plt: float, hgb: float) -> None:
        when = self.at(day, 7, 10)
        for code, suffix, value, unit, ranges, low in (
            (_ANC, "anc", anc, _K_UL, _ANC_RANGE, 1.8),
            (_PLT, "plt", plt, _K_UL, _PLT_RANGE, 150.0),
            (_HGB, "hgb", hgb, ("g/dL", "g/dL"), _HGB_RANGE[self.p.sex], _HGB_RANGE[self.p.sex][0]["low"]["value"]),
        ):
            obs: Json = {
                "resourceType": "Observation",
                "id": f"{self.pid}-{suffix}-{_ymd(day)}",
                "meta": _META,
                "status": "final",
                "category": _LAB,
                "code": code,
                "subject": self.subject,
                "effectiveDateTime": when,
                "valueQuantity": _quantity(value, *unit),
                "referenceRange": ranges,
            }
            if value < low:
                critical = (suffix == "anc" and value < 0.5) or (suffix == "plt" and value < 20)
                obs["interpretation"] = _INTERP["LL" if critical else "L"]
            self.out.append(obs)

    def chemistry(self, day: date, creat: float, weight: float) -> None:
        when = self.at(day, 7, 10)
        high = _CREAT_RANGE[self.p.sex][0]["high"]["value"]
        creatinine: Json = {
            "resourceType": "Observation",
            "id": f"{self.pid}-creat-{_ymd(day)}",
            "meta": _META,
            "status": "final",
            "category": _LAB,
            "code": _CREAT,
            "subject": self.subject,
            "effectiveDateTime": when,
            "valueQuantity": _quantity(creat, "mg/dL", "mg/dL"),
            "referenceRange": _CREAT_RANGE[self.p.sex],
        }
        if creat > high:
            creatinine["interpretation"] = _INTERP["H"]
        self.out.append(creatinine)
        self.out.append(
            {
                "resourceType": "Observation",
                "id": f"{self.pid}-weight-{_ymd(day)}",
                "meta": _META,
                "status": "final",
                "category": _VITALS,
                "code": _WEIGHT,
                "subject": self.subject,
                "effectiveDateTime": when,
                "valueQuantity": _quantity(weight, "kg", "kg"),
            }
        )

    def pregnancy_test(self, day: date, positive: bool) -> None:
        obs: Json = {
            "resourceType": "Observation",
            "id": f"{self.pid}-hcg-{_ymd(day)}",
            "meta": _META,
            "status": "final",
            "category": _LAB,
        }
        if self.rng.random() < 0.7:
            obs["code"] = _URINE_HCG
            obs["subject"] = self.subject
            obs["effectiveDateTime"] = self.at(day, 7, 10)
            obs["valueCodeableConcept"] = _POSITIVE if positive else _NEGATIVE
            obs["interpretation"] = _INTERP["POS" if positive else "NEG"]
        else:
            value = round(self.rng.uniform(180, 4200)) if positive else round(self.rng.uniform(0.5, 3.5), 1)
            obs["code"] = _SERUM_HCG
            obs["subject"] = self.subject
            obs["effectiveDateTime"] = self.at(day, 7, 10)
            obs["valueQuantity"] = _quantity(value, "mIU/mL", "m[IU]/mL")
            obs["referenceRange"] = _HCG_RANGE
        self.out.append(obs)

    def appointment(self, day: date, status: str) -> None:
        p = self.p
        infusion = p.infusion or ""
        minutes = 90 if infusion == "daratumumab" else 240
        start_hour = self.rng.randint(8, 12)
        end = datetime.combine(day, time(start_hour)) + timedelta(minutes=minutes)
        self.out.append(
            {
                "resourceType": "Appointment",
                "id": f"{self.pid}-infusion-{_ymd(day)}",
                "meta": _META,
                "status": status,
                "serviceCategory": [{"text": "Oncology infusion"}],
                "serviceType": [{"text": "Infusion"}],
                "description": f"{INFUSIONS[infusion]} (IMiD cycle visit: labs and refill aligned)",
                "start": self.clock.at(day, start_hour, 0),
                "end": self.clock.at(day, end.hour, end.minute),
                "minutesDuration": minutes,
                "participant": [
                    {"actor": self.subject, "required": "required", "status": "accepted"},
                    {
                        "actor": {"reference": f"Location/{INFUSION_CENTER}"},
                        "required": "required",
                        "status": "accepted",
                    },
                ],
            }
        )


def patient_resources(plan: PatientPlan, seed: int, clock: Clock) -> list[Json]:
    """Every resource of one planned patient."""
    return _Patient(plan, seed, clock).render()
