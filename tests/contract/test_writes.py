"""`fhir_mappings.writes`: what we write validates as FHIR R4 (`fhir.resources.R4B`), never changes its
input, scales the quantity only when that is exact, and reads back through our own service without the
findings it was written to fix (a round trip: the written order goes back in as a CDS Hooks draft).

Round trips start from scenario requests (`tests/scenarios/*/request.json`, their own clock and clinic
zone) so the chart around the written order is a real-shaped one.
"""

from __future__ import annotations

import copy
import json
import tomllib
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from fhir.resources.R4B.medicationrequest import MedicationRequest
from fhir.resources.R4B.servicerequest import ServiceRequest

from fhir_mappings.medication import AUTHORIZATION_SYSTEM, RISK_CATEGORY_EXTENSION, RISK_CATEGORY_SYSTEM
from fhir_mappings.writes import (
    PREGNANCY_TEST_CODE,
    REFILL_DRAFT_SYSTEM,
    corrected_order,
    next_prescription,
    pregnancy_test_request,
)
from rems.model import RiskCategory

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "tests" / "scenarios"
UCUM = "http://unitsofmeasure.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
SNOMED = "http://snomed.info/sct"
CHICAGO = ZoneInfo("America/Chicago")
NOW = datetime(2025, 6, 18, 10, 0, tzinfo=CHICAGO)
PATIENT_ID = "pat-1"
DAYS_28 = {"value": 28, "unit": "days", "system": UCUM, "code": "d"}
CAPSULE = {"unit": "capsule", "system": UCUM, "code": "{capsule}"}
CYCLE_TEXT = "Take 1 capsule by mouth once daily on days 1-21 of each 28-day cycle."


# ------------------------------------------------------------------------------------------------
# Builders (plain FHIR JSON as an EHR sends it)
# ------------------------------------------------------------------------------------------------


def days(value: float, code: str = "d") -> dict[str, Any]:
    return {"value": value, "unit": code, "system": UCUM, "code": code}


def capsules(value: float, **unit: Any) -> dict[str, Any]:
    return {"value": value, **(unit or CAPSULE)}


def dosage(
    text: str = "Take 1 capsule by mouth daily",
    dose: float = 1,
    unit: str = "capsule",
    frequency: int | None = 1,
    **repeat: Any,
) -> dict[str, Any]:
    """One dosageInstruction; `frequency=None` leaves out the structured timing."""
    d: dict[str, Any] = {"text": text, "doseAndRate": [{"doseQuantity": {"value": dose, "unit": unit}}]}
    if frequency is not None:
        d["timing"] = {"repeat": {"frequency": frequency, "period": 1, "periodUnit": "d", **repeat}}
    return d


