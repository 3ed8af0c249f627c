"""Real-shaped FHIR R4 JSON for the contract tests, and the calls that push it through the mappings.

Every builder returns a plain JSON ``dict`` as an EHR would send it (US Core shapes; Epic-like orders
that carry the medication as text and the REMS data in `note`; Cerner-like orders that point at a
`Medication` with `medicationReference` and send no `expectedSupplyDuration`). A test passes the fields
it is about explicitly, so the data it depends on is visible in the test.

The clock: `NOW` is Wednesday 18 June 2025, 10:00 in Chicago (CDT, UTC-05:00). `TOKYO` (UTC+09:00) is
the second clinic zone, east of UTC, for tests where the clinic-local day matters.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from fhir_mappings import ResourceIndex, parse_resource
from fhir_mappings.access import Json
from fhir_mappings.codes import default_codes
from fhir_mappings.common import ChartCondition, read_condition
from fhir_mappings.medication import imid_order
from fhir_mappings.observations import ChartObservation, read_observation
from rems.model import ImidOrder

RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ICD10CM = "http://hl7.org/fhir/sid/icd-10-cm"
UCUM = "http://unitsofmeasure.org"
V3_INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
EPIC_MEDICATION_OID = "urn:oid:1.2.840.114350.1.13.0.1.7.2.698288"
"""An Epic-style local medication code system (the order also carries text only)."""
EPIC_ORDER_OID = "urn:oid:1.2.840.114350.1.13.0.1.7.2.798268"

BASE = "https://imid-rems.github.io/fhir"
AUTHORIZATION_SYSTEM = f"{BASE}/sid/rems-authorization"
RISK_CATEGORY_EXTENSION = f"{BASE}/StructureDefinition/rems-risk-category"
RISK_CATEGORY_SYSTEM = f"{BASE}/CodeSystem/rems-risk-category"
RULE_SYSTEM = f"{BASE}/CodeSystem/rems-rule"

US_CORE_SEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex"
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

CHICAGO = ZoneInfo("America/Chicago")
"""The default clinic zone: west of UTC (UTC-06:00 / UTC-05:00 with DST)."""
TOKYO = ZoneInfo("Asia/Tokyo")
"""A clinic zone east of UTC (UTC+09:00, no DST)."""
NOW = datetime(2025, 6, 18, 10, 0, tzinfo=CHICAGO)
"""Default clock: Wednesday 18 June 2025, 10:00 CDT."""

PATIENT_ID = "pat-1"
PATIENT_REF = f"Patient/{PATIENT_ID}"


# ------------------------------------------------------------------------------------------------
# Small FHIR datatypes
# ------------------------------------------------------------------------------------------------


def rxnorm(code: str, display: str | None = None, text: str | None = None) -> dict[str, Any]:
    """A CodeableConcept with one RxNorm coding (and the EHR's own text, if given)."""
    coding: dict[str, Any] = {"system": RXNORM, "code": code}
    if display is not None:
        coding["display"] = display
    concept: dict[str, Any] = {"coding": [coding]}
    if text is not None:
        concept["text"] = text
    return concept


def loinc(code: str, display: str = "") -> dict[str, Any]:
    coding: dict[str, Any] = {"system": LOINC, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def snomed(code: str, display: str = "") -> dict[str, Any]:
    coding: dict[str, Any] = {"system": SNOMED, "code": code}
    if display:
        coding["display"] = display
    return {"coding": [coding]}


def interpretation(code: str) -> list[dict[str, Any]]:
    return [{"coding": [{"system": V3_INTERPRETATION, "code": code}]}]


def quantity(value: float | int, unit: str, code: str | None = None, comparator: str | None = None) -> dict[str, Any]:
    """A Quantity; `code` given = a UCUM-coded quantity."""
    q: dict[str, Any] = {"value": value, "unit": unit}
    if code is not None:
        q["system"] = UCUM
        q["code"] = code
    if comparator is not None:
        q["comparator"] = comparator
    return q


def capsule_dose(
    capsules: int = 1, frequency: int | None = 1, period: int = 1, text: str = "Take 1 capsule by mouth daily"
) -> dict[str, Any]:
    """A dosageInstruction in capsules; `frequency=None` leaves out the structured timing."""
    dosage: dict[str, Any] = {
        "text": text,
        "doseAndRate": [{"doseQuantity": quantity(capsules, "capsule", "{capsule}")}],
    }
    if frequency is not None:
        dosage["timing"] = {"repeat": {"frequency": frequency, "period": period, "periodUnit": "d"}}
    return dosage


def mg_dose(mg: float | int, frequency: int = 1, text: str = "Take by mouth") -> dict[str, Any]:
    """A dosageInstruction in mg with a structured daily frequency (Epic sends both)."""
    return {
        "text": text,
        "timing": {"repeat": {"frequency": frequency, "period": 1, "periodUnit": "d"}},
        "doseAndRate": [{"doseQuantity": quantity(mg, "mg", "mg")}],
    }


# ------------------------------------------------------------------------------------------------
# Resources
# ------------------------------------------------------------------------------------------------


def medication_request(rid: str = "draft-1", **fields: Any) -> dict[str, Any]:
    """A draft MedicationRequest for the patient in context, authored this morning in the clinic.
    No medication, dosage, dispenseRequest or REMS data unless passed."""
    raw: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "subject": {"reference": PATIENT_REF},
        "authoredOn": "2025-06-18T09:15:00-05:00",
    }
    raw.update(fields)
    return raw


def lenalidomide_request(rid: str = "draft-1", **fields: Any) -> dict[str, Any]:
    """Generic lenalidomide 10 mg (SCD 602910), 1 capsule daily, 28 capsules, no REMS data unless passed."""
    base: dict[str, Any] = {
        "medicationCodeableConcept": rxnorm("602910", "lenalidomide 10 MG Oral Capsule"),
        "dosageInstruction": [capsule_dose()],
        "dispenseRequest": {"quantity": quantity(28, "capsule", "{capsule}")},
    }
    base.update(fields)
    return medication_request(rid, **base)


def medication(rid: str, code: dict[str, Any]) -> dict[str, Any]:
    """A Cerner-style Medication resource (the order points at it)."""
    return {"resourceType": "Medication", "id": rid, "code": code}


def observation(rid: str = "obs-1", **fields: Any) -> dict[str, Any]:
    """A final Observation about the patient in context, collected 16 June 2025 08:30 CDT."""
    raw: dict[str, Any] = {
        "resourceType": "Observation",
        "id": rid,
        "status": "final",
        "subject": {"reference": PATIENT_REF},
        "effectiveDateTime": "2025-06-16T08:30:00-05:00",
    }
    raw.update(fields)
    return raw


def patient(**fields: Any) -> dict[str, Any]:
    """The patient in context (no sex, gender or birth date unless passed)."""
    raw: dict[str, Any] = {"resourceType": "Patient", "id": PATIENT_ID}
    raw.update(fields)
    return raw


def bundle(*resources: dict[str, Any], kind: str = "searchset") -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": [{"resource": r} for r in resources]}


# ------------------------------------------------------------------------------------------------
# Through the mappings
# ------------------------------------------------------------------------------------------------


def parse(raw: dict[str, Any], path: str = "test") -> Json:
    """One resource through `fhir_mappings.parse_resource` (known resourceType, valid id; its fields are
    checked when a mapping reads them)."""
    return parse_resource(raw, path)


def observations_of(*raws: dict[str, Any]) -> list[ChartObservation]:
    """Observations as `build_case` hands them to the observation mappings (status and code read)."""
    return [read_observation(parse(r, f"obs[{i}]"), f"obs[{i}]", default_codes()) for i, r in enumerate(raws)]


def conditions_of(*raws: dict[str, Any]) -> list[ChartCondition]:
    return [read_condition(parse(r, f"cond[{i}]"), f"cond[{i}]") for i, r in enumerate(raws)]


def located(*raws: dict[str, Any], base: str = "res") -> list[tuple[Json, str]]:
    """(resource, path) pairs, as `ResourceIndex.located` gives them."""
    return [(parse(r, f"{base}[{i}]"), f"{base}[{i}]") for i, r in enumerate(raws)]


def index_of(*raws: dict[str, Any]) -> ResourceIndex:
    """A chart index holding the given resources (e.g. a Medication an order points at)."""
    index = ResourceIndex()
    for i, raw in enumerate(raws):
        index.add(parse(raw, f"chart[{i}]"), f"chart[{i}]")
    return index


def order_of(
    raw: dict[str, Any],
    *chart: dict[str, Any],
    adult: bool | None = True,
    zone: ZoneInfo = CHICAGO,
) -> ImidOrder | None:
    """The IMiD facts `fhir_mappings.medication.imid_order` reads from a MedicationRequest."""
    return imid_order(parse(raw), "test", index_of(*chart), default_codes(), zone, adult)


def imid(raw: dict[str, Any], *chart: dict[str, Any], adult: bool | None = True) -> ImidOrder:
    """Like `order_of`, for an order the test expects to be an IMiD."""
    order = order_of(raw, *chart, adult=adult)
    assert order is not None, f"not recognised as an IMiD: {raw.get('medicationCodeableConcept')}"
    return order
