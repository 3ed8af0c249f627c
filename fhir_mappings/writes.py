"""What the service writes back to the EHR: FHIR R4 resources built as plain JSON dicts.

- `corrected_order(draft, supply_days=28, remove_refills=True)`: the whole draft MedicationRequest,
  corrected, for a CDS Hooks ``update`` suggestion (it keeps its ``id``: the action updates it).
- `pregnancy_test_request(...)`: a draft ``ServiceRequest`` for an hCG test, for a ``create`` suggestion.
- `next_prescription(prior, ...)`: the drafted next prescription (FHIR_CONTRACT "Refill drafts"), a NEW
  MedicationRequest for a ``create`` action or the pharmacist's conditional create.

Everything is built as dicts and lists (never rendered from JSON text) and validates with
`fhir.resources.R4B` (the contract tests check it). Inputs are never mutated: drafts are deep-copied.
Invalid arguments (an unknown risk category, a supply over 28 days, a naive datetime) raise
`ValueError`: these are programming errors of the caller, not bad EHR data.

**Quantity.** The REMS limits the *days'* supply, but a pharmacy dispenses `dispenseRequest.quantity`:
a corrected supply with the old quantity would still hand over the old amount. When the supply shrinks
and the quantity matched the old supply, it is rescaled to what the new supply needs; when the draft
continues into a new prescription, the quantity is computed for its supply. The capsule count is
computed only when it is exact: one dosage instruction with a structured daily frequency
(``timing.repeat`` every 1 day, no weekdays or dose counts), a single ``doseQuantity`` in capsules (or
in mg, divided by the single strength named in the medication text) that is a whole number of capsules,
and, when the text states a cycle ("days 1-21 of 28", "21 days on, 7 days off"), that cycle, assuming
the supply starts on day 1 of a cycle (as the reader does). N days need
``capsules_a_day × ((N // cycle) × days_on + min(N % cycle, days_on))`` capsules: 1 capsule daily for
28 days → 28; days 1-21 of 28 → 21. Anything else (text-only frequency, several dosage lines, a dose
range, a cycle mentioned but not readable, a quantity that does not match the old supply, a unit that
is not capsules) leaves the quantity as written, with a note that says it needs review.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any

from fhir_mappings.medication import (
    AUTHORIZATION_SYSTEM,
    DAY_UNITS,
    RISK_CATEGORY_EXTENSION,
    RISK_CATEGORY_SYSTEM,
    is_capsule,
)
from rems.model import RiskCategory

UCUM = "http://unitsofmeasure.org"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
REFILL_DRAFT_SYSTEM = "https://imid-rems.github.io/fhir/sid/refill-draft"
"""Identifier system of a drafted next prescription; its value makes the create conditional
(``If-None-Exist: identifier=<system>|<value>``) so a retried write never makes two prescriptions."""

REMS_MAX_SUPPLY_DAYS = 28
"""IMiD REMS: no more than a 28 days' supply (seeds 000, 001). A write never exceeds it."""
PREGNANCY_TEST_VALID_DAYS = 7
"""Default draw window of a requested pregnancy test: a test is good for 7 days (seed 000)."""

PREGNANCY_TEST_CODE = "2118-8"
PREGNANCY_TEST_DISPLAY = "Choriogonadotropin (pregnancy test) [Presence] in Serum or Plasma"
"""The test we request: serum hCG, qualitative (CODES.md "serum, qualitative"). A ServiceRequest with
a draw window is a lab order, so a serum test drawn by the lab, not a urine test the patient may take
at home; qualitative because the REMS asks for a negative / positive answer (lab serum qualitative
assays detect hCG well below the 50 mIU/mL sensitivity the labels require) and the result comes back
as a code or text our reader interprets. The same code is in the reader's pregnancy-test list."""
LABORATORY_CATEGORY = {"system": SNOMED, "code": "108252007", "display": "Laboratory procedure"}
"""US Core ServiceRequest category for a lab order."""

# --- Reading the draft (a small, strict reader of our own: the read-side mappings are not imported) --

