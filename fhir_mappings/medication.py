"""MedicationRequest / MedicationDispense → IMiD facts.

IMiD recognition (RxNorm by ingredient, strength codes as helpers, display text as fallback), days'
supply, refills, dose per day, the REMS authorization number and risk category in every form
FHIR_CONTRACT.md lists, indication and maintenance for the coverage dose caps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import tzinfo
from decimal import ROUND_CEILING, Decimal
from typing import Any

from fhir.resources.R4B.medicationdispense import MedicationDispense
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.resource import Resource

from fhir_mappings.codes import Codes, IndicationCodes
from fhir_mappings.common import (
    codes_in,
    codings,
    concept_text,
    decimal,
    moment,
    notes_text,
    ref,
    reference_of,
)
from fhir_mappings.resources import ResourceIndex
from rems.model import (
    Dispense,
    Dose,
    Drug,
    ImidOrder,
    Indication,
    OtherMedication,
    RiskCategory,
    Sourced,
    SupplyDays,
)
from rems.timing import local_day

BASE = "https://imid-rems.github.io/fhir"
AUTHORIZATION_SYSTEM = f"{BASE}/sid/rems-authorization"
RISK_CATEGORY_EXTENSION = f"{BASE}/StructureDefinition/rems-risk-category"
RISK_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/rems-risk-category"

_STRENGTH = re.compile(r"(\d+(?:\.\d+)?)\s*mg\b", re.IGNORECASE)
_AUTH = re.compile(
    r"\b(?:rems\s*)?auth(?:ori[sz]ation)?\.?\s*(?:number|num|no\.?)?\s*#?\s*:?\s*#?\s*([A-Za-z0-9][A-Za-z0-9-]{3,})",
    re.IGNORECASE,
)
_CATEGORY_AFTER = re.compile(r"risk\s*category\s*[:#-]?\s*([^\n;|]*)", re.IGNORECASE)
_CYCLE = (
    re.compile(
        r"days?\s*1\s*(?:-|–|—|to|through|thru)\s*(\d+)\s*(?:of|every|q)\s*(?:each|a|every|the)?\s*"
        r"(\d+)(?![\d.])(?:[-\s]*days?)?",
        re.IGNORECASE,
    ),
    re.compile(r"(\d+)\s*days?\s*on\s*[,/;]?\s*(?:and\s*)?(\d+)\s*days?\s*off", re.IGNORECASE),
)
# Frequency from free text, most specific first; anything else we cannot read stays unknown.
_FREQUENCY_TEXT: tuple[tuple[re.Pattern[str], Decimal | None], ...] = (
    (re.compile(r"\bevery\s+other\s+day\b|\bq\.?o\.?d\b|\bweekly\b|\bas\s+needed\b|\bprn\b", re.I), None),
    (re.compile(r"\b(?:three\s+times|3\s*times|tid|t\.i\.d\.?)\b", re.I), Decimal(3)),
    (re.compile(r"\b(?:twice|two\s+times|2\s*times|bid|b\.i\.d\.?)\b", re.I), Decimal(2)),
    (
        re.compile(
            r"\b(?:once\s+(?:a\s+)?daily|daily|every\s+day|once\s+a\s+day|qd|q\.d\.?|nightly|at\s+bedtime)\b", re.I
        ),
        Decimal(1),
    ),
)
_CAPSULE_UNITS = {
    "capsule",
    "capsules",
    "capsule(s)",
    "cap",
    "caps",
    "{capsule}",
    "{capsules}",
    "{cap}",
    "{caps}",
    "{capsule(s)}",
    "ea",
    "each",
    "1",
    "{count}",
    "{unit}",
    "unit",
    "units",
}
_CAPSULE_CODES = {"CAP", "385049006", "428641000"}
_DAY_UNITS: dict[str, Decimal] = {
    "d": Decimal(1),
    "day": Decimal(1),
    "days": Decimal(1),
    "wk": Decimal(7),
    "week": Decimal(7),
    "weeks": Decimal(7),
    "mo": Decimal(30),
    "month": Decimal(30),
    "months": Decimal(30),
    "h": Decimal(1) / 24,
    "hour": Decimal(1) / 24,
    "hours": Decimal(1) / 24,
}

# Names on the REMS forms (longest first so "can not" wins over "can"), then the older names. Older
# names carry no age: the patient's age picks adult or child (adult if the age is unknown).
_CATEGORY_NAMES: tuple[tuple[re.Pattern[str], RiskCategory | str], ...] = tuple(
    (re.compile(p, re.IGNORECASE), c)
    for p, c in (
        (r"adult[-\s]female[-\s]nrp\b", RiskCategory.ADULT_FEMALE_NRP),
        (r"adult[-\s]female[-\s]rp\b", RiskCategory.ADULT_FEMALE_RP),
        (r"child[-\s]female[-\s]nrp\b", RiskCategory.CHILD_FEMALE_NRP),
        (r"child[-\s]female[-\s]rp\b", RiskCategory.CHILD_FEMALE_RP),
        (
            r"adult\s+females?\s+who\s+(?:can\s*not|cannot|can't)\s+(?:get|become)\s+pregnant",
            RiskCategory.ADULT_FEMALE_NRP,
        ),
        (
            r"female\s+child(?:ren)?\s+who\s+(?:can\s*not|cannot|can't)\s+(?:get|become)\s+pregnant",
            RiskCategory.CHILD_FEMALE_NRP,
        ),
        (r"adult\s+females?\s+who\s+can\s+(?:get|become)\s+pregnant", RiskCategory.ADULT_FEMALE_RP),
        (r"female\s+child(?:ren)?\s+who\s+can\s+(?:get|become)\s+pregnant", RiskCategory.CHILD_FEMALE_RP),
        (r"\badult[-\s]males?\b", RiskCategory.ADULT_MALE),
        (r"\bmale\s+child\b|\bchild[-\s]male\b", RiskCategory.CHILD_MALE),
        (r"females?\s+not\s+of\s+reproductive\s+potential|\bfnrp\b", "female-nrp"),
        (r"females?\s+of\s+reproductive\s+potential|\bfrp\b|\bfcbp\b", "female-rp"),
        (r"\bmales?\b", "male"),
    )
)


@dataclass(frozen=True)
class MedicationIdentity:
    drug: Drug
    brand: bool
    strength_mg: Decimal | None
    text: str


class UnresolvedMedication(LookupError):
    """A medicationReference that names no Medication we have and carries no display to read."""

    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference


def _medication_concept(resource: MedicationRequest | MedicationDispense, index: ResourceIndex) -> tuple[Any, str]:
    """The medication's CodeableConcept (inline, or from the referenced Medication) and fallback text
    (the reference's display). Raises `UnresolvedMedication` when neither can say what the drug is."""
    if resource.medicationCodeableConcept is not None:
        return resource.medicationCodeableConcept, ""
    mref = resource.medicationReference
    target = index.resolve(reference_of(mref), resource)
    display = (getattr(mref, "display", None) or "") if mref is not None else ""
    if target is not None and target.get_resource_type() == "Medication":
        return getattr(target, "code", None), display
    if display or mref is None:
        return None, display
    raise UnresolvedMedication(reference_of(mref) or "(no reference)")


def identify_imid(concept: Any, codes: Codes, fallback_text: str = "") -> MedicationIdentity | None:
    """Which IMiD a medication concept names: RxNorm codes first, then text."""
    text = concept_text(concept) or fallback_text
    low = text.lower()
    rx = codes_in(concept, codes.rxnorm)
    for imid in codes.imids:
        strength: Decimal | None = None
        brand = False
        matched = False
        for code in rx:
            if code in imid.generic:
                matched, strength = True, strength or imid.generic[code]
            elif code in imid.brand:
                matched, brand, strength = True, True, strength or imid.brand[code]
        if not matched and any(t in low for t in imid.text):
            matched = True
        if not matched:
            continue
        brand = brand or any(t in low for t in imid.brand_text)
        if strength is None:
            m = _STRENGTH.search(text)
            strength = Decimal(m.group(1)) if m else None
        return MedicationIdentity(imid.drug, brand, strength, text or imid.drug.value)
    return None


def _is_capsule_unit(q: Any) -> bool:
    unit = (getattr(q, "unit", None) or "").strip().lower()
    code = getattr(q, "code", None) or ""
    if code in _CAPSULE_CODES or code.lower() in _CAPSULE_UNITS:
        return True
    return unit in _CAPSULE_UNITS or (not unit and not code)


def _instruction_text(mr: MedicationRequest) -> str:
    parts = notes_text(mr)
    for d in mr.dosageInstruction or []:
        parts.extend(x for x in (d.text, d.patientInstruction) if x)
        if d.timing is not None and d.timing.code is not None:
            parts.append(concept_text(d.timing.code))
    return "\n".join(parts)


def _doses_per_day(mr: MedicationRequest, text: str) -> Decimal | None:
    for d in mr.dosageInstruction or []:
        rep = d.timing.repeat if d.timing is not None else None
        if rep is not None and (rep.frequency is not None or rep.period is not None):
            freq = Decimal(rep.frequency or 1)
            period = decimal(rep.period) or Decimal(1)
            unit_days = _DAY_UNITS.get((rep.periodUnit or "d").lower())
            if unit_days is None or period <= 0:
                return None
            return freq / (period * unit_days)
    for pattern, per_day in _FREQUENCY_TEXT:
        if pattern.search(text):
            return per_day
    return None


def _dose(mr: MedicationRequest, strength: Decimal | None, text: str) -> Dose:
    per_day = _doses_per_day(mr, text)
    caps_per_dose: Decimal | None = None
    mg_per_dose: Decimal | None = None
    for d in mr.dosageInstruction or []:
        for dr in d.doseAndRate or []:
            q = dr.doseQuantity
            if q is None or q.value is None:
                continue
            unit = (q.unit or q.code or "").strip().lower()
            if unit in ("mg", "milligram", "milligrams"):
                mg_per_dose = decimal(q.value)
            elif unit and _is_capsule_unit(q):
                caps_per_dose = decimal(q.value)
            break
        if caps_per_dose or mg_per_dose:
            break
    if caps_per_dose is None and mg_per_dose is not None and strength:
        caps_per_dose = mg_per_dose / strength
    if mg_per_dose is None and caps_per_dose is not None and strength:
        mg_per_dose = caps_per_dose * strength
    on, cycle = None, None
    for pattern in _CYCLE:
        m = pattern.search(text)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            on, cycle = (a, b) if pattern is _CYCLE[0] else (a, a + b)
            if not (0 < on <= cycle):
                on, cycle = None, None
            break
    return Dose(
        mg_per_day=mg_per_dose * per_day if mg_per_dose is not None and per_day is not None else None,
        capsules_per_day=caps_per_dose * per_day if caps_per_dose is not None and per_day is not None else None,
        days_on_per_cycle=on,
        cycle_days=cycle,
    )


def _supply(mr: MedicationRequest, dose: Dose) -> tuple[SupplyDays | None, str | None]:
    dr = mr.dispenseRequest
    esd = dr.expectedSupplyDuration if dr is not None else None
    if esd is not None and esd.value is not None:
        unit = (esd.code or esd.unit or "d").strip().lower()
        factor = _DAY_UNITS.get(unit)
        if factor is None:
            return None, f"expectedSupplyDuration unit {esd.code or esd.unit!r} not understood"
        days = decimal(esd.value)
        if days is None:
            return None, "expectedSupplyDuration has no number"
        return SupplyDays(days * factor, "expectedSupplyDuration"), None
    q = dr.quantity if dr is not None else None
    if q is None or q.value is None:
        return None, "no expectedSupplyDuration and no quantity"
    if not _is_capsule_unit(q):
        return None, f"quantity unit {q.unit or q.code!r} is not capsules"
    if not dose.capsules_per_day:
        return None, "no expectedSupplyDuration, and capsules a day cannot be read from the dosage"
    qty = decimal(q.value) or Decimal(0)
    dose_days = (qty / dose.capsules_per_day).to_integral_value(rounding=ROUND_CEILING)
    if dose.days_on_per_cycle and dose.cycle_days:
        k, c = dose.days_on_per_cycle, dose.cycle_days
        n = int(dose_days)
        days = Decimal((n // k) * c + n % k)
        how = f"{q.value} capsules at {dose.capsules_per_day.normalize():f} a day on days 1-{k} of {c}-day cycles"
    else:
        days = dose_days
        how = f"{q.value} capsules at {dose.capsules_per_day.normalize():f} a day"
    return SupplyDays(days, how), None


def _authorization(mr: MedicationRequest, text: str) -> tuple[str | None, Sourced | None]:
    r = ref(mr)
    for ident in mr.identifier or []:
        if ident.system == AUTHORIZATION_SYSTEM and ident.value:
            return ident.value.strip(), Sourced(r, "identifier (rems-authorization system)")
    for ident in mr.identifier or []:
        label = concept_text(ident.type).lower()
        if "rems" in label and "authori" in label and ident.value:
            return ident.value.strip(), Sourced(r, "identifier typed REMS authorization")
    # A REMS-labelled number wins over any other "auth" (an insurance prior auth in the same note).
    matches = [m for m in _AUTH.finditer(text) if any(ch.isdigit() for ch in m.group(1))]
    labelled = [m for m in matches if "rems" in m.group(0).lower()]
    for m in labelled or matches:
        return m.group(1), Sourced(r, "note or dosage text")
    return None, None


def _category_from_text(text: str, adult: bool | None) -> RiskCategory | str | None:
    """A category from free text, or the unrecognized text (str) after "risk category", or None."""
    for m in _CATEGORY_AFTER.finditer(text):
        said = m.group(1).strip()
        for pattern, cat in _CATEGORY_NAMES:
            if pattern.search(said):
                if isinstance(cat, RiskCategory):
                    return cat
                grown = adult is None or adult
                return (
                    RiskCategory(f"{'adult' if grown else 'child'}-{cat}")
                    if cat != "male"
                    else (RiskCategory.ADULT_MALE if grown else RiskCategory.CHILD_MALE)
                )
        if said:
            return said[:80]
    return None


def _category_code(code: str | None) -> RiskCategory | None:
    try:
        return RiskCategory(code) if code else None
    except ValueError:
        return None


def _risk_category(
    mr: MedicationRequest, index: ResourceIndex, text: str, adult: bool | None
) -> tuple[RiskCategory | None, Sourced | None, str | None]:
    r = ref(mr)
    unrecognized: str | None = None
    for ext in mr.extension or []:
        if ext.url != RISK_CATEGORY_EXTENSION:
            continue
        code = ext.valueCoding.code if ext.valueCoding is not None else ext.valueCode
        cat = _category_code(code)
        if cat is not None:
            return cat, Sourced(r, "extension rems-risk-category"), None
        unrecognized = str(code or (ext.valueCoding.display if ext.valueCoding else None) or "empty")
    for support in mr.supportingInformation or []:
        target = index.resolve(support.reference, mr)
        if target is None or target.get_resource_type() != "Observation":
            continue
        for concept in (getattr(target, "valueCodeableConcept", None), getattr(target, "code", None)):
            for system, code, _ in codings(concept):
                if system == RISK_CATEGORY_SYSTEM:
                    cat = _category_code(code)
                    if cat is not None:
                        return cat, Sourced(ref(target), "supportingInformation Observation"), None
                    unrecognized = unrecognized or str(code)
    found = _category_from_text(text, adult)
    if isinstance(found, RiskCategory):
        return found, Sourced(r, "note text"), None
    return None, None, unrecognized or found


def _matches(concept: Any, ind: IndicationCodes, codes: Codes) -> bool:
    icd = codes_in(concept, codes.icd10cm)
    text = concept_text(concept).lower()
    return (
        any(c.startswith(p) for c in icd for p in ind.icd10cm_prefix)
        or bool(codes_in(concept, codes.snomed) & ind.snomed)
        or any(t in text for t in ind.text)
    )


def _indications(concepts: list[Any], codes: Codes, source: str) -> list[Indication]:
    out: list[Indication] = []
    for concept in concepts:
        for ind in codes.indications:
            if _matches(concept, ind, codes):
                out.append(Indication(ind.key, source))
                break
    return out


def kaposi_with_hiv(concepts: list[Any], codes: Codes) -> bool:
    """HIV-related Kaposi sarcoma coded as two diagnoses (e.g. ICD-10-CM C46.9 and B20)."""
    return any(_matches(c, codes.kaposi, codes) for c in concepts) and any(
        _matches(c, codes.hiv, codes) for c in concepts
    )


def order_indications(mr: MedicationRequest, index: ResourceIndex, codes: Codes) -> list[Indication]:
    concepts: list[Any] = list(mr.reasonCode or [])
    for reason in mr.reasonReference or []:
        target = index.resolve(reason.reference, mr)
        if target is not None and target.get_resource_type() == "Condition":
            concepts.append(getattr(target, "code", None))
    return _indications(concepts, codes, ref(mr))


def condition_indications(conditions: list[Resource], codes: Codes) -> list[Indication]:
    """Coverage indications of Conditions already filtered to those in effect."""
    out: list[Indication] = []
    for cond in conditions:
        out.extend(_indications([getattr(cond, "code", None)], codes, ref(cond)))
    return out


def imid_order(
    mr: MedicationRequest,
    index: ResourceIndex,
    codes: Codes,
    zone: tzinfo,
    adult: bool | None,
) -> ImidOrder | None:
    """The IMiD facts of a MedicationRequest, or None when it is not an IMiD."""
    concept, fallback = _medication_concept(mr, index)
    ident = identify_imid(concept, codes, fallback)
    if ident is None:
        return None
    text = _instruction_text(mr)
    dose = _dose(mr, ident.strength_mg, text)
    supply, problem = _supply(mr, dose)
    auth, auth_src = _authorization(mr, text)
    category, cat_src, unrecognized = _risk_category(mr, index, text, adult)
    authored = moment(mr.authoredOn)
    validity = mr.dispenseRequest.validityPeriod if mr.dispenseRequest is not None else None
    start_m = moment(validity.start) if validity is not None else None
    start_m = start_m or authored
    reasons = " ".join([concept_text(mr.reasonCode), concept_text(mr.courseOfTherapyType), text]).lower()
    refills = mr.dispenseRequest.numberOfRepeatsAllowed if mr.dispenseRequest is not None else None
    return ImidOrder(
        reference=ref(mr),
        drug=ident.drug,
        medication_text=ident.text,
        brand=ident.brand,
        strength_mg=ident.strength_mg,
        status=str(mr.status or "unknown"),
        authored_on=authored,
        start=local_day(start_m, zone) if start_m is not None else None,
        supply=supply,
        supply_problem=problem,
        refills=int(refills) if refills is not None else None,
        dose=dose,
        authorization_number=auth,
        authorization_source=auth_src,
        risk_category=category,
        risk_category_source=cat_src,
        risk_category_unrecognized=unrecognized,
        indications=tuple(order_indications(mr, index, codes)),
        maintenance=any(t in reasons for t in codes.maintenance_text),
        requester=reference_of(mr.requester),
        prior_prescription=reference_of(mr.priorPrescription),
    )


def antithrombotic(mr: MedicationRequest, index: ResourceIndex, codes: Codes) -> OtherMedication | None:
    try:
        concept, fallback = _medication_concept(mr, index)
    except UnresolvedMedication:
        return None
    rx = codes_in(concept, codes.rxnorm)
    text = concept_text(concept) or fallback
    if rx & codes.antithrombotic_rxnorm or any(t in text.lower() for t in codes.antithrombotic_text):
        return OtherMedication(ref(mr), text or "antithrombotic", str(mr.status))
    return None


def imid_dispense(md: MedicationDispense, index: ResourceIndex, codes: Codes) -> Dispense | None:
    """A completed IMiD dispense; others (in-progress, cancelled…) supply nothing."""
    if md.status != "completed":
        return None
    try:
        concept, fallback = _medication_concept(md, index)
    except UnresolvedMedication:
        return None
    ident = identify_imid(concept, codes, fallback)
    if ident is None:
        return None
    handed = moment(md.whenHandedOver)
    if handed is None:
        return None
    days: Decimal | None = None
    if md.daysSupply is not None and md.daysSupply.value is not None:
        factor = _DAY_UNITS.get((md.daysSupply.code or md.daysSupply.unit or "d").strip().lower())
        value = decimal(md.daysSupply.value)
        days = value * factor if factor is not None and value is not None else None
    prescriptions = [reference_of(p) for p in md.authorizingPrescription or []]
    return Dispense(
        reference=ref(md),
        drug=ident.drug,
        handed_over=handed,
        days_supply=days,
        prescription=next((p for p in prescriptions if p), None),
    )
