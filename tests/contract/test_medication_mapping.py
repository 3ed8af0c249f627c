"""MedicationRequest → IMiD facts, against real-shaped FHIR R4 orders (FHIR_CONTRACT.md, CODES.md,
DECISIONS.md "Supply, refills, early refill").

Recognition by RxNorm ingredient / SCD / SBD and by display text, brand detection, strength, days'
supply in every form, refills, mg a day, and the REMS authorization number and risk category in each
of the three forms the contract lists."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from rems.model import Drug, RiskCategory

from .fhir_json import (
    AUTHORIZATION_SYSTEM,
    CHICAGO,
    EPIC_MEDICATION_OID,
    EPIC_ORDER_OID,
    RISK_CATEGORY_EXTENSION,
    RISK_CATEGORY_SYSTEM,
    TOKYO,
    capsule_dose,
    imid,
    lenalidomide_request,
    medication,
    medication_request,
    mg_dose,
    observation,
    order_of,
    quantity,
    rxnorm,
)

LEN, POM, THAL = Drug.LENALIDOMIDE, Drug.POMALIDOMIDE, Drug.THALIDOMIDE


# ------------------------------------------------------------------------------------------------
# Which IMiD, brand or generic, what strength
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "display", "drug", "brand", "strength"),
    [
        # lenalidomide: ingredient, SCD, SBD, brand name, dose forms
        ("342369", "lenalidomide", LEN, False, None),
        ("643720", "lenalidomide 25 MG Oral Capsule", LEN, False, Decimal(25)),
        ("1242231", "lenalidomide 2.5 MG Oral Capsule", LEN, False, Decimal("2.5")),
        ("643722", "lenalidomide 25 MG Oral Capsule [Revlimid]", LEN, True, Decimal(25)),
        ("1429367", "lenalidomide 20 MG Oral Capsule [Revlimid]", LEN, True, Decimal(20)),
        ("337535", "Revlimid", LEN, True, None),
        ("602909", "lenalidomide Oral Capsule", LEN, False, None),
        ("616113", "lenalidomide Oral Capsule [Revlimid]", LEN, True, None),
        # thalidomide
        ("10432", "thalidomide", THAL, False, None),
        ("360176", "thalidomide 100 MG Oral Capsule", THAL, False, Decimal(100)),
        ("404450", "thalidomide 200 MG Oral Capsule [Thalomid]", THAL, True, Decimal(200)),
        ("220239", "Thalomid", THAL, True, None),
        # pomalidomide: strength of the SCDs comes from the display text (CODES.md)
        ("1369713", "pomalidomide", POM, False, None),
        ("1369734", "pomalidomide 4 MG Oral Capsule", POM, False, Decimal(4)),
        ("1369718", "pomalidomide 1 MG Oral Capsule", POM, False, Decimal(1)),
    ],
)
def test_imid_recognised_by_rxnorm_code(
    code: str, display: str, drug: Drug, brand: bool, strength: Decimal | None
) -> None:
    order = imid(lenalidomide_request(medicationCodeableConcept=rxnorm(code, display)))
    assert (order.drug, order.brand, order.strength_mg) == (drug, brand, strength)


@pytest.mark.parametrize(
    ("code", "drug", "strength"),
    [("602910", LEN, Decimal(10)), ("616116", LEN, Decimal(5)), ("700416", THAL, Decimal(150))],
)
def test_strength_from_the_code_when_the_coding_has_no_display(code: str, drug: Drug, strength: Decimal) -> None:
    order = imid(lenalidomide_request(medicationCodeableConcept=rxnorm(code)))
    assert (order.drug, order.strength_mg) == (drug, strength)


def test_revlimid_sbd_is_brand_and_generic_scd_is_not() -> None:
    brand = imid(lenalidomide_request(medicationCodeableConcept=rxnorm("643722", "Revlimid 25 MG Oral Capsule")))
    generic = imid(lenalidomide_request(medicationCodeableConcept=rxnorm("643720", "lenalidomide 25 MG Oral Capsule")))
    assert brand.brand is True
    assert generic.brand is False
    assert brand.strength_mg == generic.strength_mg == Decimal(25)


@pytest.mark.parametrize(
    ("text", "drug", "brand", "strength"),
    [
        ("lenalidomide 10 mg capsule", LEN, False, Decimal(10)),
        ("REVLIMID 5 MG PO CAPS", LEN, True, Decimal(5)),
        ("lenalidomide (REVLIMID) 2.5 mg capsule", LEN, True, Decimal("2.5")),
        ("pomalidomide 4 MG", POM, False, Decimal(4)),
        ("Pomalyst 2 mg capsule", POM, True, Decimal(2)),
        ("THALIDOMIDE 50 MG PO CAPS", THAL, False, Decimal(50)),
        ("Thalomid 100mg capsule", THAL, True, Decimal(100)),
    ],
)
def test_imid_recognised_by_display_text_only(text: str, drug: Drug, brand: bool, strength: Decimal) -> None:
    """Epic-like: a local code system the product does not know, the drug only in the text."""
    concept = {"coding": [{"system": EPIC_MEDICATION_OID, "code": "77421"}], "text": text}
    order = imid(lenalidomide_request(medicationCodeableConcept=concept))
    assert (order.drug, order.brand, order.strength_mg) == (drug, brand, strength)
    assert text in order.medication_text


@pytest.mark.parametrize(
    "concept",
    [
        rxnorm("243670", "aspirin 81 MG Oral Tablet"),
        rxnorm("197579", "dexamethasone 4 MG Oral Tablet"),
        {"text": "apixaban 5 mg tablet"},
        # an IMiD code in another code system is not an RxNorm IMiD code
        {"coding": [{"system": EPIC_MEDICATION_OID, "code": "643722"}], "text": "bortezomib 3.5 mg injection"},
    ],
)
def test_non_imid_is_none(concept: dict[str, Any]) -> None:
    assert order_of(lenalidomide_request(medicationCodeableConcept=concept)) is None


def test_medication_reference_to_a_medication_in_the_chart() -> None:
    """Cerner-like: the order points at a Medication resource."""
    raw = medication_request(
        medicationReference={"reference": "Medication/med-len-25"},
        dosageInstruction=[capsule_dose()],
        dispenseRequest={"quantity": quantity(28, "capsule", "{capsule}")},
    )
    order = imid(raw, medication("med-len-25", rxnorm("643720", "lenalidomide 25 MG Oral Capsule")))
    assert (order.drug, order.brand, order.strength_mg) == (LEN, False, Decimal(25))


def test_medication_reference_by_absolute_url() -> None:
    raw = medication_request(medicationReference={"reference": "https://fhir.example.org/r4/Medication/med-t"})
    order = imid(raw, medication("med-t", rxnorm("404449", "thalidomide 100 MG Oral Capsule [Thalomid]")))
    assert (order.drug, order.brand, order.strength_mg) == (THAL, True, Decimal(100))


def test_medication_reference_to_a_contained_medication() -> None:
    raw = medication_request(
        contained=[medication("med", rxnorm("1369734", "pomalidomide 4 MG Oral Capsule"))],
        medicationReference={"reference": "#med"},
    )
    order = imid(raw)
    assert (order.drug, order.strength_mg) == (POM, Decimal(4))


def test_medication_reference_to_a_contained_non_imid_is_none() -> None:
    raw = medication_request(
        contained=[medication("med", rxnorm("243670", "aspirin 81 MG Oral Tablet"))],
        medicationReference={"reference": "#med"},
    )
    assert order_of(raw) is None


def test_unresolvable_medication_reference_falls_back_to_its_display() -> None:
    raw = medication_request(
        medicationReference={"reference": "Medication/not-sent", "display": "Revlimid 10 mg capsule"}
    )
    order = order_of(raw)
    assert order is not None
    assert (order.drug, order.brand, order.strength_mg) == (LEN, True, Decimal(10))


@pytest.mark.parametrize(
    ("authored", "zone", "day"),
    [
        ("2025-06-18T03:30:00Z", CHICAGO, date(2025, 6, 17)),  # 22:30 the evening before in Chicago
        ("2025-06-18T03:30:00Z", TOKYO, date(2025, 6, 18)),
        ("2025-06-17T20:00:00-04:00", TOKYO, date(2025, 6, 18)),  # 09:00 next morning in Tokyo
        ("2025-06-17", CHICAGO, date(2025, 6, 17)),
    ],
)
def test_order_start_is_the_clinic_local_day_of_authored_on(authored: str, zone: ZoneInfo, day: date) -> None:
    order = order_of(lenalidomide_request(authoredOn=authored), zone=zone)
    assert order is not None
    assert order.start == day


def test_validity_period_start_wins_over_authored_on() -> None:
    raw = lenalidomide_request(
        authoredOn="2025-06-18T09:15:00-05:00",
        dispenseRequest={
            "validityPeriod": {"start": "2025-06-20", "end": "2025-07-04"},
            "quantity": quantity(28, "capsule", "{capsule}"),
        },
    )
    assert imid(raw).start == date(2025, 6, 20)


# ------------------------------------------------------------------------------------------------
# Days' supply
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("duration", "days"),
    [
        (quantity(28, "days", "d"), Decimal(28)),
        (quantity(21, "day"), Decimal(21)),
        (quantity(4, "week", "wk"), Decimal(28)),
        (quantity(6, "wk"), Decimal(42)),
        (quantity(1, "month", "mo"), Decimal(30)),
    ],
)
def test_days_supply_from_expected_supply_duration(duration: dict[str, Any], days: Decimal) -> None:
    raw = lenalidomide_request(
        dispenseRequest={"expectedSupplyDuration": duration, "quantity": quantity(28, "capsule", "{capsule}")}
    )
    order = imid(raw)
    assert order.supply is not None
    assert order.supply.days == days
    assert order.supply.how == "expectedSupplyDuration"
    assert order.supply_problem is None


def test_expected_supply_duration_in_an_unknown_unit_is_a_problem_not_a_guess() -> None:
    raw = lenalidomide_request(dispenseRequest={"expectedSupplyDuration": quantity(1, "a", "a")})
    order = imid(raw)
    assert order.supply is None
    assert order.supply_problem is not None and "'a'" in order.supply_problem


@pytest.mark.parametrize(
    ("capsules_per_dose", "frequency", "period", "qty", "days"),
    [
        (1, 1, 1, 28, Decimal(28)),
        (1, 1, 1, 21, Decimal(21)),
        (2, 1, 1, 56, Decimal(28)),
        (1, 2, 1, 60, Decimal(30)),  # BID
        (1, 1, 2, 14, Decimal(28)),  # every other day
        (1, 1, 1, 29, Decimal(29)),
    ],
)
def test_days_supply_from_quantity_over_capsules_a_day(
    capsules_per_dose: int, frequency: int, period: int, qty: int, days: Decimal
) -> None:
    """Cerner-like: no expectedSupplyDuration, the quantity in capsules and a structured dose."""
    raw = lenalidomide_request(
        dosageInstruction=[capsule_dose(capsules_per_dose, frequency, period, text="Take as directed")],
        dispenseRequest={"quantity": quantity(qty, "capsule", "{capsule}"), "numberOfRepeatsAllowed": 0},
    )
    order = imid(raw)
    assert order.supply is not None, order.supply_problem
    assert order.supply.days == days
    assert f"{qty} capsules" in order.supply.how


@pytest.mark.parametrize(
    ("instruction", "qty", "days"),
    [
        ("Take 1 capsule by mouth daily on days 1-21 of each 28-day cycle", 21, Decimal(28)),
        ("Take 1 capsule by mouth daily on days 1-21 of each 28-day cycle", 42, Decimal(56)),
        ("Take 1 capsule by mouth daily on days 1-21 of each 28-day cycle", 25, Decimal(32)),
        ("1 capsule daily, 21 days on, 7 days off", 21, Decimal(28)),
        ("Take 1 capsule daily on days 1 through 14 every 21 days", 14, Decimal(21)),
    ],
)
def test_days_supply_over_a_stated_cycle(instruction: str, qty: int, days: Decimal) -> None:
    """DECISIONS: N dose-days with k on-days of a C-day cycle → (N // k) × C + N % k calendar days."""
    raw = lenalidomide_request(
        dosageInstruction=[capsule_dose(1, None, text=instruction)],
        dispenseRequest={"quantity": quantity(qty, "capsule", "{capsule}")},
    )
    order = imid(raw)
    assert order.supply is not None, order.supply_problem
    assert order.supply.days == days
    assert order.dose.cycle_days is not None and order.dose.days_on_per_cycle is not None


def test_cycle_from_the_epic_note_is_read_with_structured_daily_timing() -> None:
    raw = lenalidomide_request(
        dosageInstruction=[capsule_dose(1, 1, text="Take 1 capsule by mouth daily")],
        note=[{"text": "Days 1-21 of each 28-day cycle. REMS auth 12345678"}],
        dispenseRequest={"quantity": quantity(21, "capsule", "{capsule}")},
    )
    order = imid(raw)
    assert (order.dose.days_on_per_cycle, order.dose.cycle_days) == (21, 28)
    assert order.supply is not None and order.supply.days == Decimal(28)


def test_days_supply_over_the_decisions_example_days_1_21_of_28() -> None:
    raw = lenalidomide_request(
        dosageInstruction=[capsule_dose(1, None, text="Take 1 capsule by mouth daily on days 1-21 of 28")],
        dispenseRequest={"quantity": quantity(21, "capsule", "{capsule}")},
    )
    order = imid(raw)
    assert (order.dose.days_on_per_cycle, order.dose.cycle_days) == (21, 28)
    assert order.supply is not None and order.supply.days == Decimal(28)


def test_continuous_daily_dosing_has_no_cycle() -> None:
    order = imid(lenalidomide_request())
    assert (order.dose.days_on_per_cycle, order.dose.cycle_days) == (None, None)
    assert order.supply is not None and order.supply.days == Decimal(28)


@pytest.mark.parametrize(
    ("fields", "problem_mentions"),
    [
        ({"dispenseRequest": {"quantity": quantity(280, "mg", "mg")}}, "'mg'"),
        ({"dispenseRequest": {"quantity": quantity(2, "bottle")}}, "'bottle'"),
        ({"dosageInstruction": [], "dispenseRequest": {"quantity": quantity(28, "capsule")}}, "dosage"),
        (
            {
                "dosageInstruction": [{"text": "Take as directed"}],
                "dispenseRequest": {"quantity": quantity(28, "capsule")},
            },
            "dosage",
        ),
        ({"dispenseRequest": {"numberOfRepeatsAllowed": 0}}, "quantity"),
        ({"dispenseRequest": None}, "quantity"),
    ],
)
def test_supply_unknown_with_a_reason(fields: dict[str, Any], problem_mentions: str) -> None:
    raw = lenalidomide_request(**fields)
    raw = {k: v for k, v in raw.items() if v is not None}
    order = imid(raw)
    assert order.supply is None
    assert order.supply_problem is not None
    assert problem_mentions in order.supply_problem


def test_twice_daily_in_text_is_not_read_as_once_daily() -> None:
    raw = medication_request(
        medicationCodeableConcept={"text": "thalidomide 50 mg capsule"},
        dosageInstruction=[capsule_dose(1, None, text="Take 1 capsule by mouth twice daily")],
        dispenseRequest={"quantity": quantity(28, "capsule")},
    )
    order = imid(raw)
    assert order.dose.capsules_per_day in (None, Decimal(2))
    assert order.dose.mg_per_day in (None, Decimal(100))
    assert order.supply is None or order.supply.days == Decimal(14)


# ------------------------------------------------------------------------------------------------
# Refills and dose
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("repeats", "refills"), [(0, 0), (3, 3), (None, None)])
def test_refills_from_number_of_repeats_allowed(repeats: int | None, refills: int | None) -> None:
    dispense: dict[str, Any] = {"quantity": quantity(28, "capsule")}
    if repeats is not None:
        dispense["numberOfRepeatsAllowed"] = repeats
    assert imid(lenalidomide_request(dispenseRequest=dispense)).refills == refills