# Capsule units and day units are the reader's own (medication.is_capsule, DAY_UNITS): what we write
# must read back the same way.
_MG_UNITS = frozenset({"mg", "milligram", "milligrams"})
_CYCLES = (
    re.compile(
        r"days?\s*1\s*(?:-|–|—|to|through|thru)\s*(\d+)\s*(?:of|every|q)\s*(?:each|a|every|the)?\s*"
        r"(\d+)(?![\d.])(?:[-\s]*days?)?",
        re.IGNORECASE,
    ),
    re.compile(r"(\d+)\s*days?\s*on\s*[,/;]?\s*(?:and\s*)?(\d+)\s*days?\s*off", re.IGNORECASE),
)
"""The cycle statements the reader understands: "days 1-21 of 28" (on, cycle); "21 days on, 7 off"."""
_CYCLE_HINT = re.compile(
    r"\bcycles?\b|\bdays?\s+(?:on|off)\b|\boff\b|\bweeks?\s+(?:on|off)\b|\bdays?\s*\d+\s*(?:-|–|—|to|through|thru)\s*\d+",
    re.IGNORECASE,
)
"""Words that say the schedule is not every day: with no readable cycle, the count is not exact."""
_STRENGTH = re.compile(r"(\d+(?:\.\d+)?)\s*mg\b", re.IGNORECASE)
_AUTH_TEXT = re.compile(
    r"\b(?:rems\s*)?auth(?:ori[sz]ation)?\.?\s*(?:number|num|no\.?)?\s*#?\s*:?\s*#?\s*([A-Za-z0-9][A-Za-z0-9-]{3,})",
    re.IGNORECASE,
)
"""An authorization number in free text, as the reader finds it (form 3 of FHIR_CONTRACT; a number
with a digit)."""
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_AUTH_VALUE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")