def lenalidomide(
    rid: str = "draft-1",
    *,
    dosages: list[dict[str, Any]] | None = None,
    dispense: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A draft lenalidomide 10 mg MedicationRequest for `PATIENT_ID`: 1 capsule daily unless `dosages`,
    dispenseRequest as given."""
    raw: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "id": rid,
        "status": "draft",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": RXNORM, "code": "602910", "display": "lenalidomide 10 MG Oral Capsule"}]
        },
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "authoredOn": "2025-06-18T09:15:00-05:00",
        "dosageInstruction": dosages if dosages is not None else [dosage()],
    }
    if dispense is not None:
        raw["dispenseRequest"] = dispense
    raw.update(fields)
    return raw


def valid_medication_request(resource: dict[str, Any]) -> MedicationRequest:
    return MedicationRequest.model_validate(resource)


# ------------------------------------------------------------------------------------------------
# Round trips through the service
# ------------------------------------------------------------------------------------------------


def scenario(name: str) -> tuple[dict[str, Any], datetime, ZoneInfo, list[str]]:
    """A scenario's request, clock, clinic zone and expected rule codes."""
    folder = SCENARIOS / name
    request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    return request, datetime.fromisoformat(expected["now"]), ZoneInfo(expected["timezone"]), expected["codes"]


def drafts_of(request: dict[str, Any]) -> dict[str, Any]:
    context = request["context"]
    bundle: dict[str, Any] = (
        context["medications"] if request["hook"] == "medication-refill" else context["draftOrders"]
    )
    return bundle


def the_draft(request: dict[str, Any]) -> dict[str, Any]:
    orders = [
        e["resource"] for e in drafts_of(request)["entry"] if e["resource"]["resourceType"] == "MedicationRequest"
    ]
    assert len(orders) == 1
    return orders[0]


def with_draft(request: dict[str, Any], order: dict[str, Any]) -> dict[str, Any]:
    """The request with its (single) draft MedicationRequest replaced by `order`."""
    out = copy.deepcopy(request)
    entries = drafts_of(out)["entry"]
    for entry in entries:
        if entry["resource"]["resourceType"] == "MedicationRequest":
            entry["resource"] = order
    return out


def codes(request: dict[str, Any], now: datetime, zone: ZoneInfo) -> list[str]:
    """The rule codes of the cards our service answers (imported here: only the round trips need it)."""
    from cds_hooks.service import evaluate_request, parse_request

    response = evaluate_request(parse_request(request), now=now, zone=zone).to_json()
    rule_system = "https://imid-rems.github.io/fhir/CodeSystem/rems-rule"
    return sorted(
        c["source"]["topic"]["code"] for c in response["cards"] if c["source"]["topic"]["system"] == rule_system
    )


def chart_order(request: dict[str, Any], rid: str) -> dict[str, Any]:
    for entry in request["prefetch"]["medications"]["entry"]:
        if entry["resource"].get("id") == rid:
            resource: dict[str, Any] = entry["resource"]
            return resource
    raise AssertionError(f"no MedicationRequest/{rid} in the prefetch")


# ------------------------------------------------------------------------------------------------
# corrected_order
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dosages", "dispense", "quantity"),
    [
        pytest.param([dosage()], {"expectedSupplyDuration": days(30), "quantity": capsules(30)}, 28, id="daily-30d"),
        pytest.param([dosage()], {"expectedSupplyDuration": days(1, "mo"), "quantity": capsules(30)}, 28, id="1-mo"),
        pytest.param(
            [dosage(CYCLE_TEXT)], {"expectedSupplyDuration": days(56), "quantity": capsules(42)}, 21, id="cycle-56d"
        ),
        pytest.param(
            [dosage("1 capsule daily, 21 days on, 7 days off")],
            {"expectedSupplyDuration": days(8, "wk"), "quantity": capsules(42)},
            21,
            id="days-on-off-8wk",
        ),
        pytest.param(
            [dosage("1 capsule daily on days 1-21 of 28")],
            {"expectedSupplyDuration": days(29), "quantity": capsules(22)},
            21,
            id="cycle-29d",
        ),
        pytest.param([dosage(CYCLE_TEXT)], {"quantity": capsules(42)}, 21, id="cycle-quantity-only"),
        pytest.param(
            [dosage("1 capsule twice daily", frequency=2)],
            {"expectedSupplyDuration": days(6, "wk"), "quantity": capsules(84)},
            56,
            id="twice-daily",
        ),
        pytest.param(
            [dosage("20 mg daily", dose=20, unit="mg")],
            {"expectedSupplyDuration": days(42), "quantity": capsules(84)},
            56,
            id="mg-dose-2-capsules",
        ),
        pytest.param(
            [dosage()],
            {"expectedSupplyDuration": days(42), "quantity": {"value": 42, "unit": "capsule", "code": "CAP"}},
            28,
            id="orderable-form-unit",
        ),
    ],
)
def test_quantity_scaled_exactly_with_the_supply(
    dosages: list[dict[str, Any]], dispense: dict[str, Any], quantity: int
) -> None:
    draft = lenalidomide(dosages=dosages, dispense=dispense)
    fixed = corrected_order(draft, supply_days=28)
    dr = fixed.resource["dispenseRequest"]
    assert dr["expectedSupplyDuration"] == DAYS_28
    assert dr["quantity"]["value"] == quantity
    assert {k: v for k, v in dr["quantity"].items() if k != "value"} == {
        k: v for k, v in dispense["quantity"].items() if k != "value"
    }
    assert fixed.quantity_needs_review is False
    assert fixed.notes[-1].startswith(f"Quantity {dispense['quantity']['value']} → {quantity} ")
    valid_medication_request(fixed.resource)