@pytest.mark.parametrize(
    ("concept", "dosage", "mg_per_day", "capsules_per_day"),
    [
        # capsules × strength (strength from the SCD code)
        (rxnorm("643720", "lenalidomide 25 MG Oral Capsule"), capsule_dose(1), Decimal(25), Decimal(1)),
        (rxnorm("1242231", "lenalidomide 2.5 MG Oral Capsule"), capsule_dose(2), Decimal(5), Decimal(2)),
        # strength from text
        ({"text": "pomalidomide 4 MG"}, capsule_dose(1), Decimal(4), Decimal(1)),
        # a dose in mg: capsules = mg / strength
        (rxnorm("602912", "lenalidomide 5 MG Oral Capsule"), mg_dose(10), Decimal(10), Decimal(2)),
        # BID
        (rxnorm("360176", "thalidomide 100 MG Oral Capsule"), mg_dose(100, frequency=2), Decimal(200), Decimal(2)),
        (rxnorm("200390", "thalidomide 50 MG Oral Capsule"), capsule_dose(1, 2), Decimal(100), Decimal(2)),
        # every other day
        ({"text": "pomalidomide 4 MG"}, capsule_dose(1, 1, 2), Decimal(2), Decimal("0.5")),
        # no structured timing: "daily" in the text
        (
            {"text": "lenalidomide 15 mg capsule"},
            capsule_dose(1, None, text="Take 1 capsule daily"),
            Decimal(15),
            Decimal(1),
        ),
    ],
)
def test_mg_and_capsules_a_day(
    concept: dict[str, Any], dosage: dict[str, Any], mg_per_day: Decimal, capsules_per_day: Decimal
) -> None:
    order = imid(lenalidomide_request(medicationCodeableConcept=concept, dosageInstruction=[dosage]))
    assert order.dose.mg_per_day == mg_per_day
    assert order.dose.capsules_per_day == capsules_per_day


