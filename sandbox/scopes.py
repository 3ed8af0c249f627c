"""SMART App Launch 2.2 scopes, as the sandbox authorization server grants them and its FHIR gateway enforces them.

Clinical scopes are ``{patient|user|system}/{ResourceType|*}.{interactions}[?param=value&...]``:

- v2 interactions are an in-order subset of ``cruds`` (``c`` create, ``r`` read/vread/instance history,
  ``u`` update/patch, ``d`` delete, ``s`` search/type and system history); ``.dus`` or ``.sr`` (out of order)
  are not scopes and are ignored, as the specification allows.
- v1 suffixes are accepted with their v2 meaning: ``.read`` = ``.rs``, ``.write`` = ``.cud``, ``.*`` = ``.cruds``.
  A v1 scope that is granted whole is given back in its v1 spelling.
- A ``?param=value`` suffix (v2 finer-grained access) narrows a scope to resources matching that search. The
  sandbox gateway honours such a scope only for searches that carry every one of its ``param=value`` pairs.

Every other scope (``openid``, ``fhirUser``, ``launch``, ``launch/patient``, ``offline_access``, ...) is an
opaque word, granted when the client is allowed that exact word.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

ScopeContext = Literal["patient", "user", "system"]
INTERACTIONS = "cruds"
V1_SUFFIXES = {"read": "rs", "write": "cud", "*": "cruds"}
_CLINICAL = re.compile(r"(patient|user|system)/([A-Z][A-Za-z]*|\*)\.([A-Za-z*]+)(?:\?(.*))?", re.DOTALL)


class ScopeSyntaxError(ValueError):
    """A ``patient/``, ``user/`` or ``system/`` scope that is not well formed; the message names it."""


@dataclass(frozen=True)
class ResourceScope:
    """One clinical scope: who it is limited to (`context`), which resource type (``*`` = any), which
    interactions (letters of ``cruds``), and optional ``param=value`` constraints."""

    context: ScopeContext
    resource_type: str
    interactions: frozenset[str]
    constraints: tuple[tuple[str, str], ...] = ()
    v1: bool = False

    @property
    def text(self) -> str:
        """The scope as written on the wire (v1 spelling when it was requested and granted that way)."""
        letters = "".join(c for c in INTERACTIONS if c in self.interactions)
        suffix = next((k for k, v in V1_SUFFIXES.items() if v == letters), letters) if self.v1 else letters
        text = f"{self.context}/{self.resource_type}.{suffix}"
        if self.constraints:
            text += "?" + "&".join(f"{k}={v}" for k, v in self.constraints)
        return text

    def applies_to(self, resource_type: str) -> bool:
        return self.resource_type in ("*", resource_type)

    def within(self, other: ResourceScope) -> bool:
        """Whether everything this scope allows, `other` allows too."""
        return (
            self.context == other.context
            and other.resource_type in ("*", self.resource_type)
            and self.interactions <= other.interactions
            and set(other.constraints) <= set(self.constraints)
        )

    def intersect(self, allowed: ResourceScope) -> ResourceScope | None:
        """What of this (requested) scope `allowed` permits, or None when nothing."""
        if self.context != allowed.context:
            return None
        if self.resource_type == "*":
            resource_type = allowed.resource_type
        elif allowed.resource_type in ("*", self.resource_type):
            resource_type = self.resource_type
        else:
            return None
        interactions = self.interactions & allowed.interactions
        if not interactions:
            return None
        constraints = tuple(dict.fromkeys((*self.constraints, *allowed.constraints)))
        whole = interactions == self.interactions and resource_type == self.resource_type
        return ResourceScope(self.context, resource_type, frozenset(interactions), constraints, self.v1 and whole)


def parse_resource_scope(text: str) -> ResourceScope | None:
    """The clinical scope `text` names, or None when `text` is not a clinical scope at all (``openid``,
    ``launch/patient``, ...). Raises `ScopeSyntaxError` for a malformed ``patient/``/``user/``/``system/`` scope."""
    if not text.startswith(("patient/", "user/", "system/")):
        return None
    match = _CLINICAL.fullmatch(text)
    if match is None:
        raise ScopeSyntaxError(f"{text!r} is not a SMART scope (context/ResourceType.cruds)")
    context, resource_type, suffix, query = match.groups()
    v1 = suffix in V1_SUFFIXES
    letters = V1_SUFFIXES[suffix] if v1 else suffix
    if not letters or not _in_order(letters):
        raise ScopeSyntaxError(f"{text!r}: interactions must be an in-order subset of 'cruds' (or read/write/*)")
    constraints: list[tuple[str, str]] = []
    if query is not None:
        for part in query.split("&"):
            name, eq, value = part.partition("=")
            if not name or not eq or not value:
                raise ScopeSyntaxError(f"{text!r}: constraints must be param=value pairs joined by '&'")
            constraints.append((name, value))
        if not constraints:
            raise ScopeSyntaxError(f"{text!r}: empty constraint after '?'")
    return ResourceScope(cast(ScopeContext, context), resource_type, frozenset(letters), tuple(constraints), v1)


def _in_order(letters: str) -> bool:
    positions = [INTERACTIONS.find(c) for c in letters]
    return all(p >= 0 for p in positions) and positions == sorted(set(positions))


@dataclass(frozen=True)
class Scopes:
    """A parsed, space-separated scope string: the clinical scopes, the other words, and what was malformed."""

    resource: tuple[ResourceScope, ...] = ()
    other: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Scopes:
        resource: list[ResourceScope] = []
        other: list[str] = []
        invalid: list[str] = []
        for word in dict.fromkeys((text or "").split()):
            try:
                scope = parse_resource_scope(word)
            except ScopeSyntaxError:
                invalid.append(word)
                continue
            if scope is None:
                other.append(word)
            elif scope not in resource:
                resource.append(scope)
        return cls(tuple(resource), tuple(other), tuple(invalid))

    @property
    def text(self) -> str:
        return " ".join([*(s.text for s in self.resource), *self.other])

    def has(self, word: str) -> bool:
        return word in self.other

    def contexts(self) -> set[ScopeContext]:
        return {s.context for s in self.resource}

    def matching(
        self, interaction: str, resource_type: str, search: Sequence[tuple[str, str]] | None = None
    ) -> tuple[ResourceScope, ...]:
        """The clinical scopes that allow `interaction` (one letter of ``cruds``) on `resource_type` (``*`` for a
        system-level interaction, which only a ``*`` scope allows). A constrained scope matches only a search
        (`search` = its parameters) that carries each of its ``param=value`` pairs."""
        out = []
        for scope in self.resource:
            if interaction not in scope.interactions:
                continue
            if scope.resource_type != "*" and scope.resource_type != resource_type:
                continue
            if scope.constraints and (search is None or not set(scope.constraints) <= set(search)):
                continue
            out.append(scope)
        return tuple(out)

    def without_context(self, context: ScopeContext) -> Scopes:
        return Scopes(tuple(s for s in self.resource if s.context != context), self.other, self.invalid)

    def only_contexts(self, contexts: Iterable[ScopeContext]) -> Scopes:
        keep = set(contexts)
        return Scopes(tuple(s for s in self.resource if s.context in keep), self.other, self.invalid)

    def only_resource(self) -> Scopes:
        return Scopes(self.resource)


def narrow(requested: Scopes, allowed: Scopes) -> Scopes:
    """What of `requested` the `allowed` scopes permit: each requested clinical scope intersected with each
    allowed one (``patient/*.cruds`` asked, ``patient/*.rs`` allowed → ``patient/*.rs``), and the other words
    the client is allowed. Malformed requested scopes are dropped."""
    resource: list[ResourceScope] = []
    for want in requested.resource:
        for can in allowed.resource:
            granted = want.intersect(can)
            if granted is not None and not any(granted.within(g) for g in resource):
                resource = [g for g in resource if not g.within(granted)]
                resource.append(granted)
    other = tuple(w for w in requested.other if w in allowed.other)
    return Scopes(tuple(resource), other)


def within(requested: Scopes, granted: Scopes) -> bool:
    """Whether `requested` asks for nothing beyond `granted` (a refresh may only narrow)."""
    return (
        not requested.invalid
        and all(any(r.within(g) for g in granted.resource) for r in requested.resource)
        and set(requested.other) <= set(granted.other)
    )
