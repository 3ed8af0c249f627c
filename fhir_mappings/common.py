"""Small readers shared by the mappings: codings, text, dates, quantities."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from fhir.resources.R4B.resource import Resource


def ref(resource: Resource) -> str:
    return f"{resource.get_resource_type()}/{getattr(resource, 'id', None) or '?'}"


def codings(concept: Any) -> Iterator[tuple[str | None, str | None, str | None]]:
    """(system, code, display) of each coding of a CodeableConcept (or a list of them)."""
    if concept is None:
        return
    concepts = concept if isinstance(concept, list) else [concept]
    for c in concepts:
        for coding in getattr(c, "coding", None) or []:
            yield coding.system, coding.code, coding.display


def concept_text(concept: Any) -> str:
    """All human text of a CodeableConcept (or list): `text` and each coding's display."""
    if concept is None:
        return ""
    concepts = concept if isinstance(concept, list) else [concept]
    parts: list[str] = []
    for c in concepts:
        if getattr(c, "text", None):
            parts.append(c.text)
        parts.extend(d for _, _, d in codings(c) if d)
    return " | ".join(parts)


def has_code(concept: Any, system: str, codes: Iterable[str]) -> bool:
    wanted = set(codes)
    return any(s == system and c in wanted for s, c, _ in codings(concept))


def codes_in(concept: Any, system: str) -> set[str]:
    return {c for s, c, _ in codings(concept) if s == system and c}


def moment(value: Any) -> datetime | date | None:
    """A FHIR date/dateTime/instant as parsed by fhir.resources: datetime or date; partial dates
    (``2026`` or ``2026-11``) stay strings and give None (they cannot place a day)."""
    if isinstance(value, datetime | date):
        return value
    return None


def as_date(value: Any) -> date | None:
    m = moment(value)
    if isinstance(m, datetime):
        return m.date()
    return m


def decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except ArithmeticError:
        return None


def notes_text(resource: Any) -> list[str]:
    return [n.text for n in (getattr(resource, "note", None) or []) if getattr(n, "text", None)]


def reference_of(reference: Any) -> str | None:
    return getattr(reference, "reference", None) if reference is not None else None


def condition_in_effect(cond: Resource) -> bool:
    """Not refuted or entered in error; clinically active, recurrent or relapsed (or status unstated)."""
    verification = {c for _, c, _ in codings(getattr(cond, "verificationStatus", None))}
    if verification & {"refuted", "entered-in-error"}:
        return False
    clinical = {c for _, c, _ in codings(getattr(cond, "clinicalStatus", None))}
    return not clinical or bool(clinical & {"active", "recurrence", "relapse"})