def test_no_dosage_means_unknown_dose_not_zero() -> None:
    order = imid(lenalidomide_request(dosageInstruction=[]))
    assert order.dose.mg_per_day is None
    assert order.dose.capsules_per_day is None


def test_mg_dose_without_a_known_strength_gives_mg_but_not_capsules() -> None:
    order = imid(
        lenalidomide_request(
            medicationCodeableConcept=rxnorm("342369", "lenalidomide"), dosageInstruction=[mg_dose(10)]
        )
    )
    assert order.dose.mg_per_day == Decimal(10)
    assert order.dose.capsules_per_day is None
    assert order.supply is None  # 28 capsules at an unknown number a day


# ------------------------------------------------------------------------------------------------
# REMS authorization number
# ------------------------------------------------------------------------------------------------


def test_authorization_from_the_rems_identifier_system() -> None:
    raw = lenalidomide_request(
        identifier=[
            {"system": EPIC_ORDER_OID, "value": "987654"},
            {"system": AUTHORIZATION_SYSTEM, "value": "12345678"},
        ],
        note=[{"text": "REMS auth 99990000"}],
    )
    order = imid(raw)
    assert order.authorization_number == "12345678"
    assert order.authorization_source is not None
    assert order.authorization_source.reference == "MedicationRequest/draft-1"
    assert "identifier" in order.authorization_source.element


