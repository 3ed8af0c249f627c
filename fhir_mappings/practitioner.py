"""PractitionerRole / Practitioner → `Prescriber` (NUCC specialty)."""

from __future__ import annotations

from fhir_mappings.access import Json, boolean, concept, concepts, objects, reference
from fhir_mappings.codes import Codes
from fhir_mappings.common import codes_in, concept_text, ref
from rems.model import Prescriber


def prescribers(roles: list[tuple[Json, str]], practitioners: list[tuple[Json, str]], codes: Codes) -> list[Prescriber]:
    """One entry per reference a requester may use: the PractitionerRole itself and the Practitioner
    it points to (so ``requester: Practitioner/7`` finds the specialty on that practitioner's role).
    Each resource comes with its path, for errors."""
    out: list[Prescriber] = []
    by_practitioner: dict[str, set[str]] = {}
    text_by_practitioner: dict[str, list[str]] = {}
    for role, path in roles:
        if boolean(role, "active", path) is False:
            continue
        specialty = concepts(role, "specialty", path)
        specialties = codes_in(specialty, codes.nucc)
        text = concept_text(specialty) or ", ".join(sorted(specialties)) or "not stated"
        out.append(Prescriber(ref(role), frozenset(specialties), text))
        practitioner = reference(role, "practitioner", path)
        if practitioner:
            by_practitioner.setdefault(practitioner, set()).update(specialties)
            text_by_practitioner.setdefault(practitioner, []).append(text)
    for pr, path in practitioners:
        r = ref(pr)
        quals: set[str] = set()
        for q, qpath in objects(pr, "qualification", path):
            quals |= codes_in(concept(q, "code", qpath, required=True), codes.nucc)
        if quals:
            by_practitioner.setdefault(r, set()).update(quals)
            text_by_practitioner.setdefault(r, []).append(", ".join(sorted(quals)))
    for r, specialties in by_practitioner.items():
        out.append(Prescriber(r, frozenset(specialties), "; ".join(text_by_practitioner.get(r, []))))
    return out