@pytest.mark.parametrize(
    ("dosages", "dispense", "why"),
    [
        pytest.param(
            [dosage()],
            {"expectedSupplyDuration": days(56), "quantity": capsules(60)},
            "it does not match 56 days at 1 capsule a day",
            id="quantity-inconsistent",
        ),
        pytest.param(
            [dosage("Take 1 capsule daily", frequency=None)],
            {"expectedSupplyDuration": days(42), "quantity": capsules(42)},
            "no structured daily frequency",
            id="text-only-frequency",
        ),
        pytest.param(
            [dosage("Take 1 capsule every other day", frequency=1, period=2)],
            {"expectedSupplyDuration": days(42), "quantity": capsules(21)},
            "not a whole number of doses every day",
            id="every-other-day",
        ),
        pytest.param(
            [dosage("3 weeks on, 1 week off")],
            {"expectedSupplyDuration": days(56), "quantity": capsules(42)},
            "no cycle we can read",
            id="cycle-not-readable",
        ),
        pytest.param(
            [dosage("half a capsule daily", dose=0.5)],
            {"expectedSupplyDuration": days(56), "quantity": capsules(28)},
            "not a whole number of capsules",
            id="half-capsule",
        ),
        pytest.param(
            [dosage(), dosage("then 2 capsules daily", dose=2)],
            {"expectedSupplyDuration": days(56), "quantity": capsules(84)},
            "2 dosage instructions",
            id="two-dosage-lines",
        ),
        pytest.param(
            [dosage()],
            {"expectedSupplyDuration": days(56), "quantity": {"value": 2, "unit": "bottle"}},
            "not in capsules",
            id="bottles",
        ),
        pytest.param(
            [dosage("25 mg daily", dose=25, unit="mg")],
            {"expectedSupplyDuration": days(56), "quantity": capsules(56)},
            "a dose of 2.5 capsules is not a whole number of capsules",
            id="mg-not-whole-capsules-of-10-mg",
        ),
        pytest.param(
            [dosage()],
            {"expectedSupplyDuration": {"value": 8, "unit": "fortnights"}, "quantity": capsules(60)},
            "the old supply could not be read",
            id="old-supply-unreadable",
        ),
    ],
)
def test_quantity_left_for_review_when_not_exact(
    dosages: list[dict[str, Any]], dispense: dict[str, Any], why: str
) -> None:
    draft = lenalidomide(dosages=dosages, dispense=dispense)
    fixed = corrected_order(draft, supply_days=28)
    assert fixed.resource["dispenseRequest"]["expectedSupplyDuration"] == DAYS_28
    assert fixed.resource["dispenseRequest"]["quantity"] == dispense["quantity"]
    assert fixed.quantity_needs_review is True
    assert why in fixed.notes[-1] and "left as written" in fixed.notes[-1]
    valid_medication_request(fixed.resource)


def test_mg_dose_without_a_strength_in_the_medication_text_needs_review() -> None:
    draft = lenalidomide(
        dosages=[dosage("10 mg daily", dose=10, unit="mg")],
        dispense={"expectedSupplyDuration": days(56), "quantity": capsules(56)},
        medicationCodeableConcept={"coding": [{"system": RXNORM, "code": "602910"}], "text": "lenalidomide"},
    )
    fixed = corrected_order(draft, supply_days=28)
    assert fixed.quantity_needs_review is True
    assert "the capsule strength cannot be read from the medication" in fixed.notes[-1]


def test_a_cycle_the_reader_would_not_read_is_never_guessed() -> None:
    """ "of 28." at the end of a sentence is not a cycle statement the reader understands: neither
    continuous nor cyclic dosing is assumed."""
    draft = lenalidomide(
        dosages=[dosage("Take 1 capsule daily on days 1-21 of 28.")],
        dispense={"expectedSupplyDuration": days(56), "quantity": capsules(42)},
    )
    fixed = corrected_order(draft, supply_days=28)
    assert fixed.quantity_needs_review is True
    assert fixed.resource["dispenseRequest"]["quantity"] == capsules(42)


def test_a_quantity_that_already_fits_28_days_is_kept_without_a_note() -> None:
    draft = lenalidomide(dispense={"expectedSupplyDuration": days(6, "wk"), "quantity": capsules(28)})
    fixed = corrected_order(draft, supply_days=28)
    assert fixed.resource["dispenseRequest"]["quantity"] == capsules(28)
    assert fixed.notes == ("Supply set to 28 days (was 42 days).",)
    assert fixed.quantity_needs_review is False


def test_no_quantity_sets_only_the_supply() -> None:
    fixed = corrected_order(lenalidomide(dispense={"expectedSupplyDuration": days(42)}), supply_days=28)
    assert fixed.resource["dispenseRequest"] == {"expectedSupplyDuration": DAYS_28}
    assert fixed.quantity_needs_review is False


def test_a_correction_never_lengthens_the_supply() -> None:
    draft = lenalidomide(dispense={"expectedSupplyDuration": days(14), "quantity": capsules(14)})
    fixed = corrected_order(draft, supply_days=28)
    assert fixed.resource["dispenseRequest"] == draft["dispenseRequest"]
    assert fixed.notes == ("The supply is already 14 days: left as written.",)


def test_unknown_supply_gets_28_days() -> None:
    draft = lenalidomide(dosages=[dosage("Take as directed", frequency=None)], dispense={})
    fixed = corrected_order(draft, supply_days=28)
    assert fixed.resource["dispenseRequest"]["expectedSupplyDuration"] == DAYS_28
    assert fixed.notes == ("Supply set to 28 days.",)