@pytest.mark.parametrize(
    "type_",
    [
        {"text": "REMS Authorization Number"},
        {"coding": [{"system": "urn:oid:1.2.840.114350.1.72.1", "code": "RA", "display": "REMS authorization"}]},
    ],
)
def test_authorization_from_an_identifier_typed_rems_authorization(type_: dict[str, Any]) -> None:
    raw = lenalidomide_request(
        identifier=[
            {"system": EPIC_ORDER_OID, "type": {"text": "Order ID"}, "value": "987654"},
            {"system": "urn:oid:1.2.840.114350.1.13.0.1.7.2.999", "type": type_, "value": "23456789"},
        ],
    )
    order = imid(raw)
    assert order.authorization_number == "23456789"
    assert order.authorization_source is not None
    assert "typed" in order.authorization_source.element


@pytest.mark.parametrize(
    "text",
    [
        "REMS Authorization #: 12345678",
        "REMS auth 12345678",
        "Auth# 12345678",
        "rems authorization number 12345678",
        "Pt counseled. REMS AUTHORIZATION #12345678 obtained 6/17/2025",
    ],
)
def test_authorization_from_note_text(text: str) -> None:
    order = imid(lenalidomide_request(note=[{"text": text}]))
    assert order.authorization_number == "12345678"
    assert order.authorization_source is not None
    assert order.authorization_source.element == "note or dosage text"


