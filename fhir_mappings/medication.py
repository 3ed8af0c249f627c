"""MedicationRequest / MedicationDispense → IMiD facts.

IMiD recognition (RxNorm by ingredient, strength codes as helpers, display text as fallback), days'
supply, refills, dose per day, the REMS authorization number and risk category in every form
FHIR_CONTRACT.md lists, indication and maintenance for the coverage dose caps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from decimal import ROUND_CEILING, Decimal
from typing import Any, NamedTuple

from fhir_mappings.access import (
    Coding,
    Concept,
    Json,
    Quantity,
    choice,
    code,
    coding,
    concept,
    concept_value,
    concepts,
    date_time,
    decimal,
    integer,
    missing,
    obj,
    objects,
    quantity,
    reference,
    references,
    string,
)
from fhir_mappings.codes import Codes, IndicationCodes
from fhir_mappings.common import ChartCondition, codes_in, codings, concept_text, notes_text, ref
from fhir_mappings.observations import OBSERVATION_VALUES
from fhir_mappings.patient import EXTENSION_VALUES
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

_new = object.__new__

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
CAPSULE_UNITS = {
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
CAPSULE_CODES = {"CAP", "385049006", "428641000"}
DAY_UNITS: dict[str, Decimal] = {
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


_MEDICATION = frozenset({"medicationCodeableConcept", "medicationReference"})
_DOSE = frozenset({"doseRange", "doseQuantity"})


@dataclass(frozen=True)
class MedicationIdentity:
    drug: Drug
    brand: bool
    strength_mg: Decimal | None
    text: str


MedicationRead = tuple[Concept | None, str]
"""What names a medication: its CodeableConcept (inline or from the Medication referred to), and the
reference's display as fallback text."""


class UnresolvedMedication(LookupError):
    """A medicationReference that names no Medication we have and carries no display to read."""

    def __init__(self, reference: str) -> None:
        super().__init__(reference)
        self.reference = reference


class DosageRead(NamedTuple):
    """One Dosage, as far as the dose and frequency rules read it."""

    text: str | None
    patient_instruction: str | None
    timing_code: Concept | None
    frequency: int | None
    period: Decimal | None
    period_unit: str | None
    has_repeat: bool
    """`timing.repeat` states a frequency or a period."""
    doses: tuple[Quantity | None, ...]
    """`doseAndRate[].doseQuantity`, in order (None where that entry has none)."""


@dataclass(slots=True)
class OrderFields:
    """Every field of a MedicationRequest the IMiD rules act on, read (and checked) once."""

    status: str
    authored_on: datetime | date | None
    notes: list[str]
    dosages: list[DosageRead]
    validity_start: datetime | date | None
    refills: int | None
    supply_duration: Quantity | None
    quantity: Quantity | None
    identifiers: list[tuple[str | None, str | None, Concept | None]]
    """(system, value, type) of each identifier."""
    risk_extensions: list[tuple[Coding | None, str | None]]
    """(valueCoding, valueCode) of each rems-risk-category extension."""
    supporting: list[str]
    reason_codes: list[Concept]
    reason_references: list[str]
    course: Concept | None
    requester: str | None
    prior_prescription: str | None


def medication_of(resource: Json, path: str, index: ResourceIndex) -> MedicationRead:
    """The medication of a MedicationRequest / MedicationDispense (`medication[x]` is required). A
    reference resolves to a contained Medication or one in `index`; failing that its display is the
    text. Raises `UnresolvedMedication` when neither can say what the drug is."""
    v = resource.get("medicationCodeableConcept")
    if v is not None and "medicationReference" not in resource:  # the common case, quickly
        return concept_value(v, path, "medicationCodeableConcept"), ""
    which = choice(resource, path, _MEDICATION)
    if which is None:
        missing(f"{path}.medication[x]", "medicationCodeableConcept or medicationReference")
    if which == "medicationCodeableConcept":
        return concept(resource, which, path, required=True), ""
    mref = obj(resource, which, path, required=True)
    rpath = f"{path}.{which}"
    target_ref = string(mref, "reference", rpath)
    display = string(mref, "display", rpath) or ""
    target = index.resolve(target_ref, resource, path)
    if target is not None and target["resourceType"] == "Medication":
        return concept(target, "code", index.path_of(target)), display
    if display:
        return None, display
    raise UnresolvedMedication(target_ref or "(no reference)")