@pytest.mark.parametrize(
    ("before", "notes"),
    [
        pytest.param(3, ("Refills removed (was 3).",), id="3-refills"),
        pytest.param(None, (), id="absent"),
        pytest.param(0, (), id="already-0"),
    ],
)
def test_remove_refills(before: int | None, notes: tuple[str, ...]) -> None:
    dispense: dict[str, Any] = {"expectedSupplyDuration": days(28), "quantity": capsules(28)}
    if before is not None:
        dispense["numberOfRepeatsAllowed"] = before
    fixed = corrected_order(lenalidomide(dispense=dispense), remove_refills=True)
    assert fixed.resource["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
    assert fixed.resource["dispenseRequest"]["expectedSupplyDuration"] == days(28)
    assert fixed.notes == notes


def test_corrected_order_keeps_everything_else_and_drops_the_stale_narrative() -> None:
    draft = lenalidomide(
        dispense={"numberOfRepeatsAllowed": 2, "expectedSupplyDuration": days(56), "quantity": capsules(56)},
        text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">56 days, 2 refills</div>'},
        note=[{"text": "REMS Authorization #: 12345678"}],
        identifier=[{"system": AUTHORIZATION_SYSTEM, "value": "12345678"}],
    )
    fixed = corrected_order(draft, supply_days=28, remove_refills=True).resource
    assert fixed["id"] == "draft-1"
    assert "text" not in fixed
    changed = {"text", "dispenseRequest"}
    assert {k: v for k, v in fixed.items() if k not in changed} == {k: v for k, v in draft.items() if k not in changed}
    assert fixed["dispenseRequest"] == {
        "numberOfRepeatsAllowed": 0,
        "expectedSupplyDuration": DAYS_28,
        "quantity": capsules(28),
    }
    valid_medication_request(fixed)


def test_corrected_order_never_mutates_the_draft() -> None:
    draft = lenalidomide(
        dosages=[dosage(CYCLE_TEXT)],
        dispense={"numberOfRepeatsAllowed": 2, "expectedSupplyDuration": days(56), "quantity": capsules(42)},
    )
    before = copy.deepcopy(draft)
    fixed = corrected_order(draft, supply_days=28, remove_refills=True)
    assert draft == before
    fixed.resource["dosageInstruction"][0]["text"] = "changed"
    fixed.resource["medicationCodeableConcept"]["coding"].clear()
    assert draft == before  # a deep copy: nothing shared


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({}, "nothing to correct", id="nothing-asked"),
        pytest.param({"supply_days": 29}, "1-28", id="over-28"),
        pytest.param({"supply_days": 0}, "1-28", id="zero"),
    ],
)
def test_corrected_order_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        corrected_order(lenalidomide(), **kwargs)


def test_corrected_order_refuses_a_resource_that_is_not_a_medication_request() -> None:
    with pytest.raises(ValueError, match="MedicationRequest"):
        corrected_order({"resourceType": "ServiceRequest"}, supply_days=28)


@pytest.mark.parametrize(
    "name",
    [
        "lenalidomide-quantity-42-capsules-56-days",
        "lenalidomide-supply-29-days",
        "refills-not-allowed-two-repeats",
        "revlimid-kitchen-sink-many-problems",
        "medication-refill-30-days-with-refill",
        "supply-unknown-take-as-directed",
    ],
)
def test_corrected_order_round_trip_clears_exactly_the_fixed_findings(name: str) -> None:
    request, now, zone, expected = scenario(name)
    before = codes(request, now, zone)
    assert before == sorted(expected)
    fixed = corrected_order(the_draft(request), supply_days=28, remove_refills=True)
    valid_medication_request(fixed.resource)
    after = codes(with_draft(request, fixed.resource), now, zone)
    fixed_codes = {"supply-over-28-days", "refills-not-allowed", "supply-unknown"}
    assert after == [c for c in before if c not in fixed_codes]


# ------------------------------------------------------------------------------------------------
# pregnancy_test_request
# ------------------------------------------------------------------------------------------------