def test_authorization_from_the_patient_instruction() -> None:
    dosage = capsule_dose(1) | {"patientInstruction": "Take 1 capsule daily. REMS Authorization #: 34567890"}
    assert imid(lenalidomide_request(dosageInstruction=[dosage])).authorization_number == "34567890"


def test_rems_labelled_number_wins_over_an_insurance_prior_auth_in_the_same_note() -> None:
    note = "Insurance prior auth #PA55512 approved. REMS Authorization #: 12345678"
    assert imid(lenalidomide_request(note=[{"text": note}])).authorization_number == "12345678"


@pytest.mark.parametrize(
    "notes",
    [
        ["REMS authorization pending"],
        ["Auth# pending"],
        ["Authorized by Dr. Okafor"],
        [],
    ],
)
def test_no_authorization_number(notes: list[str]) -> None:
    order = imid(lenalidomide_request(note=[{"text": t} for t in notes]))
    assert order.authorization_number is None
    assert order.authorization_source is None


# ------------------------------------------------------------------------------------------------
# REMS risk category
# ------------------------------------------------------------------------------------------------


def _category_extension(code: str) -> list[dict[str, Any]]:
    return [{"url": RISK_CATEGORY_EXTENSION, "valueCoding": {"system": RISK_CATEGORY_SYSTEM, "code": code}}]


