"""Small readers shared by the mappings: codings, text, dates, notes, Conditions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime

from fhir_mappings.access import Coding, Concept, Json, concept, objects, reference_to, string

ConceptLike = Concept | Sequence[Concept | None] | None
"""One CodeableConcept as read, several, or none."""


def ref(resource: Json) -> str:
    return reference_to(resource)


def _each(concept_: ConceptLike) -> Iterator[Concept]:
    if concept_ is None:
        return
    if isinstance(concept_, Concept):
        yield concept_
        return
    for c in concept_:
        if c is not None:
            yield c


def codings(concept_: ConceptLike) -> Iterator[Coding]:
    """(system, code, display) of each coding of a CodeableConcept (or a list of them)."""
    for c in _each(concept_):
        yield from c.codings


def concept_text(concept_: ConceptLike) -> str:
    """All human text of a CodeableConcept (or list): `text` and each coding's display."""
    if concept_ is None:
        return ""
    if type(concept_) is Concept:
        return concept_.label()
    return " | ".join(label for c in _each(concept_) if (label := c.label()))


def has_code(concept_: ConceptLike, system: str, codes: Iterable[str]) -> bool:
    wanted = set(codes)
    return any(s == system and c in wanted for s, c, _ in codings(concept_))


def codes_in(concept_: ConceptLike, system: str) -> set[str]:
    if concept_ is None:
        return set()
    if type(concept_) is Concept:
        return concept_.codes(system)
    return {c for s, c, _ in codings(concept_) if s == system and c}


def as_date(moment: datetime | date | None) -> date | None:
    """The day of a dateTime as written (its own offset), or the date itself."""
    if isinstance(moment, datetime):
        return moment.date()
    return moment


def notes_text(resource: Json, path: str) -> list[str]:
    """The text of each Annotation in `note` (Annotation.text is required)."""
    return [text for n, npath in objects(resource, "note", path) if (text := string(n, "text", npath, required=True))]


_NOT_IN_EFFECT = frozenset({"refuted", "entered-in-error"})
_CLINICAL_IN_EFFECT = frozenset({"active", "recurrence", "relapse"})


def condition_in_effect(cond: Json, path: str) -> bool:
    """Not refuted or entered in error; clinically active, recurrent or relapsed (or status unstated)."""
    verification = concept(cond, "verificationStatus", path)
    if verification is not None:
        for _, c, _ in verification.codings:
            if c in _NOT_IN_EFFECT:
                return False
    clinical = concept(cond, "clinicalStatus", path)
    if clinical is None or not clinical.codings:
        return True
    return any(c in _CLINICAL_IN_EFFECT for _, c, _ in clinical.codings)


@dataclass(slots=True)
class ChartCondition:
    """A Condition as the rules see it: read once (code and status), then used by several mappings."""

    raw: Json
    path: str
    ref: str
    code: Concept | None
    in_effect: bool


def read_condition(raw: Json, path: str) -> ChartCondition:
    return ChartCondition(raw, path, ref(raw), concept(raw, "code", path), condition_in_effect(raw, path))