def test_pregnancy_test_request_is_a_draft_lab_order_for_serum_hcg() -> None:
    sr = pregnancy_test_request(
        patient_id=PATIENT_ID,
        requester="PractitionerRole/onc-1",
        due=date(2025, 6, 20),
        reason_order="MedicationRequest/draft-1",
        drug_name="lenalidomide",
    )
    ServiceRequest.model_validate(sr)
    assert (sr["resourceType"], sr["status"], sr["intent"]) == ("ServiceRequest", "draft", "order")
    assert "id" not in sr
    assert sr["code"]["coding"][0] == {
        "system": "http://loinc.org",
        "code": "2118-8",
        "display": "Choriogonadotropin (pregnancy test) [Presence] in Serum or Plasma",
    }
    assert sr["category"] == [{"coding": [{"system": SNOMED, "code": "108252007", "display": "Laboratory procedure"}]}]
    assert sr["subject"] == {"reference": "Patient/pat-1"}
    assert sr["requester"] == {"reference": "PractitionerRole/onc-1"}
    assert sr["reasonReference"] == [{"reference": "MedicationRequest/draft-1"}]
    assert sr["occurrencePeriod"] == {"start": "2025-06-20", "end": "2025-06-27"}
    assert sr["note"] == [
        {
            "text": "REMS (lenalidomide): a negative pregnancy test is needed within 7 days before each dispense. "
            "Collect on or after 2025-06-20."
        }
    ]


def test_pregnancy_test_request_without_requester_or_reason() -> None:
    sr = pregnancy_test_request(
        patient_id=PATIENT_ID,
        requester=None,
        due=date(2025, 6, 18),
        reason_order=None,
        drug_name="thalidomide",
        window_days=5,
    )
    ServiceRequest.model_validate(sr)
    assert "requester" not in sr and "reasonReference" not in sr
    assert sr["occurrencePeriod"] == {"start": "2025-06-18", "end": "2025-06-23"}


def test_the_requested_test_is_one_our_reader_counts() -> None:
    """The result that comes back for the order must count as a pregnancy test (codes.toml)."""
    table = tomllib.loads((ROOT / "fhir_mappings" / "data" / "codes.toml").read_text(encoding="utf-8"))
    assert PREGNANCY_TEST_CODE in table["pregnancy"]["qualitative"]


def test_pregnancy_test_request_wants_an_id_not_a_reference() -> None:
    with pytest.raises(ValueError, match="FHIR id"):
        pregnancy_test_request(
            patient_id="Patient/pat-1", requester=None, due=date(2025, 6, 18), reason_order=None, drug_name="x"
        )


# ------------------------------------------------------------------------------------------------
# next_prescription
# ------------------------------------------------------------------------------------------------

ADULT_MALE = (RiskCategory.ADULT_MALE.value, RiskCategory.ADULT_MALE.display)


def draft_from(prior: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """`next_prescription` of `prior` for an adult male, 28 days, authorization 87654321."""
    kwargs: dict[str, Any] = {
        "prior_reference": f"MedicationRequest/{prior.get('id', 'prior')}",
        "patient_id": PATIENT_ID,
        "supply_days": 28,
        "category_code": ADULT_MALE[0],
        "category_display": ADULT_MALE[1],
        "authorization": "87654321",
        "draft_identifier": "refill-0001",
        "authored_on": NOW,
        "requester": "PractitionerRole/pharmacist-1",
    }
    kwargs.update(overrides)
    return next_prescription(prior, **kwargs)


def active_prior(**fields: Any) -> dict[str, Any]:
    """The prescription being continued: active, cyclic, 21 capsules for 28 days, last month's REMS
    authorization number in an identifier and a note, performed by a certified pharmacy."""
    prior = lenalidomide(
        "prior-1",
        status="active",
        dosages=[dosage(CYCLE_TEXT)],
        dispense={
            "numberOfRepeatsAllowed": 0,
            "quantity": {
                "value": 21,
                "unit": "capsule",
                "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
                "code": "CAP",
            },
            "expectedSupplyDuration": days(28),
            "performer": {"reference": "Organization/rems-pharmacy"},
        },
        identifier=[{"system": AUTHORIZATION_SYSTEM, "value": "11112222"}],
        note=[{"text": "REMS Authorization #: 11112222"}],
        reasonCode=[{"text": "Multiple myeloma"}],
        meta={"versionId": "3"},
        text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">last month</div>'},
    )
    prior.update(fields)
    return prior


def test_next_prescription_shape() -> None:
    prior = active_prior()
    mr = draft_from(prior)
    valid_medication_request(mr)
    assert "id" not in mr and "meta" not in mr and "text" not in mr
    assert (mr["status"], mr["intent"]) == ("draft", "order")
    assert mr["priorPrescription"] == {"reference": "MedicationRequest/prior-1"}
    assert mr["subject"] == {"reference": "Patient/pat-1"}
    assert mr["medicationCodeableConcept"] == prior["medicationCodeableConcept"]
    assert mr["dosageInstruction"] == prior["dosageInstruction"]
    assert mr["reasonCode"] == prior["reasonCode"]
    assert mr["authoredOn"] == "2025-06-18T10:00:00-05:00"
    assert mr["requester"] == {"reference": "PractitionerRole/pharmacist-1"}
    assert mr["dispenseRequest"] == {
        "numberOfRepeatsAllowed": 0,
        "quantity": {
            "value": 21,
            "unit": "capsule",
            "system": "http://terminology.hl7.org/CodeSystem/v3-orderableDrugForm",
            "code": "CAP",
        },
        "expectedSupplyDuration": DAYS_28,
        "performer": {"reference": "Organization/rems-pharmacy"},
    }
    assert mr["extension"] == [
        {
            "url": RISK_CATEGORY_EXTENSION,
            "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": "adult-male", "display": "Adult Male"},
        }
    ]
    assert mr["identifier"] == [
        {"system": REFILL_DRAFT_SYSTEM, "value": "refill-0001"},
        {"type": {"text": "REMS authorization number"}, "system": AUTHORIZATION_SYSTEM, "value": "87654321"},
    ]
    # The prior's number (11112222) is not carried anywhere: each prescription has its own.
    assert mr["note"] == [
        {"text": "REMS risk category: Adult Male (adult-male)"},
        {"text": "REMS Authorization #: 87654321"},
    ]
    assert "11112222" not in json.dumps(mr)