@pytest.mark.parametrize("category", list(RiskCategory))
def test_risk_category_from_the_extension(category: RiskCategory) -> None:
    order = imid(lenalidomide_request(extension=_category_extension(category.value)))
    assert order.risk_category is category
    assert order.risk_category_source is not None
    assert order.risk_category_source.element == "extension rems-risk-category"
    assert order.risk_category_unrecognized is None


def test_extension_wins_over_note_text() -> None:
    raw = lenalidomide_request(
        extension=_category_extension("adult-female-nrp"),
        note=[{"text": "REMS risk category: Adult Female Who Can Get Pregnant"}],
    )
    assert imid(raw).risk_category is RiskCategory.ADULT_FEMALE_NRP


def _risk_observation(rid: str, code: str) -> dict[str, Any]:
    return observation(
        rid,
        code={"text": "REMS patient risk category"},
        valueCodeableConcept={"coding": [{"system": RISK_CATEGORY_SYSTEM, "code": code}]},
    )


def test_risk_category_from_a_supporting_information_observation() -> None:
    raw = lenalidomide_request(supportingInformation=[{"reference": "Observation/riskcat-1"}])
    order = imid(raw, _risk_observation("riskcat-1", "child-female-rp"))
    assert order.risk_category is RiskCategory.CHILD_FEMALE_RP
    assert order.risk_category_source is not None
    assert order.risk_category_source.reference == "Observation/riskcat-1"


def test_risk_category_from_a_contained_supporting_observation_coded_in_code() -> None:
    contained = observation("rc", code={"coding": [{"system": RISK_CATEGORY_SYSTEM, "code": "adult-male"}]})
    del contained["subject"]
    raw = lenalidomide_request(contained=[contained], supportingInformation=[{"reference": "#rc"}])
    assert imid(raw).risk_category is RiskCategory.ADULT_MALE


def test_supporting_information_about_something_else_is_ignored() -> None:
    raw = lenalidomide_request(
        supportingInformation=[{"reference": "Observation/hcg-1"}],
        note=[{"text": "Risk category: Adult Male"}],
    )
    hcg = observation("hcg-1", code={"coding": [{"system": "http://loinc.org", "code": "2106-3"}]})
    order = imid(raw, hcg)
    assert order.risk_category is RiskCategory.ADULT_MALE
    assert order.risk_category_source is not None
    assert order.risk_category_source.element == "note text"


