"""Reading FHIR JSON: strict, targeted checks (`fhir_mappings.access`, DECISIONS.md "Reading FHIR").

Every field a rule acts on is checked, when it is read, against its FHIR R4 JSON type; a bad one is a
422 `InvalidInput` naming the exact path and quoting the value. Resources and fields no rule reads are
not looked at. Tests go through `cds_hooks.service.evaluate_request` (the request as an EHR sends it) or
the mapping entry points."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import pkgutil
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B import get_fhir_model_class

from cds_hooks.service import evaluate_request, parse_request
from fhir_mappings import InvalidInput, ResourceIndex, parse_resource
from fhir_mappings.codes import default_codes
from fhir_mappings.medication import ChartImidOrder, chart_imid_order, imid_order, medication_of
from fhir_mappings.observations import labs, pregnancy_tests
from fhir_mappings.patient import patient_facts
from fhir_mappings.r4_types import (
    EXTENSION_VALUE_TYPES,
    PATIENT_REFERENCE_TYPES,
    R4_RESOURCE_TYPES,
    R4B_ADDED_RESOURCE_TYPES,
    RESOURCE_TYPES,
    SUBJECT_REFERENCE_TYPES,
)
from rems.config import default_config
from rems.model import ImidOrder

from .fhir_json import (
    CHICAGO,
    NOW,
    PATIENT_ID,
    bundle,
    interpretation,
    lenalidomide_request,
    loinc,
    observation,
    observations_of,
    patient,
    quantity,
    rxnorm,
    snomed,
)

DRAFT = "context.draftOrders.entry[0].resource"
HCG = "prefetch.observations.entry[0].resource"
LAB = "prefetch.labs.entry[0].resource"


def hcg(**fields: Any) -> dict[str, Any]:
    """A negative urine pregnancy test (LOINC 2106-3): read whole by the pregnancy-test rules."""
    raw = observation("hcg-1", code=loinc("2106-3"), valueCodeableConcept=snomed("260385009", "Negative"))
    raw.update(fields)
    return raw


def creatinine(**fields: Any) -> dict[str, Any]:
    """A serum creatinine (LOINC 2160-0): its value and time are read by the lab mapping."""
    raw = observation("cr-1", code=loinc("2160-0"), valueQuantity=quantity(0.9, "mg/dL", "mg/dL"))
    raw.update(fields)
    return raw


def request(*drafts: dict[str, Any], **prefetch: Any) -> dict[str, Any]:
    """An order-sign request: the drafts (default a lenalidomide order), the patient (a 40-year-old
    woman), and whatever else is prefetched."""
    return {
        "hook": "order-sign",
        "hookInstance": "6f9a1a5e-3c1b-4a57-9d43-2b6a0a0b8e11",
        "context": {
            "userId": "PractitionerRole/onc-1",
            "patientId": PATIENT_ID,
            "draftOrders": bundle(*(drafts or (lenalidomide_request(),)), kind="collection"),
        },
        "prefetch": {"patient": patient(gender="female", birthDate="1985-04-02"), **prefetch},
    }


def evaluate(raw: dict[str, Any]) -> list[str]:
    """The rule codes of the cards the service answers."""
    response = evaluate_request(parse_request(raw), now=NOW, zone=CHICAGO).to_json()
    return sorted(c["source"]["topic"]["code"] for c in response["cards"])


def refused(raw: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        evaluate(raw)
    return caught.value


def with_draft(**fields: Any) -> dict[str, Any]:
    return request(lenalidomide_request(**fields))


# ------------------------------------------------------------------------------------------------
# Primitive types, as read
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path", "quoted"),
    [
        pytest.param(
            request(labs=bundle(creatinine(valueQuantity={"value": True, "unit": "mg/dL"}))),
            f"{LAB}.valueQuantity.value",
            "true",
            id="decimal-given-a-bool",
        ),
        pytest.param(
            request(labs=bundle(creatinine(valueQuantity={"value": "0.9", "unit": "mg/dL"}))),
            f"{LAB}.valueQuantity.value",
            "'0.9'",
            id="decimal-given-a-string",
        ),
        pytest.param(
            with_draft(dispenseRequest={"numberOfRepeatsAllowed": "12", "quantity": quantity(28, "capsule")}),
            f"{DRAFT}.dispenseRequest.numberOfRepeatsAllowed",
            "'12'",
            id="integer-given-a-string",
        ),
        pytest.param(
            with_draft(dispenseRequest={"numberOfRepeatsAllowed": 2.0, "quantity": quantity(28, "capsule")}),
            f"{DRAFT}.dispenseRequest.numberOfRepeatsAllowed",
            "2.0",
            id="integer-given-a-float",
        ),
        pytest.param(
            with_draft(dispenseRequest={"numberOfRepeatsAllowed": True, "quantity": quantity(28, "capsule")}),
            f"{DRAFT}.dispenseRequest.numberOfRepeatsAllowed",
            "true",
            id="integer-given-a-bool",
        ),
        pytest.param(
            with_draft(dispenseRequest={"numberOfRepeatsAllowed": -1, "quantity": quantity(28, "capsule")}),
            f"{DRAFT}.dispenseRequest.numberOfRepeatsAllowed",
            "-1",
            id="unsignedInt-negative",
        ),
        pytest.param(
            with_draft(dosageInstruction=[{"timing": {"repeat": {"frequency": 0, "period": 1, "periodUnit": "d"}}}]),
            f"{DRAFT}.dosageInstruction[0].timing.repeat.frequency",
            "0",
            id="positiveInt-zero",
        ),
        pytest.param(
            with_draft(status="act ive "),
            f"{DRAFT}.status",
            "'act ive '",
            id="code-with-trailing-space",
        ),
        pytest.param(
            with_draft(status=1),
            f"{DRAFT}.status",
            "1",
            id="code-given-a-number",
        ),
        pytest.param(
            with_draft(note=[{"text": ""}]),
            f"{DRAFT}.note[0].text",
            "''",
            id="empty-string",
        ),
        pytest.param(
            request(practitionerRoles=bundle({"resourceType": "PractitionerRole", "id": "r1", "active": "true"})),
            "prefetch.practitionerRoles.entry[0].resource.active",
            "'true'",
            id="boolean-given-a-string",
        ),
    ],
)
def test_a_primitive_of_the_wrong_json_type_is_a_422_naming_it(raw: dict[str, Any], path: str, quoted: str) -> None:
    err = refused(raw)
    assert (err.path, err.status) == (path, 422)
    assert f"got {quoted}" in err.message


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("2026-02-30T08:30:00-05:00", id="30-february"),
        pytest.param("2026-02-30", id="30-february-day-only"),
        pytest.param("2026-06-16T24:00:00-05:00", id="hour-24"),
        pytest.param("2025-06-16T08:60:00-05:00", id="minute-60"),
        pytest.param("2025-06-16T08:30:61-05:00", id="second-61"),
        pytest.param("2025-06-16T08:30:00", id="no-utc-offset"),
        pytest.param("2025-06-16T08:30-05:00", id="no-seconds"),
        pytest.param("2025-06-16 08:30:00-05:00", id="space-for-T"),
        pytest.param("2025-06-16T08:30:00z", id="lower-case-z"),
        pytest.param("2025-06-16T08:30:00.-05:00", id="empty-fraction"),
        pytest.param("2025-06-16T08:30:00+15:00", id="offset-beyond-14h"),
        pytest.param("2025-06-16T08:30:00+05:75", id="offset-minutes-75"),
        pytest.param("2025-06-16T08:30:00-0500", id="offset-without-colon"),
        pytest.param("2025-13", id="month-13"),
        pytest.param("2025-6-16", id="one-digit-month"),
        pytest.param("0000-01-01", id="year-0"),
        pytest.param("20250616", id="basic-iso-format"),
        pytest.param("yesterday", id="words"),
        pytest.param(20250616, id="a-number"),
    ],
)
def test_invalid_date_time_is_a_422_quoting_it(value: Any) -> None:
    err = refused(request(observations=bundle(hcg(effectiveDateTime=value))))
    assert (err.path, err.status) == (f"{HCG}.effectiveDateTime", 422)
    assert repr(value) in err.message


@pytest.mark.parametrize(
    ("value", "when"),
    [
        ("2025-06-16T08:30:00-05:00", datetime(2025, 6, 16, 8, 30, tzinfo=timezone(timedelta(hours=-5)))),
        ("2025-06-16T13:30:00Z", datetime(2025, 6, 16, 13, 30, tzinfo=UTC)),
        ("2025-06-16T13:30:00.123456789Z", datetime(2025, 6, 16, 13, 30, 0, 123456, tzinfo=UTC)),
        ("2025-06-17T03:30:00+14:00", datetime(2025, 6, 16, 13, 30, tzinfo=UTC)),
        ("2025-06-16T13:30:00-00:00", datetime(2025, 6, 16, 13, 30, tzinfo=UTC)),
        ("2025-06-16", date(2025, 6, 16)),
        ("2024-02-29", date(2024, 2, 29)),
    ],
)
def test_valid_date_times_are_read_as_written(value: str, when: datetime | date) -> None:
    (found,), unreadable = pregnancy_tests(
        observations_of(hcg(effectiveDateTime=value)), default_codes(), default_config().rems
    )
    assert found.collected == when
    assert unreadable == []


@pytest.mark.parametrize("value", ["2025", "2025-06", "2016-12-31T23:59:60Z"])
def test_a_valid_date_that_places_no_day_or_clock_is_unusable_not_an_error(value: str) -> None:
    """Partial dates are valid FHIR but name no day; a leap second has no Python clock. The test is
    reported as unreadable (a warning), as before."""
    found, unreadable = pregnancy_tests(
        observations_of(hcg(effectiveDateTime=value)), default_codes(), default_config().rems
    )
    assert found == []
    assert unreadable == ["Observation/hcg-1: pregnancy test without a usable collection date"]


@pytest.mark.parametrize(("value", "day"), [("1980-07-04", date(1980, 7, 4)), ("1980-07", None), ("1980", None)])
def test_birth_date_is_a_fhir_date(value: str, day: date | None) -> None:
    assert patient_facts(parse_resource(patient(birthDate=value), "p"), "p").birth_date == day


@pytest.mark.parametrize("value", ["1980-07-04T00:00:00Z", "1980-02-30", "04/07/1980", 1980])
def test_birth_date_that_is_not_a_fhir_date_is_a_422(value: Any) -> None:
    with pytest.raises(InvalidInput) as caught:
        patient_facts(parse_resource(patient(birthDate=value), "prefetch.patient"), "prefetch.patient")
    assert (caught.value.path, caught.value.status) == ("prefetch.patient.birthDate", 422)


def test_issued_is_an_instant_a_day_alone_is_not_one() -> None:
    raw = hcg(issued="2025-06-16")
    del raw["effectiveDateTime"]
    err = refused(request(observations=bundle(raw)))
    assert (err.path, err.status) == (f"{HCG}.issued", 422)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.9, Decimal("0.9")), (1, Decimal("1")), (1.10, Decimal("1.1")), (88.42, Decimal("88.42"))],
)
def test_decimal_keeps_the_number_as_written_in_json(value: float, expected: Decimal) -> None:
    """``Decimal(str(x))``: 0.9 is 0.9, not 0.90000000000000002220446..."""
    found, _ = labs(observations_of(creatinine(valueQuantity=quantity(value, "mg/dL", "mg/dL"))), default_codes())
    assert [lab.value for lab in found] == [expected]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_decimal_that_is_not_finite_is_a_422(value: float) -> None:
    err = refused(request(labs=bundle(creatinine(valueQuantity={"value": value, "unit": "mg/dL"}))))
    assert (err.path, err.status) == (f"{LAB}.valueQuantity.value", 422)


def test_a_long_bad_value_is_quoted_truncated() -> None:
    err = refused(request(observations=bundle(hcg(effectiveDateTime="x" * 500))))
    assert "'" + "x" * 60 + "'…" in err.message
    assert "x" * 61 not in err.message


# ------------------------------------------------------------------------------------------------
# Complex types, arrays, choices, references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        pytest.param(
            with_draft(dosageInstruction={"text": "1 capsule daily"}), f"{DRAFT}.dosageInstruction", id="dosage"
        ),
        pytest.param(with_draft(note={"text": "REMS auth 12345"}), f"{DRAFT}.note", id="note"),
        pytest.param(
            with_draft(medicationCodeableConcept={"coding": {"system": "x", "code": "602910"}}),
            f"{DRAFT}.medicationCodeableConcept.coding",
            id="coding",
        ),
        pytest.param(
            request(observations=bundle(hcg(interpretation={"coding": [{"code": "NEG"}]}))),
            f"{HCG}.interpretation",
            id="interpretation",
        ),
    ],
)
def test_an_object_where_fhir_repeats_the_element_is_a_422(raw: dict[str, Any], path: str) -> None:
    """FHIR JSON sends a repeating element as an array, even with one item."""
    err = refused(raw)
    assert (err.path, err.status) == (path, 422)
    assert "JSON array" in err.message


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        pytest.param(with_draft(dispenseRequest=[{"quantity": quantity(28, "capsule")}]), f"{DRAFT}.dispenseRequest"),
        pytest.param(request(labs=bundle(creatinine(valueQuantity=0.9))), f"{LAB}.valueQuantity"),
        pytest.param(with_draft(subject="Patient/pat-1"), f"{DRAFT}.subject"),
        pytest.param(
            with_draft(medicationCodeableConcept={"coding": ["602910"]}), f"{DRAFT}.medicationCodeableConcept.coding[0]"
        ),
    ],
)
def test_a_scalar_or_array_where_fhir_has_an_object_is_a_422(raw: dict[str, Any], path: str) -> None:
    err = refused(raw)
    assert (err.path, err.status) == (path, 422)


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        pytest.param(with_draft(subject={"reference": 42}), f"{DRAFT}.subject.reference", id="draft-subject"),
        pytest.param(
            request(observations=bundle(hcg(subject={"reference": ["Patient/pat-1"]}))),
            f"{HCG}.subject.reference",
            id="observation-subject",
        ),
        pytest.param(
            with_draft(requester={"reference": {"id": "onc-1"}}), f"{DRAFT}.requester.reference", id="requester"
        ),
        pytest.param(
            with_draft(supportingInformation=[{"reference": 7}]),
            f"{DRAFT}.supportingInformation[0].reference",
            id="supporting-information",
        ),
        pytest.param(
            with_draft(
                medicationCodeableConcept=None,
                medicationReference={"reference": None, "display": 602910},
            ),
            f"{DRAFT}.medicationReference.display",
            id="medication-reference-display",
        ),
    ],
)
def test_a_reference_that_is_not_a_string_is_a_422(raw: dict[str, Any], path: str) -> None:
    err = refused(raw)
    assert (err.path, err.status) == (path, 422)


def test_two_names_of_one_choice_element_is_a_422() -> None:
    """valueString "Positive" next to a negative coded value: which one would we act on?"""
    err = refused(request(observations=bundle(hcg(valueString="Positive"))))
    assert err.status == 422
    assert err.path in (f"{HCG}.valueString", f"{HCG}.valueCodeableConcept")


def test_an_order_with_both_medication_names_is_a_422() -> None:
    raw = with_draft(medicationReference={"reference": "Medication/m1", "display": "lenalidomide 10 mg"})
    assert refused(raw).status == 422


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        pytest.param(
            request(observations=bundle({k: v for k, v in hcg().items() if k != "status"})),
            f"{HCG}.status",
            id="observation-status",
        ),
        pytest.param(
            request(observations=bundle({k: v for k, v in hcg().items() if k != "code"})),
            f"{HCG}.code",
            id="observation-code",
        ),
        pytest.param(
            request({k: v for k, v in lenalidomide_request().items() if k != "medicationCodeableConcept"}),
            f"{DRAFT}.medication[x]",
            id="order-medication",
        ),
        pytest.param(with_draft(extension=[{"valueCode": "adult-male"}]), f"{DRAFT}.extension[0].url", id="ext-url"),
        pytest.param(with_draft(note=[{"authorString": "Dr A"}]), f"{DRAFT}.note[0].text", id="annotation-text"),
    ],
)
def test_a_required_element_we_act_on_is_required(raw: dict[str, Any], path: str) -> None:
    err = refused(raw)
    assert (err.path, err.status) == (path, 422)
    assert err.message.startswith("missing")


# ------------------------------------------------------------------------------------------------
# Resources: type and id
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", ["MedicationOrder", "Coding", "Resource", "DomainResource", "observation", ""])
def test_unknown_resource_type_is_refused(rtype: str) -> None:
    """Only FHIR R4 resource types: a datatype (`Coding`) or an abstract type is not a resource."""
    err = refused(request(observations=bundle({"resourceType": rtype, "id": "x"})))
    assert err.path == "prefetch.observations.entry[0].resource.resourceType"
    assert err.status == (400 if rtype == "" else 422)


@pytest.mark.parametrize("rtype", [{"text": "Observation"}, ["Observation"], 7])
def test_a_resource_type_that_is_not_a_string_is_refused(rtype: Any) -> None:
    """An object or array where the type name is due is the 400 of a missing type (it was a crash, the
    unhashable value looked up among the type names)."""
    err = refused(request(observations=bundle({"resourceType": rtype, "id": "x"})))
    assert (err.path, err.status) == ("prefetch.observations.entry[0].resource.resourceType", 400)


@pytest.mark.parametrize(
    ("rid", "shown"),
    [("obs 1", "'obs 1'"), ("a" * 65, "'" + "a" * 60 + "'…"), (5, "5"), ("obs/1", "'obs/1'"), ("", "''")],
)
def test_bad_id_is_a_422(rid: Any, shown: str) -> None:
    err = refused(request(observations=bundle(hcg(id=rid))))
    assert (err.path, err.status) == (f"{HCG}.id", 422)
    assert f"got {shown}" in err.message


def test_bad_id_of_the_draft_order_is_a_422() -> None:
    err = refused(with_draft(id="draft 1"))
    assert (err.path, err.status) == (f"{DRAFT}.id", 422)


def test_an_id_of_64_characters_is_accepted() -> None:
    assert "pregnancy-test-missing" not in evaluate(request(observations=bundle(hcg(id="a" * 64))))


@pytest.mark.parametrize("rtype", ["MedicinalProduct", "SubscriptionTopic", "Observation"])
def test_r4_and_r4b_resource_types_are_accepted(rtype: str) -> None:
    """R4 4.0.1 types (`MedicinalProduct`) and the R4B additions (`SubscriptionTopic`), which the
    R4B models we read with before accepted: nothing in them is read."""
    assert parse_resource({"resourceType": rtype, "id": "x1"}, "p")["id"] == "x1"


# ------------------------------------------------------------------------------------------------
# Targeted: what no rule reads is not looked at
# ------------------------------------------------------------------------------------------------


def test_an_observation_no_rule_uses_is_indexed_but_not_read() -> None:
    """A glucose result with a bad value, a bad time and a non-FHIR field changes nothing: no rule reads
    glucose. (Its subject is still checked: data about another patient is refused.)"""
    glucose = observation(
        "glu-1",
        code=loinc("2345-7", "Glucose"),
        effectiveDateTime="yesterday",
        valueQuantity={"value": "high", "unit": 7},
        interpretation={"coding": "H"},
        vendorExtra={"anything": [1, 2]},
    )
    base = request(observations=bundle(hcg()))
    noisy = copy.deepcopy(base)
    noisy["prefetch"]["observations"]["entry"].append({"resource": glucose})
    assert evaluate(noisy) == evaluate(base)
    glucose["subject"] = {"reference": "Patient/pat-2"}
    noisy["prefetch"]["observations"]["entry"][1] = {"resource": glucose}
    assert refused(noisy).path == "prefetch.observations.entry[1].resource.subject.reference"


def test_unknown_fields_are_ignored() -> None:
    base = with_draft()
    extra = with_draft(vendorField={"x": 1}, _status={"extension": []})
    assert evaluate(extra) == evaluate(base)


def test_a_non_imid_chart_order_is_read_only_as_far_as_its_medication() -> None:
    """A chart order for metformin is not an IMiD: its dosage is never read (nor checked)."""
    metformin = {
        "resourceType": "MedicationRequest",
        "id": "met-1",
        "status": "active",
        "intent": "order",
        "subject": {"reference": "Patient/pat-1"},
        "medicationCodeableConcept": rxnorm("861007", "metformin 500 MG Oral Tablet"),
        "dosageInstruction": {"text": "not an array"},
    }
    assert evaluate(request(medications=bundle(metformin))) == evaluate(request())


def history_order(**fields: Any) -> dict[str, Any]:
    """Last month's lenalidomide order in the chart: completed, and dispensed (`history_dispense`)."""
    base: dict[str, Any] = {"status": "completed", "authoredOn": "2025-05-20T09:00:00-05:00"}
    base.update(fields)
    return lenalidomide_request("hist-1", **base)


