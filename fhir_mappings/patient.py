"""Patient → `PatientFacts`: sex by the US Core extension order, birth date."""

from __future__ import annotations

from typing import Any

from fhir.resources.R4B.patient import Patient

from fhir_mappings.common import as_date, ref
from rems.model import PatientFacts, Sex

US_CORE_SEX = (
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-individual-sex",
)
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

_FEMALE = {"f", "female", "248152002"}
_MALE = {"m", "male", "248153007"}


def _sex_of(value: str | None) -> Sex:
    v = (value or "").strip().lower()
    if v in _FEMALE:
        return Sex.FEMALE
    if v in _MALE:
        return Sex.MALE
    return Sex.UNKNOWN


def _extension_sex(ext: Any) -> Sex:
    if getattr(ext, "valueCode", None):
        return _sex_of(ext.valueCode)
    coding = getattr(ext, "valueCoding", None)
    if coding is not None:
        return _sex_of(coding.code)
    concept = getattr(ext, "valueCodeableConcept", None)
    if concept is not None:
        for c in concept.coding or []:
            sex = _sex_of(c.code)
            if sex is not Sex.UNKNOWN:
                return sex
    return Sex.UNKNOWN


def patient_sex(patient: Patient) -> tuple[Sex, str]:
    """US Core sex extension, then birth-sex extension, then `Patient.gender` (FHIR_CONTRACT). An
    unknown value at one level falls through to the next; unknown everywhere stays unknown."""
    extensions = patient.extension or []
    for urls, label in ((US_CORE_SEX, "US Core sex extension"), ((US_CORE_BIRTHSEX,), "US Core birth sex")):
        for ext in extensions:
            if ext.url in urls:
                sex = _extension_sex(ext)
                if sex is not Sex.UNKNOWN:
                    return sex, label
    sex = _sex_of(patient.gender)
    if sex is not Sex.UNKNOWN:
        return sex, "Patient.gender"
    return Sex.UNKNOWN, "none"


def patient_facts(patient: Patient) -> PatientFacts:
    sex, source = patient_sex(patient)
    return PatientFacts(reference=ref(patient), sex=sex, sex_source=source, birth_date=as_date(patient.birthDate))
