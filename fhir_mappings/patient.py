"""Patient → `PatientFacts`: sex by the US Core extension order, birth date."""

from __future__ import annotations

from fhir_mappings.access import Json, choice, code, coding, concept, date_only, objects, string
from fhir_mappings.common import ref
from fhir_mappings.r4_types import EXTENSION_VALUE_TYPES
from rems.model import PatientFacts, Sex

US_CORE_SEX = (
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-sex",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-individual-sex",
)
US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex"

_FEMALE = {"f", "female", "248152002"}
_MALE = {"m", "male", "248153007"}
EXTENSION_VALUES = frozenset(f"value{t}" for t in EXTENSION_VALUE_TYPES)


def _sex_of(value: str | None) -> Sex:
    v = (value or "").strip().lower()
    if v in _FEMALE:
        return Sex.FEMALE
    if v in _MALE:
        return Sex.MALE
    return Sex.UNKNOWN


def _extension_sex(ext: Json, path: str) -> Sex:
    which = choice(ext, path, EXTENSION_VALUES)
    if which == "valueCode":
        return _sex_of(code(ext, which, path))
    if which == "valueCoding":
        found = coding(ext, which, path)
        return _sex_of(found[1] if found is not None else None)
    if which == "valueCodeableConcept":
        value = concept(ext, which, path, required=True)
        for _, c, _ in value.codings:
            sex = _sex_of(c)
            if sex is not Sex.UNKNOWN:
                return sex
    return Sex.UNKNOWN


def patient_sex(patient: Json, path: str = "patient") -> tuple[Sex, str]:
    """US Core sex extension, then birth-sex extension, then `Patient.gender` (FHIR_CONTRACT). An
    unknown value at one level falls through to the next; unknown everywhere stays unknown."""
    extensions = [
        (ext, epath, string(ext, "url", epath, required=True)) for ext, epath in objects(patient, "extension", path)
    ]
    for urls, label in ((US_CORE_SEX, "US Core sex extension"), ((US_CORE_BIRTHSEX,), "US Core birth sex")):
        for ext, epath, url in extensions:
            if url in urls:
                sex = _extension_sex(ext, epath)
                if sex is not Sex.UNKNOWN:
                    return sex, label
    sex = _sex_of(code(patient, "gender", path))
    if sex is not Sex.UNKNOWN:
        return sex, "Patient.gender"
    return Sex.UNKNOWN, "none"


def patient_facts(patient: Json, path: str = "patient") -> PatientFacts:
    """`path` names the Patient in errors (``prefetch.patient``)."""
    sex, source = patient_sex(patient, path)
    return PatientFacts(
        reference=ref(patient), sex=sex, sex_source=source, birth_date=date_only(patient, "birthDate", path)
    )