def _dosage(d: Json, path: str) -> DosageRead:
    timing = obj(d, "timing", path)
    tpath = f"{path}.timing"
    timing_code = concept(timing, "code", tpath) if timing is not None else None
    repeat = obj(timing, "repeat", tpath) if timing is not None else None
    frequency = period = unit = None
    if repeat is not None:
        rpath = f"{tpath}.repeat"
        frequency = integer(repeat, "frequency", rpath, minimum=1)
        period = decimal(repeat, "period", rpath)
        unit = code(repeat, "periodUnit", rpath)
    doses: list[Quantity | None] = []
    for dr, drpath in objects(d, "doseAndRate", path):
        which = choice(dr, drpath, _DOSE)
        doses.append(quantity(dr, "doseQuantity", drpath) if which == "doseQuantity" else None)
    return DosageRead(
        string(d, "text", path),
        string(d, "patientInstruction", path),
        timing_code,
        frequency,
        period,
        unit,
        frequency is not None or period is not None,
        tuple(doses),
    )


def read_order(mr: Json, path: str) -> OrderFields:
    """Read (and so check) every MedicationRequest field the IMiD rules act on."""
    dispense = obj(mr, "dispenseRequest", path)
    dpath = f"{path}.dispenseRequest"
    validity = obj(dispense, "validityPeriod", dpath) if dispense is not None else None
    identifiers = [
        (string(i, "system", ipath), string(i, "value", ipath), concept(i, "type", ipath))
        for i, ipath in objects(mr, "identifier", path)
    ]
    risk: list[tuple[Coding | None, str | None]] = []
    for ext, epath in objects(mr, "extension", path):
        if string(ext, "url", epath, required=True) == RISK_CATEGORY_EXTENSION:
            which = choice(ext, epath, EXTENSION_VALUES)
            risk.append(
                (
                    coding(ext, "valueCoding", epath) if which == "valueCoding" else None,
                    code(ext, "valueCode", epath) if which == "valueCode" else None,
                )
            )
    return OrderFields(
        code(mr, "status", path, required=True),
        date_time(mr, "authoredOn", path),
        notes_text(mr, path),
        [_dosage(d, dp) for d, dp in objects(mr, "dosageInstruction", path)],
        date_time(validity, "start", f"{dpath}.validityPeriod") if validity is not None else None,
        integer(dispense, "numberOfRepeatsAllowed", dpath, minimum=0) if dispense is not None else None,
        quantity(dispense, "expectedSupplyDuration", dpath) if dispense is not None else None,
        quantity(dispense, "quantity", dpath) if dispense is not None else None,
        identifiers,
        risk,
        references(mr, "supportingInformation", path),
        concepts(mr, "reasonCode", path),
        references(mr, "reasonReference", path),
        concept(mr, "courseOfTherapyType", path),
        reference(mr, "requester", path),
        reference(mr, "priorPrescription", path),
    )


def check_order(mr: Json, path: str) -> None:
    """A draft order is read whole, IMiD or not: a malformed order under review is an error, never
    "no cards". (Chart orders are read only as far as the rules need.) The medication is read as
    written, without resolving a reference."""
    which = choice(mr, path, _MEDICATION)
    if which is None:
        missing(f"{path}.medication[x]", "medicationCodeableConcept or medicationReference")
    if which == "medicationCodeableConcept":
        concept(mr, which, path)
    else:
        mref = obj(mr, which, path, required=True)
        string(mref, "reference", f"{path}.{which}")
        string(mref, "display", f"{path}.{which}")
    read_order(mr, path)


_IDENTITIES: dict[tuple[object, ...], tuple[Codes, MedicationIdentity | None]] = {}
"""`identify_imid` by what it reads (codings, text, fallback): a chart names the same few products over
and over (every order and dispense of a course). Bounded: cleared when full."""
_CACHE_MAX = 4096


