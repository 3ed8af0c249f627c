"""Patient → sex and birth date (FHIR_CONTRACT.md: US Core sex extension, then birth-sex extension,
then `Patient.gender`; unknown is a finding, not a guess)."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhir_mappings.patient import patient_facts
from rems.model import Sex

from .fhir_json import PATIENT_REF, SNOMED, US_CORE_BIRTHSEX, US_CORE_SEX, parse, patient

SEX_EXTENSION = "US Core sex extension"
BIRTH_SEX = "US Core birth sex"
GENDER = "Patient.gender"


def sex_extension(**value: Any) -> dict[str, Any]:
    return {"url": US_CORE_SEX, **value}


def birth_sex(code: str) -> dict[str, Any]:
    return {"url": US_CORE_BIRTHSEX, "valueCode": code}


def sex_of(raw: dict[str, Any]) -> tuple[Sex, str]:
    facts = patient_facts(parse(raw))
    return facts.sex, facts.sex_source


@pytest.mark.parametrize(
    ("extension", "sex"),
    [
        (sex_extension(valueCode="248152002"), Sex.FEMALE),
        (sex_extension(valueCode="248153007"), Sex.MALE),
        (sex_extension(valueCoding={"system": SNOMED, "code": "248152002", "display": "Female"}), Sex.FEMALE),
        (sex_extension(valueCoding={"system": SNOMED, "code": "248153007", "display": "Male"}), Sex.MALE),
    ],
)
def test_sex_extension_wins_over_birth_sex_and_gender(extension: dict[str, Any], sex: Sex) -> None:
    """The sex extension is read first, even when birth sex and gender say the opposite."""
    other = "M" if sex is Sex.FEMALE else "F"
    raw = patient(extension=[birth_sex(other), extension], gender="male" if sex is Sex.FEMALE else "female")
    assert sex_of(raw) == (sex, SEX_EXTENSION)


@pytest.mark.parametrize(("code", "sex"), [("F", Sex.FEMALE), ("M", Sex.MALE)])
def test_birth_sex_wins_over_gender(code: str, sex: Sex) -> None:
    raw = patient(extension=[birth_sex(code)], gender="male" if sex is Sex.FEMALE else "female")
    assert sex_of(raw) == (sex, BIRTH_SEX)


def test_unknown_birth_sex_falls_through_to_gender() -> None:
    assert sex_of(patient(extension=[birth_sex("UNK")], gender="female")) == (Sex.FEMALE, GENDER)


def test_unknown_sex_extension_falls_through_to_birth_sex() -> None:
    declined = sex_extension(
        valueCoding={"system": "http://terminology.hl7.org/CodeSystem/data-absent-reason", "code": "asked-declined"}
    )
    assert sex_of(patient(extension=[declined, birth_sex("M")], gender="female")) == (Sex.MALE, BIRTH_SEX)


@pytest.mark.parametrize(("gender", "sex"), [("female", Sex.FEMALE), ("male", Sex.MALE)])
def test_gender_alone(gender: str, sex: Sex) -> None:
    assert sex_of(patient(gender=gender)) == (sex, GENDER)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"gender": "unknown"},
        {"gender": "other"},
        {"gender": "unknown", "extension": [birth_sex("UNK")]},
        {"extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race", "extension": []}]},
    ],
)
def test_unknown_everywhere_is_unknown_from_none(fields: dict[str, Any]) -> None:
    assert sex_of(patient(**fields)) == (Sex.UNKNOWN, "none")


def test_other_extensions_are_not_read_as_sex() -> None:
    ext = {"url": "http://example.org/fhir/StructureDefinition/partner-sex", "valueCode": "M"}
    assert sex_of(patient(extension=[ext], gender="female")) == (Sex.FEMALE, GENDER)


@pytest.mark.parametrize(
    ("birth_date", "expected"),
    [("1980-07-04", date(1980, 7, 4)), ("1980", None), ("1980-07", None)],
)
def test_birth_date_only_when_it_names_a_day(birth_date: str, expected: date | None) -> None:
    facts = patient_facts(parse(patient(birthDate=birth_date, gender="female")))
    assert facts.birth_date == expected
    assert facts.reference == PATIENT_REF


def test_no_birth_date() -> None:
    assert patient_facts(parse(patient(gender="male"))).birth_date is None
