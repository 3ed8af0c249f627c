"""Parse FHIR R4 JSON into `fhir.resources` R4B models, once, and index them.

Bundles are opened entry by entry (not validated as a whole Bundle) so an error names the entry:
``prefetch.observations.entry[3].resource.effectiveDateTime``. Each resource is parsed exactly once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from fhir_mappings.errors import InvalidInput

MAX_ENTRIES = 5000
"""A prefetch with more entries than this is not a chart, it is a dump: refuse it (413-like)."""


def _loc(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def parse_resource(raw: Any, path: str, allowed: Iterable[str] | None = None) -> Resource:
    """One resource from JSON, validated against the R4B model for its `resourceType`."""
    if not isinstance(raw, dict):
        raise InvalidInput(path, f"expected a FHIR resource (JSON object), got {type(raw).__name__}")
    rtype = raw.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise InvalidInput(f"{path}.resourceType", "missing: every FHIR resource names its resourceType")
    allowed = tuple(allowed) if allowed is not None else None
    if allowed is not None and rtype not in allowed:
        raise InvalidInput(f"{path}.resourceType", f"expected {' or '.join(allowed)}, got {rtype!r}", 422)
    try:
        model = get_fhir_model_class(rtype)
    except ValueError:
        raise InvalidInput(f"{path}.resourceType", f"unknown FHIR R4 resource type {rtype!r}", 422) from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = path + _loc(err["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        value = err.get("input")
        shown = repr(value)[:80] if not isinstance(value, dict | list) else type(value).__name__
        raise InvalidInput(where, f"{err['msg']}; got {shown}{more}", 422) from None


def parse_bundle_entries(raw: Any, path: str, allowed: Iterable[str] | None = None) -> list[tuple[str, Resource]]:
    """The resources of a Bundle (entries with `search.mode` = outcome are server messages, skipped)."""
    if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle":
        got = raw.get("resourceType") if isinstance(raw, dict) else type(raw).__name__
        raise InvalidInput(path, f"expected a FHIR Bundle, got {got!r}")
    entries = raw.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidInput(f"{path}.entry", "expected a list")
    if len(entries) > MAX_ENTRIES:
        raise InvalidInput(f"{path}.entry", f"{len(entries)} entries; at most {MAX_ENTRIES} accepted", 413)
    out = []
    for i, entry in enumerate(entries):
        epath = f"{path}.entry[{i}]"
        if not isinstance(entry, dict):
            raise InvalidInput(epath, "expected a Bundle entry (JSON object)")
        search = entry.get("search")
        if isinstance(search, dict) and search.get("mode") == "outcome":
            continue
        if "resource" not in entry:
            raise InvalidInput(f"{epath}.resource", "missing")
        out.append((f"{epath}.resource", parse_resource(entry["resource"], f"{epath}.resource", allowed)))
    return out


@dataclass
class ResourceIndex:
    """Parsed resources by type and by ``Type/id`` reference; `paths` remembers where each came from."""

    by_type: dict[str, list[Resource]] = field(default_factory=lambda: defaultdict(list))
    by_ref: dict[str, Resource] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)

    def add(self, resource: Resource, path: str) -> None:
        rtype = resource.get_resource_type()
        self.by_type[rtype].append(resource)
        self.paths[id(resource)] = path
        rid = getattr(resource, "id", None)
        if rid:
            self.by_ref.setdefault(f"{rtype}/{rid}", resource)

    def of(self, rtype: str) -> list[Resource]:
        return self.by_type.get(rtype, [])

    def resolve(self, reference: str | None, container: Resource | None = None) -> Resource | None:
        """A reference's target among the indexed resources, or contained (``#id``) in `container`.
        Absolute references resolve by their last two segments (``.../Medication/42``)."""
        if not reference:
            return None
        if reference.startswith("#"):
            for c in getattr(container, "contained", None) or []:
                if getattr(c, "id", None) == reference[1:]:
                    return c
            return None
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 2:
            key = f"{parts[-2]}/{parts[-1]}"
            if parts[-2] == "_history" and len(parts) >= 4:
                key = f"{parts[-4]}/{parts[-3]}"
            return self.by_ref.get(key)
        return None

    def path_of(self, resource: Resource) -> str:
        return self.paths.get(id(resource), "?")


def index_prefetch(prefetch: Mapping[str, Any] | None, base: str = "prefetch") -> ResourceIndex:
    """Every resource in every prefetch value (a resource or a Bundle; ``null`` = no data)."""
    index = ResourceIndex()
    for key, value in (prefetch or {}).items():
        path = f"{base}.{key}"
        if value is None:
            continue
        if not isinstance(value, dict):
            raise InvalidInput(path, f"expected a FHIR resource or Bundle, got {type(value).__name__}")
        rtype = value.get("resourceType")
        if rtype == "Bundle":
            for res_path, res in parse_bundle_entries(value, path):
                index.add(res, res_path)
        elif rtype == "OperationOutcome":
            issues = value.get("issue") or []
            first = issues[0] if issues and isinstance(issues[0], dict) else {}
            text = first.get("diagnostics") or (first.get("details") or {}).get("text") or "no details"
            raise InvalidInput(path, f"the EHR sent an OperationOutcome instead of data: {str(text)[:200]!r}", 412)
        else:
            index.add(parse_resource(value, path), path)
    return index