def identify_imid(concept_: Concept | None, codes: Codes, fallback_text: str = "") -> MedicationIdentity | None:
    """Which IMiD a medication concept names: RxNorm codes first, then text."""
    if concept_ is None:
        key: tuple[object, ...] = (id(codes), None, None, fallback_text)
    else:
        key = (id(codes), concept_.codings, concept_.text, fallback_text)
    hit = _IDENTITIES.get(key)
    if hit is not None and hit[0] is codes:
        return hit[1]
    found = _identify(concept_, codes, fallback_text)
    if len(_IDENTITIES) >= _CACHE_MAX:
        _IDENTITIES.clear()
    _IDENTITIES[key] = (codes, found)
    return found


def _identify(concept_: Concept | None, codes: Codes, fallback_text: str) -> MedicationIdentity | None:
    text = concept_text(concept_) or fallback_text
    low = text.lower()
    rx = codes_in(concept_, codes.rxnorm)
    for imid in codes.imids:
        strength: Decimal | None = None
        brand = False
        matched = False
        for code_ in rx:
            if code_ in imid.generic:
                matched, strength = True, strength or imid.generic[code_]
            elif code_ in imid.brand:
                matched, brand, strength = True, True, strength or imid.brand[code_]
        if not matched and imid.text_terms.found_in(low):
            matched = True
        if not matched:
            continue
        brand = brand or imid.brand_terms.found_in(low)
        if strength is None:
            m = _STRENGTH.search(text)
            strength = Decimal(m.group(1)) if m else None
        return MedicationIdentity(imid.drug, brand, strength, text or imid.drug.value)
    return None


def is_capsule(unit: str, code: str) -> bool:
    """A quantity in capsules, by its unit and code (no unit and no code at all counts as capsules).
    The refill writer uses the same test, so what it writes reads back the same way."""
    unit = unit.strip().lower()
    if code in CAPSULE_CODES or code.lower() in CAPSULE_UNITS:
        return True
    return unit in CAPSULE_UNITS or (not unit and not code)


def _is_capsule_unit(q: Quantity) -> bool:
    return is_capsule(q.unit or "", q.code or "")


def _instruction_text(order: OrderFields) -> str:
    parts = list(order.notes)
    for d in order.dosages:
        parts.extend(x for x in (d.text, d.patient_instruction) if x)
        if d.timing_code is not None:
            parts.append(concept_text(d.timing_code))
    return "\n".join(parts)


def _doses_per_day(order: OrderFields, text: str) -> Decimal | None:
    for d in order.dosages:
        if d.has_repeat:
            freq = Decimal(d.frequency or 1)
            period = d.period or Decimal(1)
            unit_days = DAY_UNITS.get((d.period_unit or "d").lower())
            if unit_days is None or period <= 0:
                return None
            return freq / (period * unit_days)
    for pattern, per_day in _FREQUENCY_TEXT:
        if pattern.search(text):
            return per_day
    return None


def _dose(order: OrderFields, strength: Decimal | None, text: str) -> Dose:
    per_day = _doses_per_day(order, text)
    caps_per_dose: Decimal | None = None
    mg_per_dose: Decimal | None = None
    for d in order.dosages:
        for q in d.doses:
            if q is None or q.value is None:
                continue
            unit = (q.unit or q.code or "").strip().lower()
            if unit in ("mg", "milligram", "milligrams"):
                mg_per_dose = q.value
            elif unit and _is_capsule_unit(q):
                caps_per_dose = q.value
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


def _supply_stated(esd: Quantity | None) -> tuple[SupplyDays | None, str | None] | None:
    """The supply from `expectedSupplyDuration`, when it states one (else None: work it out)."""
    if esd is None or esd.value is None:
        return None
    unit = (esd.code or esd.unit or "d").strip().lower()
    factor = DAY_UNITS.get(unit)
    if factor is None:
        return None, f"expectedSupplyDuration unit {esd.code or esd.unit!r} not understood"
    return SupplyDays(esd.value * factor, "expectedSupplyDuration"), None


def _supply(order: OrderFields, dose: Dose) -> tuple[SupplyDays | None, str | None]:
    stated = _supply_stated(order.supply_duration)
    if stated is not None:
        return stated
    q = order.quantity
    if q is None or q.value is None:
        return None, "no expectedSupplyDuration and no quantity"
    if not _is_capsule_unit(q):
        return None, f"quantity unit {q.unit or q.code!r} is not capsules"
    if not dose.capsules_per_day:
        return None, "no expectedSupplyDuration, and capsules a day cannot be read from the dosage"
    qty = q.value
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