def test_next_prescription_without_authorization_writes_none() -> None:
    mr = draft_from(active_prior(), authorization=None, authored_on=None, requester=None)
    valid_medication_request(mr)
    assert mr["identifier"] == [{"system": REFILL_DRAFT_SYSTEM, "value": "refill-0001"}]
    assert mr["note"] == [{"text": "REMS risk category: Adult Male (adult-male)"}]
    assert "authoredOn" not in mr and "requester" not in mr


def test_next_prescription_with_unknown_category_writes_none() -> None:
    mr = draft_from(active_prior(), category_code="", category_display="")
    valid_medication_request(mr)
    assert "extension" not in mr
    assert mr["note"] == [{"text": "REMS Authorization #: 87654321"}]


@pytest.mark.parametrize(
    ("dosages", "supply_days", "quantity"),
    [
        pytest.param([dosage(CYCLE_TEXT)], 28, 21, id="cycle-28"),
        pytest.param([dosage(CYCLE_TEXT)], 21, 21, id="cycle-21"),
        pytest.param([dosage(CYCLE_TEXT)], 14, 14, id="cycle-14"),
        pytest.param([dosage()], 28, 28, id="daily-28"),
        pytest.param([dosage()], 21, 21, id="daily-21"),
        pytest.param([dosage("1 capsule twice daily", frequency=2)], 28, 56, id="twice-daily"),
        pytest.param([dosage("20 mg daily", dose=20, unit="mg")], 28, 56, id="mg-dose"),
    ],
)
def test_next_prescription_quantity(dosages: list[dict[str, Any]], supply_days: int, quantity: int) -> None:
    prior = active_prior(dosageInstruction=dosages)
    del prior["dispenseRequest"]["quantity"]  # no capsule unit to copy: written as UCUM {capsule}
    mr = draft_from(prior, supply_days=supply_days)
    assert mr["dispenseRequest"]["quantity"] == capsules(quantity)
    assert mr["dispenseRequest"]["expectedSupplyDuration"] == {**DAYS_28, "value": supply_days}
    valid_medication_request(mr)


def test_next_prescription_without_an_exact_count_leaves_the_quantity_to_the_pharmacist() -> None:
    mr = draft_from(active_prior(dosageInstruction=[dosage("Take as directed", frequency=None)]))
    assert "quantity" not in mr["dispenseRequest"]
    assert mr["note"][-1] == {
        "text": "Quantity not set: the dosage states no structured daily frequency. Enter the capsules for 28 days."
    }
    valid_medication_request(mr)


def test_a_cycle_stated_only_in_the_prior_note_is_kept_in_a_note() -> None:
    prior = active_prior(
        dosageInstruction=[dosage("Take 1 capsule daily")],
        note=[{"text": "Cycle: days 1-21 of each 28-day cycle. REMS auth 11112222"}],
    )
    mr = draft_from(prior)
    assert mr["dispenseRequest"]["quantity"]["value"] == 21
    assert {"text": "Dosing cycle: days 1-21 of each 28-day cycle."} in mr["note"]
    assert "11112222" not in json.dumps(mr)