def history_dispense() -> dict[str, Any]:
    return {
        "resourceType": "MedicationDispense",
        "id": "disp-1",
        "status": "completed",
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "medicationCodeableConcept": rxnorm("602910", "lenalidomide 10 MG Oral Capsule"),
        "authorizingPrescription": [{"reference": "MedicationRequest/hist-1"}],
        "daysSupply": {"value": 28, "unit": "day", "code": "d"},
        "whenHandedOver": "2025-05-21T11:00:00-05:00",
    }


def test_a_dispensed_chart_order_is_read_as_far_as_the_rules_read_it() -> None:
    """History (a completed IMiD order, dispensed): the rules read its drug, status and dates. Its dosage,
    authorization and category are read only if a rule asks for them (`medication.ChartImidOrder`)."""
    base = request(medications=bundle(history_order()), dispenses=bundle(history_dispense()))
    noisy = request(
        medications=bundle(history_order(dosageInstruction={"text": "not an array"}, identifier=[{"value": 7}])),
        dispenses=bundle(history_dispense()),
    )
    assert evaluate(noisy) == evaluate(base)


def test_the_dates_of_a_chart_order_are_checked_at_once() -> None:
    err = refused(request(medications=bundle(history_order(authoredOn="2025-02-30T09:00:00-05:00"))))
    assert (err.path, err.status) == ("prefetch.medications.entry[0].resource.authoredOn", 422)
    validity = {"validityPeriod": {"start": "2025-05-20T24:00:00-05:00"}}
    err = refused(request(medications=bundle(history_order(dispenseRequest=validity))))
    assert err.path == "prefetch.medications.entry[0].resource.dispenseRequest.validityPeriod.start"