def _dec(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _num(x: Decimal) -> str:
    return f"{x.normalize():f}"


def _json_number(x: Decimal) -> int | float:
    return int(x) if x == x.to_integral_value() else float(x)


def _is_capsule_quantity(q: Mapping[str, Any]) -> bool:
    """The reader's test for a quantity in capsules (`medication.is_capsule`)."""
    return is_capsule(str(q.get("unit") or ""), str(q.get("code") or ""))


def _unit_of(q: Mapping[str, Any]) -> str:
    return str(q.get("unit") or q.get("code") or "").strip()


def _texts(mr: Mapping[str, Any], *, notes: bool = True) -> str:
    """Dosage text, patient instruction and timing text (and the notes): where the reader looks for a
    cycle."""
    parts: list[str] = []
    if notes:
        parts.extend(str(n.get("text")) for n in _dicts(mr.get("note")) if n.get("text"))
    for d in _dicts(mr.get("dosageInstruction")):
        parts.extend(str(d[k]) for k in ("text", "patientInstruction") if d.get(k))
        code = (d.get("timing") or {}).get("code") if isinstance(d.get("timing"), dict) else None
        if isinstance(code, dict):
            parts.append(_concept_text(code))
    return "\n".join(parts)


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _concept_text(concept: Mapping[str, Any]) -> str:
    parts = [str(concept["text"])] if concept.get("text") else []
    parts.extend(str(c["display"]) for c in _dicts(concept.get("coding")) if c.get("display"))
    return " | ".join(parts)


def _cycle(text: str) -> tuple[int, int] | str | None:
    """(days on, cycle length) when the text states a cycle; None when it mentions none; a reason when
    it mentions one we cannot read."""
    for i, pattern in enumerate(_CYCLES):
        m = pattern.search(text)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            on, length = (a, b) if i == 0 else (a, a + b)
            if not 0 < on <= length:
                return f"the cycle {m.group(0)!r} is not a cycle"
            return on, length
    if _CYCLE_HINT.search(text):
        return "the dosage text mentions a schedule that is not every day, and no cycle we can read"
    return None


def _strength(mr: Mapping[str, Any]) -> Decimal | None:
    """The capsule strength in mg when the medication text names exactly one."""
    concept = mr.get("medicationCodeableConcept")
    if not isinstance(concept, dict):
        ref = mr.get("medicationReference")
        target = ref.get("reference") if isinstance(ref, dict) else None
        contained = {c.get("id"): c for c in _dicts(mr.get("contained"))}
        med = contained.get(target[1:]) if isinstance(target, str) and target.startswith("#") else None
        concept = med.get("code") if isinstance(med, dict) else None
        if not isinstance(concept, dict):
            return None
    found = {Decimal(m.group(1)) for m in _STRENGTH.finditer(_concept_text(concept))}
    return found.pop() if len(found) == 1 else None


@dataclass(frozen=True)
class _Dosing:
    """Capsules a day on the days taken, and the cycle if any."""

    capsules_per_day: Decimal
    on_days: int | None
    cycle_days: int | None

    def capsules_for(self, days: int) -> Decimal:
        if self.on_days and self.cycle_days:
            whole, rest = divmod(days, self.cycle_days)
            dose_days = whole * self.on_days + min(rest, self.on_days)
        else:
            dose_days = days
        return self.capsules_per_day * dose_days

    def days_for(self, capsules: Decimal) -> Decimal:
        """Calendar days a quantity lasts: the reader's arithmetic (DECISIONS "Supply")."""
        n = int((capsules / self.capsules_per_day).to_integral_value(rounding=ROUND_CEILING))
        if self.on_days and self.cycle_days:
            return Decimal((n // self.on_days) * self.cycle_days + n % self.on_days)
        return Decimal(n)

    def describe(self) -> str:
        per_day = f"{_num(self.capsules_per_day)} capsule{'s' if self.capsules_per_day != 1 else ''} a day"
        if self.on_days and self.cycle_days:
            return f"{per_day} on days 1-{self.on_days} of {self.cycle_days}-day cycles"
        return per_day


def _dosing(mr: Mapping[str, Any]) -> _Dosing | str:
    """Exact dosing, or why there is none (in words, for the review note)."""
    dosages = mr.get("dosageInstruction")
    if not isinstance(dosages, list) or not dosages:
        return "the order has no dosage instruction"
    if len(dosages) != 1 or not isinstance(dosages[0], dict):
        return f"the order has {len(dosages)} dosage instructions"
    d = dosages[0]
    timing = d.get("timing")
    repeat = timing.get("repeat") if isinstance(timing, dict) else None
    if not isinstance(repeat, dict) or repeat.get("frequency") is None:
        return "the dosage states no structured daily frequency"
    for key in ("dayOfWeek", "count", "countMax", "frequencyMax", "periodMax", "duration"):
        if repeat.get(key):
            return f"timing.repeat.{key} makes the number of doses a day uncertain"
    frequency, period = _dec(repeat.get("frequency")), _dec(repeat.get("period", 1))
    if (
        frequency is None
        or frequency < 1
        or frequency != frequency.to_integral_value()
        or period != 1
        or repeat.get("periodUnit", "d") != "d"
    ):
        return "the dosage is not a whole number of doses every day"
    doses = _dicts(d.get("doseAndRate"))
    quantity = doses[0].get("doseQuantity") if len(doses) == 1 else None
    if not isinstance(quantity, dict) or _dec(quantity.get("value")) is None:
        return "the dosage states no single dose quantity"
    value = _dec(quantity.get("value")) or Decimal(0)
    unit = _unit_of(quantity)
    if unit.lower() in _MG_UNITS:
        strength = _strength(mr)
        if strength is None:
            return "the dose is in mg and the capsule strength cannot be read from the medication"
        per_dose = value / strength
    elif unit and _is_capsule_quantity(quantity):
        per_dose = value
    else:
        return f"the dose unit {unit!r} is neither capsules nor mg"
    if per_dose <= 0 or per_dose != per_dose.to_integral_value():
        return f"a dose of {_num(per_dose)} capsules is not a whole number of capsules"
    cycle = _cycle(_texts(mr))
    if isinstance(cycle, str):
        return cycle
    on, length = cycle if cycle is not None else (None, None)
    return _Dosing(per_dose * frequency, on, length)


def _supply_days(dispense: Mapping[str, Any], dosing: _Dosing | str) -> Decimal | None:
    """The days' supply the order states: expectedSupplyDuration, else its quantity at the dose."""
    esd = dispense.get("expectedSupplyDuration")
    if isinstance(esd, dict) and esd.get("value") is not None:
        factor = DAY_UNITS.get(str(esd.get("code") or esd.get("unit") or "d").strip().lower())
        value = _dec(esd.get("value"))
        return None if factor is None or value is None else value * factor
    q = dispense.get("quantity")
    value = _dec(q.get("value")) if isinstance(q, dict) else None
    if isinstance(q, dict) and value is not None and _is_capsule_quantity(q) and isinstance(dosing, _Dosing):
        return dosing.days_for(value)
    return None


def _days(n: int) -> dict[str, Any]:
    return {"value": n, "unit": "days", "system": UCUM, "code": "d"}


def _check_supply_days(supply_days: int) -> None:
    if isinstance(supply_days, bool) or not isinstance(supply_days, int):
        raise ValueError(f"supply_days must be a whole number of days, got {supply_days!r}")
    if not 1 <= supply_days <= REMS_MAX_SUPPLY_DAYS:
        raise ValueError(f"supply_days must be 1-{REMS_MAX_SUPPLY_DAYS} (IMiD REMS), got {supply_days}")


def _require_medication_request(resource: Any, name: str) -> None:
    if not isinstance(resource, Mapping) or resource.get("resourceType") != "MedicationRequest":
        raise ValueError(f"{name} must be a MedicationRequest JSON object")
    dispense = resource.get("dispenseRequest")
    if dispense is not None and not isinstance(dispense, Mapping):
        raise ValueError(f"{name}.dispenseRequest must be an object")


# --- Card suggestion: the corrected draft -----------------------------------------------------------


@dataclass(frozen=True)
class CorrectedOrder:
    """The corrected draft and what the card should say about it."""

    resource: dict[str, Any]
    """The whole MedicationRequest (same ``id``), for an ``update`` action."""
    notes: tuple[str, ...]
    """One sentence per change, and per thing the prescriber must check (e.g. the quantity)."""
    quantity_needs_review: bool
    """True when the supply shrank but the quantity could not be rescaled exactly."""


def corrected_order(
    draft: Mapping[str, Any], *, supply_days: int | None = None, remove_refills: bool = False
) -> CorrectedOrder:
    """A deep copy of the draft MedicationRequest with the REMS fixes applied; `draft` is not changed.

    - ``supply_days`` (1-28): ``dispenseRequest.expectedSupplyDuration`` becomes that many days (UCUM
      ``d``). A correction never lengthens a prescription: when the draft already states a supply of
      that many days or fewer, the supply is left and a note says so. When the quantity matched the old
      supply it is rescaled exactly (see the module docstring); when it did not, or cannot be computed,
      it is left as written and `quantity_needs_review` is set with a note.
    - ``remove_refills``: ``numberOfRepeatsAllowed`` becomes 0 (written explicitly).
    - The ``id`` (and everything else) is kept: the ``update`` action updates that very draft. The
      narrative ``text`` is dropped because it would still describe the old supply or refills.

    Raises ValueError when asked for nothing, for a supply outside 1-28 days, or when `draft` is not a
    MedicationRequest."""
    _require_medication_request(draft, "draft")
    if supply_days is None and not remove_refills:
        raise ValueError("nothing to correct: give supply_days and/or remove_refills=True")
    if supply_days is not None:
        _check_supply_days(supply_days)
    resource: dict[str, Any] = copy.deepcopy(dict(draft))
    if not isinstance(resource.get("dispenseRequest"), dict):
        resource["dispenseRequest"] = {}
    dispense: dict[str, Any] = resource["dispenseRequest"]
    notes: list[str] = []
    review = False
    if supply_days is not None:
        dosing = _dosing(draft)
        old = _supply_days(dispense, dosing)
        if old is not None and old <= supply_days:
            notes.append(f"The supply is already {_num(old)} days: left as written.")
        else:
            dispense["expectedSupplyDuration"] = _days(supply_days)
            was = f" (was {_num(old)} days)" if old is not None else ""
            notes.append(f"Supply set to {supply_days} days{was}.")
            quantity = dispense.get("quantity")
            if isinstance(quantity, dict) and _dec(quantity.get("value")) is not None:
                note, review = _rescale(quantity, old, supply_days, dosing)
                if note:
                    notes.append(note)
    if remove_refills:
        before = dispense.get("numberOfRepeatsAllowed")
        dispense["numberOfRepeatsAllowed"] = 0
        if before:
            notes.append(f"Refills removed (was {before}).")
    resource.pop("text", None)
    return CorrectedOrder(resource, tuple(notes), review)


def _rescale(quantity: dict[str, Any], old: Decimal | None, new: int, dosing: _Dosing | str) -> tuple[str | None, bool]:
    """Rescale `quantity` (in place, on the copy) from the old supply to `new` days when exact.
    Returns the note for the card and whether the quantity needs review."""
    value = _dec(quantity.get("value")) or Decimal(0)
    unit = _unit_of(quantity) or "capsules"
    written = f"{_num(value)} {unit}"
    check = f"check it covers no more than {new} days"
    if not _is_capsule_quantity(quantity):
        return f"Quantity {written} left as written: not in capsules; {check}.", True
    if isinstance(dosing, str):
        return f"Quantity {written} left as written: {dosing}; {check}.", True
    needed = dosing.capsules_for(new)
    if value == needed:
        return None, False
    if old is None or old != old.to_integral_value():
        return f"Quantity {written} left as written: the old supply could not be read; {check}.", True
    if value != dosing.capsules_for(int(old)):
        return (
            f"Quantity {written} left as written: it does not match {_num(old)} days at {dosing.describe()}; {check}.",
            True,
        )
    quantity["value"] = _json_number(needed)
    return f"Quantity {_num(value)} → {_num(needed)} {unit} ({dosing.describe()}).", False


# --- Card suggestion: the pregnancy test ------------------------------------------------------------


def pregnancy_test_request(
    *,
    patient_id: str,
    requester: str | None,
    due: date,
    reason_order: str | None,
    drug_name: str,
    window_days: int = PREGNANCY_TEST_VALID_DAYS,
) -> dict[str, Any]:
    """A draft ``ServiceRequest`` (intent order, category laboratory) for a serum hCG test
    (`PREGNANCY_TEST_CODE`, LOINC 2118-8).

    ``occurrencePeriod`` is the draw window: from `due` (the first day a test is early enough to be
    valid on the first dispense day: the rules' fix value) through `due` + `window_days` (the program's
    7-day validity; pass `config.rems.test_valid_days` for an institution override). Dates only: the
    window is in clinic days. `reason_order` (``MedicationRequest/…``) becomes ``reasonReference`` and
    `requester` (``PractitionerRole/…``) ``requester``; each is left out when None. No ``id``: the EHR
    assigns it on create."""
    _check_patient_id(patient_id)
    if window_days < 0:
        raise ValueError(f"window_days must not be negative, got {window_days}")
    name = drug_name.strip() or "IMiD"
    resource: dict[str, Any] = {
        "resourceType": "ServiceRequest",
        "status": "draft",
        "intent": "order",
        "category": [{"coding": [dict(LABORATORY_CATEGORY)]}],
        "code": {
            "coding": [{"system": LOINC, "code": PREGNANCY_TEST_CODE, "display": PREGNANCY_TEST_DISPLAY}],
            "text": "Pregnancy test (hCG), serum, qualitative",
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "occurrencePeriod": {"start": due.isoformat(), "end": (due + timedelta(days=window_days)).isoformat()},
    }
    if requester:
        resource["requester"] = {"reference": requester}
    if reason_order:
        resource["reasonReference"] = [{"reference": reason_order}]
    resource["note"] = [
        {
            "text": f"REMS ({name}): a negative pregnancy test is needed within {window_days} days before "
            f"each dispense. Collect on or after {due.isoformat()}."
        }
    ]
    return resource


def _check_patient_id(patient_id: str) -> None:
    if not isinstance(patient_id, str) or not _FHIR_ID.fullmatch(patient_id):
        raise ValueError(f"patient_id must be a FHIR id (not a reference), got {patient_id!r}")


# --- Refill draft: the next prescription ------------------------------------------------------------

_COPIED = ("category", "reasonCode", "reasonReference", "courseOfTherapyType")
"""Carried over from the prior prescription besides the medication and dosage: the indication (the
coverage dose cap reads it) and the order category. Not carried over: ``id``, ``meta``, ``text``,
``identifier`` and ``note`` (the prior's authorization number belongs to the prior), ``extension``
(written fresh), ``supportingInformation``, ``basedOn``, ``encounter``, ``validityPeriod``."""


def next_prescription(
    prior: Mapping[str, Any],
    *,
    prior_reference: str,
    patient_id: str,
    supply_days: int,
    category_code: str,
    category_display: str,
    authorization: str | None,
    draft_identifier: str,
    authored_on: datetime | None,
    requester: str | None,
) -> dict[str, Any]:
    """The drafted next prescription continuing `prior` (FHIR_CONTRACT "Refill drafts"): a NEW
    MedicationRequest, status draft, intent order, no ``id`` (the server assigns it).

    - Same ``medication[x]`` (a contained Medication it points at is carried too) and
      ``dosageInstruction`` as the prior, plus its category, reasonCode / reasonReference and
      courseOfTherapyType. An authorization number written in the prior's dosage text is removed (the
      reader would take it as this prescription's; each prescription needs its own) and a note says so.
    - ``priorPrescription`` → `prior_reference`; ``subject`` → ``Patient/<patient_id>`` (refused when
      the prior is about another patient).
    - ``dispenseRequest``: ``numberOfRepeatsAllowed`` 0, ``expectedSupplyDuration`` `supply_days`
      (1-28), ``quantity`` in capsules computed exactly for that supply (module docstring; the unit of
      the prior's quantity when it was in capsules), and the prior's ``performer`` (the certified
      pharmacy). When the count cannot be computed exactly, no quantity is written and a note asks the
      pharmacist to enter it.
    - Risk category: the ``rems-risk-category`` extension (form 1) **and** the note
      ``REMS risk category: <form name> (<code>)`` (form 3), so the value survives an EHR that drops
      extensions. `category_display` goes in the extension coding and must name the same category as
      `category_code` (the form name, case-insensitive, or the code). An empty `category_code` (and
      display) means the category is unknown: none is written, nothing is guessed, and the draft gets
      `risk-category-missing` until the prescriber documents it.
    - Authorization (only when given): an identifier in `AUTHORIZATION_SYSTEM` and the note
      ``REMS Authorization #: <number>``. Without one, nothing is written: a number invented or carried
      over would hide the `authorization-missing` finding.
    - ``identifier`` `REFILL_DRAFT_SYSTEM` | `draft_identifier` for the conditional create.
    - ``authoredOn`` when given (timezone-aware); ``requester`` → `requester` (the approving
      pharmacist's ``PractitionerRole/…``) when given.
    """
    _require_medication_request(prior, "prior")
    _check_supply_days(supply_days)
    _check_patient_id(patient_id)
    category = _category(category_code, category_display)
    if authorization is not None and not _AUTH_VALUE.fullmatch(authorization):
        raise ValueError(f"authorization must be letters, digits and hyphens, got {authorization!r}")
    if not draft_identifier.strip() or not prior_reference.strip():
        raise ValueError("draft_identifier and prior_reference must not be empty")
    if authored_on is not None and authored_on.utcoffset() is None:
        raise ValueError("authored_on must be timezone-aware (FHIR dateTime with a time needs an offset)")
    subject = prior.get("subject")
    prior_patient = subject.get("reference") if isinstance(subject, Mapping) else None
    if isinstance(prior_patient, str) and not (
        prior_patient == f"Patient/{patient_id}" or prior_patient.endswith(f"/Patient/{patient_id}")
    ):
        raise ValueError(f"the prior prescription is about {prior_patient!r}, not Patient/{patient_id}")

    resource: dict[str, Any] = {"resourceType": "MedicationRequest"}
    contained = _contained_medication(prior)
    if contained is not None:
        resource["contained"] = [contained]
    if category is not None:
        resource["extension"] = [
            {
                "url": RISK_CATEGORY_EXTENSION,
                "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": category.value, "display": category_display},
            }
        ]
    identifiers: list[dict[str, Any]] = [{"system": REFILL_DRAFT_SYSTEM, "value": draft_identifier}]
    if authorization is not None:
        identifiers.append(
            {"type": {"text": "REMS authorization number"}, "system": AUTHORIZATION_SYSTEM, "value": authorization}
        )
    resource["identifier"] = identifiers
    resource["status"] = "draft"
    resource["intent"] = "order"
    for key in ("medicationCodeableConcept", "medicationReference"):
        if key in prior:
            resource[key] = copy.deepcopy(prior[key])
    if "medicationCodeableConcept" not in resource and "medicationReference" not in resource:
        raise ValueError("the prior prescription names no medication")
    resource["subject"] = {"reference": f"Patient/{patient_id}"}
    if authored_on is not None:
        resource["authoredOn"] = authored_on.isoformat()
    if requester:
        resource["requester"] = {"reference": requester}
    for key in _COPIED:
        if key in prior:
            resource[key] = copy.deepcopy(prior[key])

    notes = [f"REMS risk category: {category.display} ({category.value})"] if category is not None else []
    if authorization is not None:
        notes.append(f"REMS Authorization #: {authorization}")
    dosages, scrubbed = _scrubbed_dosages(prior.get("dosageInstruction"))
    dosing = _dosing(prior)
    if isinstance(dosing, _Dosing) and dosing.cycle_days and _cycle(_texts({"dosageInstruction": dosages})) is None:
        # The cycle was only in the prior's note, which is not copied: keep it where the reader looks.
        notes.append(f"Dosing cycle: days 1-{dosing.on_days} of each {dosing.cycle_days}-day cycle.")
    dispense: dict[str, Any] = {"numberOfRepeatsAllowed": 0}
    if isinstance(dosing, _Dosing):
        dispense["quantity"] = _capsules(dosing.capsules_for(supply_days), prior.get("dispenseRequest"))
    else:
        notes.append(f"Quantity not set: {dosing}. Enter the capsules for {supply_days} days.")
    dispense["expectedSupplyDuration"] = _days(supply_days)
    prior_dispense = prior.get("dispenseRequest")
    if isinstance(prior_dispense, Mapping) and "performer" in prior_dispense:
        dispense["performer"] = copy.deepcopy(prior_dispense["performer"])
    if scrubbed:
        notes.append(
            "An authorization number in the prior prescription's dosage text was removed: "
            "each prescription carries its own."
        )
    resource["note"] = [{"text": text} for text in notes]
    if dosages:
        resource["dosageInstruction"] = dosages
    resource["dispenseRequest"] = dispense
    resource["priorPrescription"] = {"reference": prior_reference}
    return resource


def _category(code: str, display: str) -> RiskCategory | None:
    if not code:
        if display:
            raise ValueError(f"category_display {display!r} given without a category_code")
        return None
    try:
        category = RiskCategory(code)
    except ValueError:
        raise ValueError(f"category_code {code!r} is not a REMS risk category") from None
    if display.strip().lower() not in (category.display.lower(), category.value):
        raise ValueError(f"category_display {display!r} does not name the category {category.value!r}")
    return category


def _contained_medication(prior: Mapping[str, Any]) -> dict[str, Any] | None:
    ref = prior.get("medicationReference")
    target = ref.get("reference") if isinstance(ref, Mapping) else None
    if not isinstance(target, str) or not target.startswith("#"):
        return None
    for resource in _dicts(prior.get("contained")):
        if resource.get("id") == target[1:]:
            return copy.deepcopy(resource)
    raise ValueError(f"the prior's medicationReference {target!r} names no contained resource")


def _capsules(count: Decimal, prior_dispense: Any) -> dict[str, Any]:
    """`count` capsules, in the unit the prior prescription used when it was a capsule unit."""
    prior_q = prior_dispense.get("quantity") if isinstance(prior_dispense, Mapping) else None
    if isinstance(prior_q, Mapping) and _is_capsule_quantity(prior_q) and _unit_of(prior_q):
        return {"value": _json_number(count), **{k: prior_q[k] for k in ("unit", "system", "code") if k in prior_q}}
    return {"value": _json_number(count), "unit": "capsule", "system": UCUM, "code": "{capsule}"}


def _scrubbed_dosages(dosages: Any) -> tuple[list[dict[str, Any]], bool]:
    """A deep copy of the dosage instructions without authorization numbers in their text."""
    out = [copy.deepcopy(d) for d in _dicts(dosages)]
    changed = False
    for d in out:
        for key in ("text", "patientInstruction"):
            if isinstance(d.get(key), str):
                text = _without_authorization(d[key])
                if text != d[key]:
                    changed = True
                    if text:
                        d[key] = text
                    else:
                        del d[key]
    return out, changed


def _without_authorization(text: str) -> str:
    for _ in range(10):  # removing one number can never reveal more than a few: bounded anyway
        hits = [m for m in _AUTH_TEXT.finditer(text) if any(ch.isdigit() for ch in m.group(1))]
        if not hits:
            break
        for m in reversed(hits):
            text = text[: m.start()] + text[m.end() :]
    return _tidy(text)


def _tidy(text: str) -> str:
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r"\s+([.,;:])", r"\1", text)
    text = re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text)
    return re.sub(r"^[\s.,;:]+", "", text).rstrip(" \t,;:")


# --- Pharmacist edits of a drafted refill ---------------------------------------------------------------


@dataclass(frozen=True)
class RefillEdit:
    """What a pharmacist changes on a drafted refill (None: unchanged). Values are checked by `edit_refill`."""

    supply_days: int | None = None
    quantity: Decimal | None = None
    """Capsules to dispense."""
    dose_mg: Decimal | None = None
    """Capsule strength; must be a strength the code list knows for the drug (its RxNorm code is written)."""
    note: str | None = None
    authorization: str | None = None
    category_code: str | None = None


def edit_refill(
    draft: Mapping[str, Any], edit: RefillEdit, *, strengths: Mapping[Decimal, tuple[str, str]] | None = None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """A copy of the drafted MedicationRequest with `edit` applied, and one sentence per change.

    - ``supply_days`` (1-28) sets ``expectedSupplyDuration``; unless a quantity is given too, the capsule
      count is recomputed for it when the dosing allows an exact count (else left, and a sentence says so).
    - ``quantity`` (> 0, whole capsules) sets ``dispenseRequest.quantity.value`` (in capsules).
    - ``dose_mg`` replaces the medication coding with the strength's RxNorm code from `strengths`
      (strength → (code, display)); a strength not in it is refused. Strength-specific text (``10 mg``) in
      the dosage text is updated too.
    - ``note`` appends a note. ``authorization`` replaces the rems-authorization identifier and its note
      line (``REMS Authorization #: N``). ``category_code`` replaces the risk-category extension and note.
    Raises ValueError naming the field for a value out of range."""
    _require_medication_request(draft, "draft")
    resource: dict[str, Any] = copy.deepcopy(dict(draft))
    dispense = resource.setdefault("dispenseRequest", {})
    if not isinstance(dispense, dict):
        raise ValueError("dispenseRequest: not an object")
    changes: list[str] = []
    notes = [n for n in _dicts(resource.get("note"))]
    if edit.dose_mg is not None:
        table = strengths or {}
        if edit.dose_mg not in table:
            known = ", ".join(_num(s) for s in sorted(table)) or "none known"
            raise ValueError(f"doseMg: {_num(edit.dose_mg)} mg is not a capsule strength of this drug ({known})")
        old = _strength(resource)
        code, display = table[edit.dose_mg]
        resource.pop("medicationReference", None)
        resource.pop("contained", None)
        resource["medicationCodeableConcept"] = {
            "coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": code, "display": display}],
            "text": display,
        }
        if old is not None and old != edit.dose_mg:
            pattern = re.compile(rf"\b{re.escape(_num(old))}\s*mg\b", re.IGNORECASE)
            for d in _dicts(resource.get("dosageInstruction")):
                for key in ("text", "patientInstruction"):
                    if isinstance(d.get(key), str):
                        d[key] = pattern.sub(f"{_num(edit.dose_mg)} mg", d[key])
        changes.append(f"Dose set to {_num(edit.dose_mg)} mg capsules" + (f" (was {_num(old)} mg)." if old else "."))
    if edit.supply_days is not None:
        if not 1 <= edit.supply_days <= REMS_MAX_SUPPLY_DAYS:
            raise ValueError(f"supplyDays: must be 1 to {REMS_MAX_SUPPLY_DAYS}, got {edit.supply_days}")
        dispense["expectedSupplyDuration"] = _days(edit.supply_days)
        changes.append(f"Supply set to {edit.supply_days} days.")
        if edit.quantity is None:
            dosing = _dosing(resource)
            if isinstance(dosing, _Dosing):
                count = dosing.capsules_for(edit.supply_days)
                dispense["quantity"] = _capsules(count, dispense)
                changes.append(f"Quantity {_num(count)} capsules ({dosing.describe()}).")
            else:
                changes.append(f"Quantity left as written: {dosing}.")
    if edit.quantity is not None:
        q = edit.quantity
        if q <= 0 or q != q.to_integral_value() or q > 1000:
            raise ValueError(f"quantity: must be a whole number of capsules from 1 to 1000, got {_num(q)}")
        dispense["quantity"] = _capsules(q, dispense)
        changes.append(f"Quantity set to {_num(q)} capsules.")
    if edit.authorization is not None:
        value = edit.authorization.strip()
        if not _AUTH_VALUE.fullmatch(value):
            raise ValueError(f"authorizationNumber: letters, digits and hyphens only, got {value[:40]!r}")
        ids = [i for i in _dicts(resource.get("identifier")) if i.get("system") != AUTHORIZATION_SYSTEM]
        ids.append({"type": {"text": "REMS authorization number"}, "system": AUTHORIZATION_SYSTEM, "value": value})
        resource["identifier"] = ids
        notes = [n for n in notes if not str(n.get("text", "")).startswith("REMS Authorization #:")]
        notes.append({"text": f"REMS Authorization #: {value}"})
        changes.append("REMS authorization number entered.")
    if edit.category_code is not None:
        try:
            category = RiskCategory(edit.category_code)
        except ValueError:
            allowed = ", ".join(c.value for c in RiskCategory)
            raise ValueError(f"riskCategory: {edit.category_code[:40]!r} is not one of {allowed}") from None
        exts = [e for e in _dicts(resource.get("extension")) if e.get("url") != RISK_CATEGORY_EXTENSION]
        exts.append(
            {
                "url": RISK_CATEGORY_EXTENSION,
                "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": category.value, "display": category.display},
            }
        )
        resource["extension"] = exts
        notes = [n for n in notes if not str(n.get("text", "")).startswith("REMS risk category:")]
        notes.append({"text": f"REMS risk category: {category.display} ({category.value})"})
        changes.append(f"Risk category set to {category.display}.")
    if edit.note is not None:
        text = edit.note.strip()
        if not text or len(text) > 2000:
            raise ValueError("note: must be 1 to 2000 characters")
        notes.append({"text": text})
        changes.append("Note added.")
    if notes:
        resource["note"] = notes
    resource.pop("text", None)
    return resource, tuple(changes)