@pytest.mark.parametrize(
    ("instruction", "kept"),
    [
        pytest.param("Take with water. REMS auth 11112222", "Take with water.", id="after"),
        pytest.param("REMS Authorization #: 11112222. Take with water.", "Take with water.", id="before"),
        pytest.param("Take with water; Auth# 1111-2222, swallow whole", "Take with water; swallow whole", id="middle"),
        pytest.param("REMS authorization number 11112222", None, id="only-the-number"),
    ],
)
def test_an_authorization_number_in_the_prior_dosage_text_is_removed(instruction: str, kept: str | None) -> None:
    prior = active_prior(dosageInstruction=[{**dosage(CYCLE_TEXT), "patientInstruction": instruction}])
    mr = draft_from(prior, authorization=None)
    assert mr["dosageInstruction"][0].get("patientInstruction") == kept
    assert mr["dosageInstruction"][0]["text"] == CYCLE_TEXT
    assert mr["note"][-1]["text"].startswith("An authorization number in the prior prescription's dosage text")
    assert prior["dosageInstruction"][0]["patientInstruction"] == instruction
    valid_medication_request(mr)


def test_a_contained_medication_travels_with_the_reference() -> None:
    med = {
        "resourceType": "Medication",
        "id": "med-1",
        "code": {"coding": [{"system": RXNORM, "code": "602910", "display": "lenalidomide 10 MG Oral Capsule"}]},
    }
    prior = active_prior(contained=[med], medicationReference={"reference": "#med-1"})
    del prior["medicationCodeableConcept"]
    mr = draft_from(prior)
    assert mr["contained"] == [med] and mr["medicationReference"] == {"reference": "#med-1"}
    assert "medicationCodeableConcept" not in mr
    valid_medication_request(mr)