def test_a_chart_order_whose_supply_counts_is_read_whole() -> None:
    """An active order with no dispense on file: its supply is the patient's current supply. Worked
    out from quantity and dose, it needs the order read whole: a malformed dosage is a 422 as in a draft."""
    raw = request(medications=bundle(history_order(status="active", dosageInstruction={"text": "not an array"})))
    err = refused(raw)
    assert (err.path, err.status) == ("prefetch.medications.entry[0].resource.dosageInstruction", 422)


def test_a_chart_order_that_states_its_supply_is_read_as_far_as_that() -> None:
    """The same order stating its supply (`expectedSupplyDuration`): that is all the rules read of it,
    and it is checked."""
    stated = {"expectedSupplyDuration": {"value": 28, "unit": "days", "code": "d"}}
    base = request(medications=bundle(history_order(status="active", dispenseRequest=stated)))
    noisy = request(
        medications=bundle(
            history_order(status="active", dispenseRequest=stated, dosageInstruction={"text": "not an array"})
        )
    )
    assert evaluate(noisy) == evaluate(base)
    bad = {"expectedSupplyDuration": {"value": "28", "unit": "days", "code": "d"}}
    err = refused(request(medications=bundle(history_order(status="active", dispenseRequest=bad))))
    assert err.path == "prefetch.medications.entry[0].resource.dispenseRequest.expectedSupplyDuration.value"