def _authorization(order: OrderFields, r: str, text: str) -> tuple[str | None, Sourced | None]:
    for system, value, _ in order.identifiers:
        if system == AUTHORIZATION_SYSTEM and value:
            return value.strip(), Sourced(r, "identifier (rems-authorization system)")
    for _, value, kind in order.identifiers:
        label = concept_text(kind).lower()
        if "rems" in label and "authori" in label and value:
            return value.strip(), Sourced(r, "identifier typed REMS authorization")
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


def _category_code(code_: str | None) -> RiskCategory | None:
    try:
        return RiskCategory(code_) if code_ else None
    except ValueError:
        return None


def _risk_category(
    mr: Json, path: str, order: OrderFields, index: ResourceIndex, text: str, adult: bool | None
) -> tuple[RiskCategory | None, Sourced | None, str | None]:
    r = ref(mr)
    unrecognized: str | None = None
    for value_coding, value_code in order.risk_extensions:
        code_ = value_coding[1] if value_coding is not None else value_code
        cat = _category_code(code_)
        if cat is not None:
            return cat, Sourced(r, "extension rems-risk-category"), None
        unrecognized = str(code_ or (value_coding[2] if value_coding else None) or "empty")
    for support in order.supporting:
        target = index.resolve(support, mr, path)
        if target is None or target["resourceType"] != "Observation":
            continue
        tpath = index.path_of(target)
        which = choice(target, tpath, OBSERVATION_VALUES)
        value = concept(target, "valueCodeableConcept", tpath) if which == "valueCodeableConcept" else None
        for concept_ in (value, concept(target, "code", tpath)):
            for system, code_, _ in codings(concept_):
                if system == RISK_CATEGORY_SYSTEM:
                    cat = _category_code(code_)
                    if cat is not None:
                        return cat, Sourced(ref(target), "supportingInformation Observation"), None
                    unrecognized = unrecognized or str(code_)
    found = _category_from_text(text, adult)
    if isinstance(found, RiskCategory):
        return found, Sourced(r, "note text"), None
    return None, None, unrecognized or found


def _terms(concept_: Concept | None, codes: Codes) -> tuple[set[str], set[str], str]:
    """What an indication is matched on: ICD-10-CM codes, SNOMED codes, lower-case text."""
    return codes_in(concept_, codes.icd10cm), codes_in(concept_, codes.snomed), concept_text(concept_).lower()


def _matches(terms: tuple[set[str], set[str], str], ind: IndicationCodes) -> bool:
    icd, sct, text = terms
    return any(c.startswith(ind.icd10cm_prefix) for c in icd) or bool(sct & ind.snomed) or ind.text_terms.found_in(text)


_DIAGNOSES: dict[tuple[object, ...], tuple[Codes, tuple[str | None, bool, bool]]] = {}
"""`_diagnosis` by what it reads (codings, text); bounded like `_IDENTITIES`."""


def _diagnosis(concept_: Concept | None, codes: Codes) -> tuple[str | None, bool, bool]:
    """(the first coverage indication a diagnosis matches, if any; Kaposi sarcoma; HIV)."""
    if concept_ is None:
        key: tuple[object, ...] = (id(codes), None, None)
    else:
        key = (id(codes), concept_.codings, concept_.text)
    hit = _DIAGNOSES.get(key)
    if hit is not None and hit[0] is codes:
        return hit[1]
    terms = _terms(concept_, codes)
    indication = next((ind.key for ind in codes.indications if _matches(terms, ind)), None)
    found = (indication, _matches(terms, codes.kaposi), _matches(terms, codes.hiv))
    if len(_DIAGNOSES) >= _CACHE_MAX:
        _DIAGNOSES.clear()
    _DIAGNOSES[key] = (codes, found)
    return found


def _indications(concepts_: list[Concept | None], codes: Codes, source: str) -> list[Indication]:
    out: list[Indication] = []
    for concept_ in concepts_:
        key = _diagnosis(concept_, codes)[0]
        if key is not None:
            out.append(Indication(key, source))
    return out


def kaposi_with_hiv(concepts_: list[Concept | None], codes: Codes) -> bool:
    """HIV-related Kaposi sarcoma coded as two diagnoses (e.g. ICD-10-CM C46.9 and B20)."""
    found = [_diagnosis(c, codes) for c in concepts_]
    return any(f[1] for f in found) and any(f[2] for f in found)