@pytest.mark.parametrize(
    ("said", "category"),
    [
        ("Adult Female Who Can Not Get Pregnant", RiskCategory.ADULT_FEMALE_NRP),
        ("Adult Female Who Cannot Get Pregnant", RiskCategory.ADULT_FEMALE_NRP),
        ("Adult Female Who Can't Get Pregnant", RiskCategory.ADULT_FEMALE_NRP),
        ("Adult Female Who Can Get Pregnant", RiskCategory.ADULT_FEMALE_RP),
        ("Female Child Who Can Get Pregnant", RiskCategory.CHILD_FEMALE_RP),
        ("Female Child Who Can Not Get Pregnant", RiskCategory.CHILD_FEMALE_NRP),
        ("Adult Male", RiskCategory.ADULT_MALE),
        ("Male Child", RiskCategory.CHILD_MALE),
        ("adult-female-rp", RiskCategory.ADULT_FEMALE_RP),
    ],
)
@pytest.mark.parametrize("adult", [True, False])
def test_risk_category_from_the_form_name_in_a_note(said: str, category: RiskCategory, adult: bool) -> None:
    """Form names say adult or child themselves: the patient's age does not change them (a mismatch
    is for the rules to report)."""
    raw = lenalidomide_request(note=[{"text": f"REMS Authorization #: 12345678\nRisk Category: {said}"}])
    order = imid(raw, adult=adult)
    assert order.risk_category is category
    assert order.risk_category_source is not None
    assert order.risk_category_source.element == "note text"
    assert order.authorization_number == "12345678"


@pytest.mark.parametrize(
    ("said", "adult", "category"),
    [
        ("FRP", True, RiskCategory.ADULT_FEMALE_RP),
        ("FRP", False, RiskCategory.CHILD_FEMALE_RP),
        ("FNRP", True, RiskCategory.ADULT_FEMALE_NRP),
        ("FNRP", False, RiskCategory.CHILD_FEMALE_NRP),
        ("female of reproductive potential", True, RiskCategory.ADULT_FEMALE_RP),
        ("Female of reproductive potential", False, RiskCategory.CHILD_FEMALE_RP),
        ("female not of reproductive potential", True, RiskCategory.ADULT_FEMALE_NRP),
        ("male", True, RiskCategory.ADULT_MALE),
        ("Male", False, RiskCategory.CHILD_MALE),
    ],
)
def test_risk_category_from_older_names_resolved_by_age(said: str, adult: bool, category: RiskCategory) -> None:
    raw = lenalidomide_request(note=[{"text": f"REMS risk category: {said}"}])
    assert imid(raw, adult=adult).risk_category is category


def test_risk_category_on_the_line_after_its_label() -> None:
    """Epic SmartText puts the answer on the next line."""
    raw = lenalidomide_request(note=[{"text": "REMS Risk Category:\nMale Child\nREMS auth 12345678"}])
    assert imid(raw, adult=False).risk_category is RiskCategory.CHILD_MALE


def test_unrecognized_category_text_is_quoted_back() -> None:
    raw = lenalidomide_request(note=[{"text": "REMS risk category: to be determined at next visit"}])
    order = imid(raw)
    assert order.risk_category is None
    assert order.risk_category_source is None
    assert order.risk_category_unrecognized == "to be determined at next visit"


def test_unrecognized_extension_code_is_quoted_back() -> None:
    order = imid(lenalidomide_request(extension=_category_extension("female-adult-rp")))
    assert order.risk_category is None
    assert order.risk_category_unrecognized == "female-adult-rp"


def test_sex_words_outside_a_risk_category_statement_are_not_a_category() -> None:
    raw = lenalidomide_request(note=[{"text": "Male partner counseled on condom use. REMS auth 12345678"}])
    order = imid(raw)
    assert order.risk_category is None
    assert order.risk_category_unrecognized is None