def test_next_prescription_never_mutates_the_prior() -> None:
    prior = active_prior()
    before = copy.deepcopy(prior)
    mr = draft_from(prior)
    assert prior == before
    mr["dosageInstruction"][0]["text"] = "changed"
    mr["medicationCodeableConcept"]["coding"].clear()
    mr["dispenseRequest"]["performer"]["reference"] = "changed"
    assert prior == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        pytest.param({"supply_days": 29}, "1-28", id="over-28"),
        pytest.param({"supply_days": 0}, "1-28", id="zero"),
        pytest.param({"category_code": "frp"}, "not a REMS risk category", id="unknown-category"),
        pytest.param({"category_display": "Adult Female Who Can Get Pregnant"}, "does not name", id="display-mismatch"),
        pytest.param({"category_code": ""}, "without a category_code", id="display-without-code"),
        pytest.param({"authored_on": datetime(2025, 6, 18, 10, 0)}, "timezone-aware", id="naive-datetime"),
        pytest.param({"patient_id": "other"}, "Patient/pat-1", id="another-patients-prior"),
        pytest.param({"authorization": "12 34"}, "letters, digits", id="authorization-with-space"),
        pytest.param({"draft_identifier": " "}, "must not be empty", id="empty-draft-identifier"),
    ],
)
def test_next_prescription_refuses_bad_arguments(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        draft_from(active_prior(), **overrides)


def _strip_structured_rems(mr: dict[str, Any]) -> dict[str, Any]:
    """What an EHR that drops extensions and unknown identifiers keeps: the notes."""
    out = copy.deepcopy(mr)
    out.pop("extension")
    out.pop("identifier")
    return out


@pytest.mark.parametrize("structured", [True, False], ids=["as-written", "extensions-dropped"])
def test_next_prescription_round_trip_medication_refill(structured: bool) -> None:
    """The clean refill scenario, its draft replaced by our next prescription of the active order: still
    no card (so no supply, refill, category or authorization finding), with or without the extension."""
    request, now, zone, expected = scenario("medication-refill-lenalidomide-adult-male-clean")
    assert expected == []
    prior = chart_order(request, "medrx-ef5245a2")
    mr = next_prescription(
        prior,
        prior_reference="MedicationRequest/medrx-ef5245a2",
        patient_id=request["context"]["patientId"],
        supply_days=28,
        category_code="adult-male",
        category_display="Adult Male",
        authorization="59569826",
        draft_identifier="refill-medrx-ef5245a2-1",
        authored_on=now,
        requester=request["context"]["userId"],
    )
    valid_medication_request(mr)
    sent = mr if structured else _strip_structured_rems(mr)
    assert codes(with_draft(request, {**sent, "id": "assigned-1"}), now, zone) == []


def test_next_prescription_round_trip_order_sign_frp() -> None:
    """The clean 'adult-female-rp' order-sign scenario with our next prescription of her last
    lenalidomide order in place of the EHR's draft: still no card, with or without the extension."""
    request, now, zone, expected = scenario("lenalidomide-adult-female-rp-ongoing-clean")
    assert expected == []
    prior = chart_order(request, "medrx-b3ecabb3")
    assert "lenalidomide" in prior["medicationCodeableConcept"]["text"]

    def draft(authorization: str | None) -> dict[str, Any]:
        return next_prescription(
            prior,
            prior_reference="MedicationRequest/medrx-b3ecabb3",
            patient_id=request["context"]["patientId"],
            supply_days=28,
            category_code="adult-female-rp",
            category_display="Adult Female Who Can Get Pregnant",
            authorization=authorization,
            draft_identifier="refill-medrx-b3ecabb3-1",
            authored_on=now,
            requester=request["context"]["userId"],
        )

    mr = draft("47193348")
    valid_medication_request(mr)
    assert mr["dispenseRequest"]["quantity"]["value"] == 21
    assert codes(with_draft(request, {**mr, "id": "assigned-2"}), now, zone) == []
    assert codes(with_draft(request, {**_strip_structured_rems(mr), "id": "assigned-2"}), now, zone) == []
    # Control: the draft is judged as an IMiD order (a missing number is caught).
    assert codes(with_draft(request, {**draft(None), "id": "assigned-2"}), now, zone) == ["authorization-missing"]


def test_next_prescription_without_authorization_still_raises_authorization_missing() -> None:
    """We never invent or carry over a number: the REMS finding stays until the prescriber adds one."""
    request, now, zone, _ = scenario("medication-refill-lenalidomide-adult-male-clean")
    prior = chart_order(request, "medrx-ef5245a2")
    mr = draft_from(prior, patient_id=request["context"]["patientId"], authorization=None, authored_on=now)
    assert codes(with_draft(request, {**mr, "id": "assigned-3"}), now, zone) == ["authorization-missing"]


PATIENT_FOR = {
    RiskCategory.ADULT_FEMALE_RP: ("female", "1990-01-01"),
    RiskCategory.CHILD_FEMALE_RP: ("female", "2011-01-01"),
    RiskCategory.ADULT_FEMALE_NRP: ("female", "1960-01-01"),
    RiskCategory.CHILD_FEMALE_NRP: ("female", "2016-01-01"),
    RiskCategory.ADULT_MALE: ("male", "1960-01-01"),
    RiskCategory.CHILD_MALE: ("male", "2011-01-01"),
}


@pytest.mark.parametrize("category", list(RiskCategory), ids=[c.value for c in RiskCategory])
def test_every_category_note_reads_back_without_the_extension(category: RiskCategory) -> None:
    """With the extension dropped, the note alone must give the same category: a patient of that
    category gets neither `risk-category-missing` nor `risk-category-mismatch`."""
    gender, born = PATIENT_FOR[category]
    prior = active_prior(dispenseRequest={"numberOfRepeatsAllowed": 0, "expectedSupplyDuration": days(28)})
    mr = draft_from(prior, category_code=category.value, category_display=category.display)
    hysterectomy = {
        "resourceType": "Procedure",
        "id": "hysterectomy",
        "status": "completed",
        "subject": {"reference": f"Patient/{PATIENT_ID}"},
        "code": {"coding": [{"system": SNOMED, "code": "236886002", "display": "Hysterectomy"}]},
        "performedDateTime": "2010-05-04",
    }
    request: dict[str, Any] = {
        "hook": "order-sign",
        "hookInstance": "5c2e6f0e-7a63-4d4e-9a51-3f1c1f2b9e10",
        "context": {
            "userId": "PractitionerRole/onc-1",
            "patientId": PATIENT_ID,
            "draftOrders": {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {**_strip_structured_rems(mr), "id": "draft-9"}}],
            },
        },
        "prefetch": {
            "patient": {"resourceType": "Patient", "id": PATIENT_ID, "gender": gender, "birthDate": born},
        },
    }
    if category is RiskCategory.ADULT_FEMALE_NRP:  # "cannot get pregnant" needs its evidence
        request["prefetch"]["procedures"] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "entry": [{"resource": hysterectomy}],
        }
    found = codes(request, NOW, CHICAGO)
    assert "risk-category-missing" not in found and "risk-category-mismatch" not in found
    assert "supply-over-28-days" not in found and "refills-not-allowed" not in found
    # Control: without the note too, the category is missing (so the note is what was read).
    entry = request["context"]["draftOrders"]["entry"][0]
    entry["resource"]["note"] = [n for n in entry["resource"]["note"] if "risk category" not in n["text"]]
    assert "risk-category-missing" in codes(request, NOW, CHICAGO)