def order_indications(mr: Json, path: str, order: OrderFields, index: ResourceIndex, codes: Codes) -> list[Indication]:
    found: list[Concept | None] = list(order.reason_codes)
    for reason in order.reason_references:
        target = index.resolve(reason, mr, path)
        if target is not None and target["resourceType"] == "Condition":
            found.append(concept(target, "code", index.path_of(target)))
    return _indications(found, codes, ref(mr))


def condition_indications(conditions: list[ChartCondition], codes: Codes) -> list[Indication]:
    """Coverage indications of Conditions already filtered to those in effect."""
    out: list[Indication] = []
    for cond in conditions:
        out.extend(_indications([cond.code], codes, cond.ref))
    return out


def imid_order(
    mr: Json,
    path: str,
    index: ResourceIndex,
    codes: Codes,
    zone: tzinfo,
    adult: bool | None,
    medication: MedicationRead | None = None,
) -> ImidOrder | None:
    """The IMiD facts of a MedicationRequest, or None when it is not an IMiD (then only its medication
    has been read). `medication`: what `medication_of` already read, if the caller has it."""
    concept_, fallback = medication if medication is not None else medication_of(mr, path, index)
    ident = identify_imid(concept_, codes, fallback)
    if ident is None:
        return None
    return _imid_order(mr, path, index, codes, zone, adult, ident)


def _imid_order(
    mr: Json, path: str, index: ResourceIndex, codes: Codes, zone: tzinfo, adult: bool | None, ident: MedicationIdentity
) -> ImidOrder:
    order = read_order(mr, path)
    text = _instruction_text(order)
    dose = _dose(order, ident.strength_mg, text)
    supply, problem = _supply(order, dose)
    r = ref(mr)
    auth, auth_src = _authorization(order, r, text)
    category, cat_src, unrecognized = _risk_category(mr, path, order, index, text, adult)
    start_m = order.validity_start or order.authored_on
    reasons = " ".join([concept_text(order.reason_codes), concept_text(order.course), text]).lower()
    return ImidOrder(
        reference=r,
        drug=ident.drug,
        medication_text=ident.text,
        brand=ident.brand,
        strength_mg=ident.strength_mg,
        status=order.status,
        authored_on=order.authored_on,
        start=local_day(start_m, zone) if start_m is not None else None,
        supply=supply,
        supply_problem=problem,
        refills=order.refills,
        dose=dose,
        authorization_number=auth,
        authorization_source=auth_src,
        risk_category=category,
        risk_category_source=cat_src,
        risk_category_unrecognized=unrecognized,
        indications=tuple(order_indications(mr, path, order, index, codes)),
        maintenance=codes.maintenance_terms.found_in(reasons),
        requester=order.requester,
        prior_prescription=order.prior_prescription,
    )


def antithrombotic(mr: Json, path: str, medication: MedicationRead, codes: Codes) -> OtherMedication | None:
    """An anticoagulant or antiplatelet order (by RxNorm code or name), from its medication as read."""
    concept_, fallback = medication
    rx = codes_in(concept_, codes.rxnorm)
    text = concept_text(concept_) or fallback
    if rx & codes.antithrombotic_rxnorm or codes.antithrombotic_terms.found_in(text.lower()):
        return OtherMedication(ref(mr), text or "antithrombotic", str(code(mr, "status", path, required=True)))
    return None


def imid_dispense(md: Json, path: str, index: ResourceIndex, codes: Codes) -> Dispense | None:
    """A completed IMiD dispense; others (in-progress, cancelled…) supply nothing."""
    if code(md, "status", path, required=True) != "completed":
        return None
    try:
        concept_, fallback = medication_of(md, path, index)
    except UnresolvedMedication:
        return None
    ident = identify_imid(concept_, codes, fallback)
    if ident is None:
        return None
    handed = date_time(md, "whenHandedOver", path)
    if handed is None:
        return None
    days: Decimal | None = None
    supply = quantity(md, "daysSupply", path)
    if supply is not None and supply.value is not None:
        factor = DAY_UNITS.get((supply.code or supply.unit or "d").strip().lower())
        days = supply.value * factor if factor is not None else None
    prescriptions = references(md, "authorizingPrescription", path)
    return Dispense(
        reference=ref(md),
        drug=ident.drug,
        handed_over=handed,
        days_supply=days,
        prescription=next(iter(prescriptions), None),
    )


