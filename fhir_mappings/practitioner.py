"""PractitionerRole / Practitioner → `Prescriber` (NUCC specialty)."""

from __future__ import annotations

from fhir.resources.R4B.resource import Resource

from fhir_mappings.codes import Codes
from fhir_mappings.common import codes_in, concept_text, ref, reference_of
from rems.model import Prescriber


def prescribers(roles: list[Resource], practitioners: list[Resource], codes: Codes) -> list[Prescriber]:
    """One entry per reference a requester may use: the PractitionerRole itself and the Practitioner
    it points to (so ``requester: Practitioner/7`` finds the specialty on that practitioner's role)."""
    out: list[Prescriber] = []
    by_practitioner: dict[str, set[str]] = {}
    text_by_practitioner: dict[str, list[str]] = {}
    for role in roles:
        if getattr(role, "active", None) is False:
            continue
        specialties = set(codes_in(role.specialty, codes.nucc))
        text = concept_text(role.specialty) or ", ".join(sorted(specialties)) or "not stated"
        out.append(Prescriber(ref(role), frozenset(specialties), text))
        practitioner = reference_of(role.practitioner)
        if practitioner:
            by_practitioner.setdefault(practitioner, set()).update(specialties)
            text_by_practitioner.setdefault(practitioner, []).append(text)
    for pr in practitioners:
        r = ref(pr)
        quals = set()
        for q in pr.qualification or []:
            quals |= codes_in(q.code, codes.nucc)
        if quals:
            by_practitioner.setdefault(r, set()).update(quals)
            text_by_practitioner.setdefault(r, []).append(", ".join(sorted(quals)))
    for r, specialties in by_practitioner.items():
        out.append(Prescriber(r, frozenset(specialties), "; ".join(text_by_practitioner.get(r, []))))
    return out