@pytest.mark.parametrize("status", ["completed", "active"])
@pytest.mark.parametrize("supply_first", [False, True])
def test_a_chart_order_read_in_two_steps_equals_the_order_read_at_once(status: str, supply_first: bool) -> None:
    raw = parse_resource(
        history_order(
            status=status,
            note=[{"text": "REMS auth # 12345678; risk category: adult female rp"}],
            dispenseRequest={"expectedSupplyDuration": {"value": 4, "unit": "weeks", "code": "wk"}},
        ),
        "p",
    )
    index = ResourceIndex()
    eager = imid_order(raw, "p", index, default_codes(), CHICAGO, True)
    lazy = chart_imid_order(
        raw,
        "p",
        index,
        default_codes(),
        CHICAGO,
        True,
        medication_of(raw, "p", index),
        status,
        "MedicationRequest/hist-1",
    )
    assert eager is not None and lazy is not None
    assert isinstance(lazy, ChartImidOrder) and type(eager) is ImidOrder
    if supply_first:
        assert lazy.supply == eager.supply and lazy.supply is not None and lazy.supply.days == 28
    assert lazy == eager and eager == lazy and hash(lazy) == hash(eager) and repr(lazy) == repr(eager)
    assert lazy.authorization_number == "12345678"
    assert dataclasses.astuple(lazy) == dataclasses.astuple(eager)
    assert dataclasses.replace(lazy, reference="x") == dataclasses.replace(eager, reference="x")