_LAZY_FIELDS = (
    "supply",
    "supply_problem",
    "refills",
    "dose",
    "authorization_number",
    "authorization_source",
    "risk_category",
    "risk_category_source",
    "risk_category_unrecognized",
    "indications",
    "maintenance",
    "requester",
    "prior_prescription",
)
"""What a chart order is asked for only when a rule judges it as the current order (patient-view status)
or leans on its supply (an order in effect with no dispense on file)."""
_SUPPLY_FIELDS = ("supply", "supply_problem")
_ORDER_FIELDS = tuple(ImidOrder.__dataclass_fields__)


class ChartImidOrder(ImidOrder):
    """An IMiD order from the chart (not one under review), read in two steps.

    At once: what every rule reads of a chart order (reference, drug and medication, status,
    authoredOn, start), each checked as `imid_order` checks it. The rest (`_LAZY_FIELDS`: supply,
    dose, refills, authorization, risk category, indications...) is read whole by `imid_order`, and so
    checked, the first time any of it is asked for; a malformed field raises `InvalidInput` then. Most
    chart orders are history (dispensed, completed) whose dose and authorization no rule reads. The
    supply of an order in effect with no dispense on file is asked for alone: when the order states
    it (`expectedSupplyDuration`), only that is read.

    Equal to, hashed and shown as the `ImidOrder` with the same fields."""

    _pending: tuple[Any, ...] | None

    def __getattr__(self, name: str) -> Any:
        # Called only for an attribute not set yet: a lazy field before the second read.
        fields = self.__dict__
        pending = fields.get("_pending")
        if pending is None or name not in _LAZY_FIELDS:
            raise AttributeError(name)
        if name in _SUPPLY_FIELDS:
            mr, path = pending[0], pending[1]
            dispense = obj(mr, "dispenseRequest", path)
            stated = (
                _supply_stated(quantity(dispense, "expectedSupplyDuration", f"{path}.dispenseRequest"))
                if dispense is not None
                else None
            )
            if stated is not None:
                fields["supply"], fields["supply_problem"] = stated
                return fields[name]
        full = _imid_order(*pending)
        for f in _LAZY_FIELDS:
            fields[f] = getattr(full, f)
        fields["_pending"] = None
        return fields[name]

    def whole(self) -> ImidOrder:
        """The plain `ImidOrder` (every field read)."""
        return ImidOrder(**{f: getattr(self, f) for f in _ORDER_FIELDS})

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ImidOrder):
            return tuple(getattr(self, f) for f in _ORDER_FIELDS) == tuple(getattr(other, f) for f in _ORDER_FIELDS)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.whole())

    def __repr__(self) -> str:
        return repr(self.whole())


def chart_imid_order(
    mr: Json,
    path: str,
    index: ResourceIndex,
    codes: Codes,
    zone: tzinfo,
    adult: bool | None,
    medication: MedicationRead,
    status: str,
    reference: str,
) -> ImidOrder | None:
    """`imid_order` for an order in the chart: a `ChartImidOrder`, whose fields beyond what every rule
    reads are read when first asked for. `status` (already read) and `reference` are the order's."""
    concept_, fallback = medication
    ident = identify_imid(concept_, codes, fallback)
    if ident is None:
        return None
    dispense = obj(mr, "dispenseRequest", path)
    validity = obj(dispense, "validityPeriod", f"{path}.dispenseRequest") if dispense is not None else None
    authored_on = date_time(mr, "authoredOn", path)
    validity_start = (
        date_time(validity, "start", f"{path}.dispenseRequest.validityPeriod") if validity is not None else None
    )
    start_m = validity_start or authored_on
    order = _new(ChartImidOrder)
    order.__dict__.update(
        reference=reference,
        drug=ident.drug,
        medication_text=ident.text,
        brand=ident.brand,
        strength_mg=ident.strength_mg,
        status=status,
        authored_on=authored_on,
        start=local_day(start_m, zone) if start_m is not None else None,
        _pending=(mr, path, index, codes, zone, adult, ident),
    )
    return order
