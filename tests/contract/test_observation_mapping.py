"""Observation / Procedure / Condition → pregnancy tests, pregnancy status, labs and evidence that a
patient cannot get pregnant (CODES.md, FHIR_CONTRACT.md, DECISIONS.md "Pregnancy tests").

A pregnancy result is read from every place labs put it; signals that disagree, or none that can be
read, give UNREADABLE — never a pass."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest

from fhir_mappings.codes import default_codes
from fhir_mappings.observations import labs, nrp_evidence, pregnancy_statuses, pregnancy_tests
from rems.config import RemsRules, default_config
from rems.model import LabKind, NrpEvidenceKind, PregnancyState
from rems.model import TestResult as PregnancyResult

from .fhir_json import (
    ICD10CM,
    PATIENT_REF,
    conditions_of,
    interpretation,
    located,
    loinc,
    observation,
    observations_of,
    quantity,
    snomed,
)

QUALITATIVE = ["2106-3", "2112-1", "80384-1", "2118-8", "2110-5", "80385-8"]
QUANTITATIVE = [
    "21198-7",
    "19080-1",
    "83086-9",
    "20415-6",
    "45194-8",
    "2119-6",
    "34670-0",
    "55869-2",
    "25372-4",
    "2114-7",
]
NEG, POS, UNREADABLE = PregnancyResult.NEGATIVE, PregnancyResult.POSITIVE, PregnancyResult.UNREADABLE


def rules() -> RemsRules:
    return default_config().rems


def read_tests(*raws: dict[str, Any], rules_: RemsRules | None = None) -> tuple[list[Any], list[str]]:
    return pregnancy_tests(observations_of(*raws), default_codes(), rules_ or rules())


def one_result(code: str = "2106-3", **fields: Any) -> PregnancyResult:
    """The result of one pregnancy-test Observation coded `code`, with the given value fields."""
    found, _ = read_tests(observation(code=loinc(code), **fields))
    assert len(found) == 1
    return found[0].result


def hcg_range(high: float, unit: str = "mIU/mL") -> list[dict[str, Any]]:
    return [{"high": quantity(high, unit)}]


# ------------------------------------------------------------------------------------------------
# Which Observations are pregnancy tests
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", QUALITATIVE)
def test_every_qualitative_hcg_code_is_a_pregnancy_test(code: str) -> None:
    found, unreadable = read_tests(observation(code=loinc(code), valueCodeableConcept=snomed("260385009", "Negative")))
    assert [(t.code, t.result) for t in found] == [(code, NEG)]
    assert unreadable == []


@pytest.mark.parametrize("code", QUANTITATIVE)
def test_every_quantitative_hcg_code_is_a_pregnancy_test(code: str) -> None:
    raw = observation(code=loinc(code), valueQuantity=quantity(2, "mIU/mL", "m[IU]/mL"), referenceRange=hcg_range(5))
    found, _ = read_tests(raw)
    assert [(t.code, t.result) for t in found] == [(code, NEG)]


def test_hcg_as_tumor_marker_is_not_a_pregnancy_test() -> None:
    """53959-3 is excluded even when it carries a clear positive value (hCG in a tumour work-up)."""
    raw = observation(code=loinc("53959-3"), valueQuantity=quantity(850, "mIU/mL"), referenceRange=hcg_range(5))
    assert read_tests(raw) == ([], [])


def test_excluded_code_wins_over_a_pregnancy_code_on_the_same_observation() -> None:
    code = {
        "coding": [{"system": "http://loinc.org", "code": "53959-3"}, {"system": "http://loinc.org", "code": "21198-7"}]
    }
    assert read_tests(observation(code=code, valueQuantity=quantity(850, "mIU/mL")))[0] == []


def test_other_loinc_codes_are_not_pregnancy_tests() -> None:
    raw = observation(code=loinc("2345-7", "Glucose"), valueQuantity=quantity(95, "mg/dL"))
    assert read_tests(raw)[0] == []


def test_uncoded_pregnancy_test_is_recognised_by_text() -> None:
    raw = observation(code={"text": "Pregnancy test, urine (POC)"}, valueString="Negative")
    found, _ = read_tests(raw)
    assert [(t.result, t.code) for t in found] == [(NEG, "Pregnancy test, urine (POC)")]


def test_uncoded_hcg_tumor_marker_is_not_a_pregnancy_test() -> None:
    raw = observation(code={"text": "Beta-hCG tumor marker"}, valueQuantity=quantity(850, "mIU/mL"))
    assert read_tests(raw)[0] == []


# ------------------------------------------------------------------------------------------------
# Reading the result
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "result"),
    [
        ({"valueCodeableConcept": snomed("260385009", "Negative")}, NEG),
        ({"valueCodeableConcept": snomed("10828004", "Positive")}, POS),
        ({"valueCodeableConcept": loinc("LA6577-6", "Negative")}, NEG),
        ({"valueCodeableConcept": loinc("LA6576-8", "Positive")}, POS),
        ({"interpretation": interpretation("NEG")}, NEG),
        ({"interpretation": interpretation("POS")}, POS),
        ({"interpretation": interpretation("N")}, NEG),  # N counts for qualitative codes (DECISIONS)
        ({"valueString": "Negative"}, NEG),
        ({"valueString": "neg"}, NEG),
        ({"valueString": "Not detected"}, NEG),
        ({"valueString": "POSITIVE"}, POS),
        ({"valueString": "Detected"}, POS),
        ({"valueCodeableConcept": {"text": "Negative"}}, NEG),
        ({"valueCodeableConcept": {"text": "Positive"}}, POS),
        # agreeing signals stay readable
        ({"valueCodeableConcept": snomed("260385009"), "interpretation": interpretation("NEG")}, NEG),
        ({"valueString": "POSITIVE", "interpretation": interpretation("POS")}, POS),
    ],
)
def test_qualitative_result(fields: dict[str, Any], result: PregnancyResult) -> None:
    assert one_result("2106-3", **fields) is result


@pytest.mark.parametrize(
    ("value", "reference_range", "result"),
    [
        (quantity(2, "mIU/mL", "m[IU]/mL"), hcg_range(5), NEG),
        (quantity(4.9, "mIU/mL"), hcg_range(5), NEG),
        (quantity(5, "mIU/mL"), hcg_range(5), POS),  # at the range high: not below it
        (quantity(25, "mIU/mL"), hcg_range(5), POS),
        (quantity(8, "mIU/mL"), hcg_range(10), NEG),  # the lab's own range wins over the 5 cut-off
        (quantity(3.5, "IU/L", "[IU]/L"), hcg_range(3), POS),
        # no range: 5 mIU/mL cut-off
        (quantity(4, "mIU/mL"), None, NEG),
        (quantity(5, "mIU/mL"), None, POS),
        (quantity(1, "mIU/mL", "m[IU]/mL"), None, NEG),
        (quantity(3, "IU/L", "[IU]/L"), None, NEG),
        (quantity(0.01, "IU/mL", "[IU]/mL"), None, POS),  # 10 mIU/mL
        # comparators
        (quantity(2, "mIU/mL", "m[IU]/mL", comparator="<"), None, NEG),
        (quantity(2, "mIU/mL", comparator="<"), hcg_range(5), NEG),
        (quantity(1000, "mIU/mL", comparator=">"), None, POS),
        (quantity(10, "mIU/mL", comparator="<"), None, UNREADABLE),  # "<10" may be 5 or more
        # a unit that is not an hCG concentration, with no range to compare against
        (quantity(3, "ng/mL", "ng/mL"), None, UNREADABLE),
    ],
)
def test_quantitative_result(value: dict[str, Any], reference_range: list[Any] | None, result: PregnancyResult) -> None:
    fields: dict[str, Any] = {"valueQuantity": value}
    if reference_range is not None:
        fields["referenceRange"] = reference_range
    assert one_result("21198-7", **fields) is result


def test_no_range_cut_off_is_configurable() -> None:
    raw = observation(code=loinc("21198-7"), valueQuantity=quantity(10, "mIU/mL"))
    assert read_tests(raw)[0][0].result is POS
    lenient = dataclasses.replace(rules(), quantitative_negative_below_miu_ml=Decimal(25))
    assert read_tests(raw, rules_=lenient)[0][0].result is NEG


@pytest.mark.parametrize(
    "fields",
    [
        {"valueString": "Negative", "interpretation": interpretation("POS")},
        {"valueCodeableConcept": snomed("260385009"), "interpretation": interpretation("POS")},
        {"valueCodeableConcept": loinc("LA6576-8"), "interpretation": interpretation("NEG")},
        {"valueString": "see comment"},
        {"valueString": "Indeterminate"},
        {"valueCodeableConcept": {"text": "Equivocal, repeat in 48 hours"}},
        {},
        {"dataAbsentReason": {"text": "Specimen hemolyzed"}},
    ],
)
def test_conflicting_or_unreadable_results_are_unreadable(fields: dict[str, Any]) -> None:
    assert one_result("2106-3", **fields) is UNREADABLE


def test_conflicting_quantity_and_interpretation_is_unreadable() -> None:
    fields = {"valueQuantity": quantity(50, "mIU/mL"), "interpretation": interpretation("NEG")}
    assert one_result("21198-7", **fields) is UNREADABLE


@pytest.mark.parametrize(
    ("fields", "quoted"),
    [
        ({"valueString": "see comment"}, "see comment"),
        ({"valueQuantity": quantity(12, "ng/mL")}, "12 ng/mL"),
        ({"dataAbsentReason": {"text": "Specimen hemolyzed"}}, "Specimen hemolyzed"),
        ({}, "no value"),
    ],
)
def test_the_result_is_quoted_as_recorded(fields: dict[str, Any], quoted: str) -> None:
    found, _ = read_tests(observation(code=loinc("2106-3"), **fields))
    assert quoted in found[0].result_text


@pytest.mark.parametrize("text", ["Non-reactive", "non reactive"])
def test_non_reactive_is_negative(text: str) -> None:
    assert one_result("2106-3", valueString=text) is NEG


def test_interpretation_normal_alone_does_not_make_a_quantitative_test_negative() -> None:
    assert one_result("21198-7", interpretation=interpretation("N")) is UNREADABLE


def test_unitless_quantity_without_a_range_is_unreadable() -> None:
    assert one_result("21198-7", valueQuantity={"value": 3}) is UNREADABLE


# ------------------------------------------------------------------------------------------------
# Status and collection time
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled"])
def test_withdrawn_results_are_dropped(status: str) -> None:
    raw = observation(status=status, code=loinc("2106-3"), valueString="POSITIVE")
    assert read_tests(raw) == ([], [])


@pytest.mark.parametrize(
    ("status", "preliminary"), [("preliminary", True), ("final", False), ("amended", False), ("corrected", False)]
)
def test_preliminary_results_are_flagged(status: str, preliminary: bool) -> None:
    found, _ = read_tests(observation(status=status, code=loinc("2106-3"), valueString="Negative"))
    assert [(t.result, t.preliminary) for t in found] == [(NEG, preliminary)]


@pytest.mark.parametrize(
    ("fields", "collected", "source"),
    [
        (
            {"effectiveDateTime": "2025-06-10T23:30:00-05:00", "issued": "2025-06-11T14:02:11-05:00"},
            datetime(2025, 6, 11, 4, 30, tzinfo=UTC),
            "effectiveDateTime",
        ),
        (
            {"effectivePeriod": {"start": "2025-06-12T07:45:00+09:00", "end": "2025-06-12T08:00:00+09:00"}},
            datetime(2025, 6, 11, 22, 45, tzinfo=UTC),
            "effectivePeriod.start",
        ),
        ({"issued": "2025-06-13T16:20:00.000-05:00"}, datetime(2025, 6, 13, 21, 20, tzinfo=UTC), "issued"),
        ({"effectiveDateTime": "2025-06-14"}, date(2025, 6, 14), "effectiveDateTime"),
    ],
)
def test_collection_time(fields: dict[str, Any], collected: datetime | date, source: str) -> None:
    raw = observation(code=loinc("2106-3"), valueString="Negative", **fields)
    raw = {k: v for k, v in raw.items() if k != "effectiveDateTime" or "effectiveDateTime" in fields}
    found, _ = read_tests(raw)
    assert len(found) == 1
    assert type(found[0].collected) is type(collected)
    assert found[0].collected == collected
    assert found[0].collected_from == source


def test_the_offset_of_the_collection_time_is_kept() -> None:
    """Late evening in Chicago is the next day in UTC: the mapping must not drop the offset."""
    found, _ = read_tests(
        observation(code=loinc("2106-3"), valueString="Negative", effectiveDateTime="2025-06-10T23:30:00-05:00")
    )
    collected = found[0].collected
    assert isinstance(collected, datetime) and collected.utcoffset() is not None


@pytest.mark.parametrize(
    "fields", [{"effectiveDateTime": "2025-06"}, {"effectiveDateTime": "2025-06", "issued": "2025-06-20T09:00:00Z"}]
)
def test_month_only_collection_date_is_reported_not_used(fields: dict[str, Any]) -> None:
    raw = observation("hcg-month", code=loinc("2106-3"), valueString="Negative", **fields)
    found, unreadable = read_tests(raw)
    assert found == []
    assert len(unreadable) == 1
    assert "Observation/hcg-month" in unreadable[0]


def test_no_time_at_all_is_reported_not_used() -> None:
    raw = observation("hcg-undated", code=loinc("2106-3"), valueString="Negative")
    del raw["effectiveDateTime"]
    found, unreadable = read_tests(raw)
    assert found == []
    assert any("Observation/hcg-undated" in u for u in unreadable)


# ------------------------------------------------------------------------------------------------
# Pregnancy status (LOINC 82810-3)
# ------------------------------------------------------------------------------------------------


def statuses_of(*raws: dict[str, Any]) -> list[Any]:
    return pregnancy_statuses(observations_of(*raws), default_codes())


@pytest.mark.parametrize(
    ("value", "state"),
    [
        (loinc("LA15173-0", "Pregnant"), PregnancyState.PREGNANT),
        (snomed("77386006", "Pregnancy"), PregnancyState.PREGNANT),
        (loinc("LA26683-5", "Not pregnant"), PregnancyState.NOT_PREGNANT),
        (snomed("60001007", "Not pregnant"), PregnancyState.NOT_PREGNANT),
        (loinc("LA4489-6", "Unknown"), PregnancyState.UNKNOWN),
        ({"text": "Pregnant"}, PregnancyState.PREGNANT),
        ({"text": "Not pregnant"}, PregnancyState.NOT_PREGNANT),
        ({"text": "Patient unsure"}, PregnancyState.UNKNOWN),
    ],
)
def test_pregnancy_status(value: dict[str, Any], state: PregnancyState) -> None:
    raw = observation("preg-status", code=loinc("82810-3", "Pregnancy status"), valueCodeableConcept=value)
    found = statuses_of(raw)
    assert [(s.reference, s.state) for s in found] == [("Observation/preg-status", state)]
    assert found[0].when == datetime(2025, 6, 16, 13, 30, tzinfo=UTC)


def test_pregnancy_status_is_not_a_pregnancy_test() -> None:
    raw = observation(code=loinc("82810-3"), valueCodeableConcept=loinc("LA15173-0"))
    assert read_tests(raw) == ([], [])


def test_withdrawn_pregnancy_status_is_dropped() -> None:
    raw = observation(status="entered-in-error", code=loinc("82810-3"), valueCodeableConcept=loinc("LA15173-0"))
    assert statuses_of(raw) == []


# ------------------------------------------------------------------------------------------------
# Labs for clinical review
# ------------------------------------------------------------------------------------------------


def labs_of(*raws: dict[str, Any]) -> tuple[list[Any], list[str]]:
    return labs(observations_of(*raws), default_codes())


@pytest.mark.parametrize(
    ("code", "value", "kind", "expected"),
    [
        ("751-8", quantity(1500, "cells/uL"), LabKind.ANC, Decimal("1.5")),
        ("751-8", quantity(800, "/uL", "/uL"), LabKind.ANC, Decimal("0.8")),
        ("26499-4", quantity(0.9, "10*3/uL", "10*3/uL"), LabKind.ANC, Decimal("0.9")),
        ("753-4", quantity(2.1, "10^9/L"), LabKind.ANC, Decimal("2.1")),
        ("777-3", quantity(45, "K/uL"), LabKind.PLATELETS, Decimal(45)),
        ("26515-7", quantity(120, "10*9/L", "10*9/L"), LabKind.PLATELETS, Decimal(120)),
        ("777-3", quantity(150000, "cells/mm3"), LabKind.PLATELETS, Decimal(150)),
        ("2160-0", quantity(1.2, "mg/dL", "mg/dL"), LabKind.CREATININE, Decimal("1.2")),
        ("38483-4", quantity(265.26, "umol/L", "umol/L"), LabKind.CREATININE, Decimal("3.0")),
        ("2160-0", quantity(88.42, "µmol/L"), LabKind.CREATININE, Decimal("1.0")),
        ("29463-7", quantity(154, "lb", "[lb_av]"), LabKind.WEIGHT, Decimal("69.853")),
        ("29463-7", quantity(70.5, "kg", "kg"), LabKind.WEIGHT, Decimal("70.5")),
    ],
)
def test_lab_values_in_the_domain_units(code: str, value: dict[str, Any], kind: LabKind, expected: Decimal) -> None:
    found, unreadable = labs_of(observation("lab-1", code=loinc(code), valueQuantity=value))
    assert unreadable == []
    assert [(v.reference, v.kind) for v in found] == [("Observation/lab-1", kind)]
    assert found[0].value == pytest.approx(expected, abs=Decimal("0.001"))
    assert str(value["value"]) in found[0].original


@pytest.mark.parametrize(
    ("code", "unit"),
    [("2160-0", "mmol/L"), ("751-8", "%"), ("29463-7", "stone")],
)
def test_lab_in_an_unknown_unit_is_reported_not_guessed(code: str, unit: str) -> None:
    found, unreadable = labs_of(observation("lab-x", code=loinc(code), valueQuantity=quantity(3, unit)))
    assert found == []
    assert len(unreadable) == 1
    assert "Observation/lab-x" in unreadable[0] and repr(unit) in unreadable[0]


def test_lab_without_a_value_is_reported() -> None:
    found, unreadable = labs_of(observation("lab-y", code=loinc("777-3"), valueString="clumped, see smear"))
    assert found == []
    assert any("Observation/lab-y" in u for u in unreadable)


@pytest.mark.parametrize("status", ["preliminary", "entered-in-error", "cancelled", "registered"])
def test_labs_that_are_not_final_are_not_used(status: str) -> None:
    assert labs_of(observation(status=status, code=loinc("777-3"), valueQuantity=quantity(20, "10*3/uL"))) == ([], [])


# ------------------------------------------------------------------------------------------------
# Evidence that a patient cannot get pregnant
# ------------------------------------------------------------------------------------------------


def procedure(rid: str, code: dict[str, Any], status: str = "completed", **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Procedure",
        "id": rid,
        "status": status,
        "subject": {"reference": PATIENT_REF},
        "code": code,
    } | fields


def condition(rid: str, code: dict[str, Any], **fields: Any) -> dict[str, Any]:
    base = {
        "resourceType": "Condition",
        "id": rid,
        "clinicalStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": "active"}]
        },
        "verificationStatus": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": "confirmed"}]
        },
        "category": [
            {
                "coding": [
                    {"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}
                ]
            }
        ],
        "subject": {"reference": PATIENT_REF},
        "code": code,
    }
    return base | fields


def evidence_of(
    procedures: Sequence[dict[str, Any]] = (),
    conditions: Sequence[dict[str, Any]] = (),
    observations: Sequence[dict[str, Any]] = (),
    birth_date: date | None = date(1962, 8, 9),
) -> list[Any]:
    return nrp_evidence(
        located(*procedures, base="proc"),
        conditions_of(*conditions),
        observations_of(*observations),
        default_codes(),
        birth_date,
    )


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("236886002", NrpEvidenceKind.HYSTERECTOMY),
        ("116140006", NrpEvidenceKind.HYSTERECTOMY),
        ("116144002", NrpEvidenceKind.HYSTERECTOMY),  # also an oophorectomy code: hysterectomy first
        ("29827000", NrpEvidenceKind.BILATERAL_OOPHORECTOMY),
    ],
)
def test_completed_procedure_is_evidence(code: str, kind: NrpEvidenceKind) -> None:
    found = evidence_of(procedures=[procedure("proc-1", snomed(code), performedDateTime="2019-03-04T10:00:00-06:00")])
    assert [(e.reference, e.kind, e.since) for e in found] == [("Procedure/proc-1", kind, date(2019, 3, 4))]


def test_procedure_date_from_performed_period() -> None:
    found = evidence_of(procedures=[procedure("proc-2", snomed("236886002"), performedPeriod={"start": "2018-11-20"})])
    assert [e.since for e in found] == [date(2018, 11, 20)]


@pytest.mark.parametrize("status", ["in-progress", "not-done", "stopped", "entered-in-error", "preparation"])
def test_procedure_that_is_not_completed_is_not_evidence(status: str) -> None:
    assert (
        evidence_of(procedures=[procedure("p", snomed("236886002"), status=status, performedDateTime="2019-03-04")])
        == []
    )


def test_other_procedures_are_not_evidence() -> None:
    assert (
        evidence_of(procedures=[procedure("p", snomed("80146002", "Appendectomy"), performedDateTime="2019-03-04")])
        == []
    )


def test_icd10_acquired_absence_of_uterus_condition_is_hysterectomy() -> None:
    code = {"coding": [{"system": ICD10CM, "code": "Z90.710", "display": "Acquired absence of both cervix and uterus"}]}
    found = evidence_of(conditions=[condition("cond-1", code, onsetDateTime="2016-05-02")])
    assert [(e.reference, e.kind, e.since) for e in found] == [
        ("Condition/cond-1", NrpEvidenceKind.HYSTERECTOMY, date(2016, 5, 2))
    ]


def test_postmenopausal_condition_with_onset() -> None:
    found = evidence_of(
        conditions=[condition("cond-2", snomed("76498008", "Postmenopausal state"), onsetDateTime="2020-01-15")]
    )
    assert [(e.kind, e.since) for e in found] == [(NrpEvidenceKind.NATURAL_MENOPAUSE, date(2020, 1, 15))]


def test_postmenopausal_condition_without_onset_has_no_since_date() -> None:
    """DECISIONS: menopause without an onset date does not count; recordedDate is not an onset."""
    found = evidence_of(conditions=[condition("cond-3", snomed("76498008"), recordedDate="2021-09-30")])
    assert [(e.kind, e.since) for e in found] == [(NrpEvidenceKind.NATURAL_MENOPAUSE, None)]


@pytest.mark.parametrize("verification", ["refuted", "entered-in-error"])
def test_refuted_or_withdrawn_condition_is_not_evidence(verification: str) -> None:
    cond = condition("c", snomed("76498008"), onsetDateTime="2020-01-15")
    cond["verificationStatus"]["coding"][0]["code"] = verification
    assert evidence_of(conditions=[cond]) == []


def test_age_at_menopause_with_birth_date() -> None:
    raw = observation("meno-age", code=loinc("42802-9", "Age at menopause"), valueQuantity=quantity(51, "a", "a"))
    found = evidence_of(observations=[raw], birth_date=date(1962, 8, 9))
    assert [(e.reference, e.kind, e.since) for e in found] == [
        ("Observation/meno-age", NrpEvidenceKind.NATURAL_MENOPAUSE, date(2013, 8, 9))
    ]


def test_age_at_menopause_for_a_29_february_birthday() -> None:
    raw = observation(code=loinc("42802-9"), valueQuantity=quantity(51, "a", "a"))
    assert [e.since for e in evidence_of(observations=[raw], birth_date=date(1964, 2, 29))] == [date(2015, 3, 1)]


def test_age_at_menopause_without_birth_date_is_not_evidence() -> None:
    raw = observation(code=loinc("42802-9"), valueQuantity=quantity(51, "a", "a"))
    assert evidence_of(observations=[raw], birth_date=None) == []