def test_a_non_imid_draft_order_is_read_whole() -> None:
    """A draft is the order under review: read whole, IMiD or not, so a malformed one is never "no cards"."""
    aspirin = {
        "resourceType": "MedicationRequest",
        "id": "asa-1",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": "Patient/pat-1"},
        "medicationCodeableConcept": rxnorm("243670", "aspirin 81 MG Oral Tablet"),
        "dosageInstruction": {"text": "81 mg daily"},
    }
    for drafts in ((aspirin,), (lenalidomide_request(), aspirin)):
        err = refused(request(*drafts))
        assert err.path == f"context.draftOrders.entry[{len(drafts) - 1}].resource.dosageInstruction"


def test_contained_medication_is_checked_when_resolved() -> None:
    raw = with_draft(
        medicationCodeableConcept=None,
        medicationReference={"reference": "#med"},
        contained=[{"resourceType": "Medication", "id": "med", "code": {"text": ""}}],
    )
    err = refused(raw)
    assert (err.path, err.status) == (f"{DRAFT}.contained[0].code.text", 422)


def test_interpretation_of_a_pregnancy_test_is_read_with_its_codes() -> None:
    raw = request(observations=bundle(hcg(interpretation=interpretation(" NEG"))))
    err = refused(raw)
    assert (err.path, err.status) == (f"{HCG}.interpretation[0].coding[0].code", 422)


# ------------------------------------------------------------------------------------------------
# The FHIR names committed as data match the FHIR models
# ------------------------------------------------------------------------------------------------


def _r4b_resource_classes() -> dict[str, Any]:
    import fhir.resources.R4B as r4b
    from fhir.resources.R4B.resource import Resource

    found: dict[str, Any] = {}
    for info in pkgutil.iter_modules(r4b.__path__):
        if info.name.startswith("fhirtypes"):
            continue
        module = importlib.import_module(f"fhir.resources.R4B.{info.name}")
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if (
                issubclass(cls, Resource)
                and cls.__module__ == module.__name__
                and name not in ("Resource", "DomainResource")
                and cls.get_resource_type() == name
            ):
                found[name] = cls
    return found


def test_resource_types_are_r4_plus_the_r4b_additions() -> None:
    r4b = set(_r4b_resource_classes())
    assert len(R4_RESOURCE_TYPES) == 146
    assert r4b - R4_RESOURCE_TYPES == R4B_ADDED_RESOURCE_TYPES
    assert set(RESOURCE_TYPES) == R4_RESOURCE_TYPES | r4b


@pytest.mark.parametrize(
    ("field", "table"), [("subject", SUBJECT_REFERENCE_TYPES), ("patient", PATIENT_REFERENCE_TYPES)]
)
def test_single_reference_tables_match_the_models(field: str, table: frozenset[str]) -> None:
    single = set()
    for name, cls in _r4b_resource_classes().items():
        info = cls.model_fields.get(field)
        if info is not None and "Reference" in str(info.annotation) and "List" not in str(info.annotation):
            single.add(name)
    assert table == single


def test_extension_value_types_match_the_model() -> None:
    fields = get_fhir_model_class("Extension").model_fields
    assert {f[len("value") :] for f in fields if f.startswith("value") and not f.endswith("__ext")} == set(
        EXTENSION_VALUE_TYPES
    )
