"""FHIR R4 JSON in: open Bundles entry by entry, check what every reader relies on, index by type and
reference.

Resources stay the plain JSON objects `json` / `orjson` produced (no models, no copies). Here each one
is checked only for what every reader relies on: a JSON object, a known FHIR R4 `resourceType`, a valid
`id`. Each field is checked later, by the mapping that reads it (`fhir_mappings.access`), so a field no
rule uses is never looked at. Bundles are opened entry by entry so an error names the entry:
``prefetch.observations.entry[3].resource.effectiveDateTime``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fhir_mappings.access import Json, fhir_id, invalid, match_id, resource_type, shown
from fhir_mappings.errors import InvalidInput
from fhir_mappings.r4_types import RESOURCE_TYPES

MAX_ENTRIES = 5000
"""A prefetch with more entries than this is not a chart, it is a dump: refuse it (413-like)."""


def parse_resource(raw: Any, path: str, allowed: Iterable[str] | None = None) -> Json:
    """One resource: a JSON object with a known `resourceType` (one of `allowed`, if given) and a valid
    `id` when it has one. Returns `raw` itself; its fields are checked when a mapping reads them."""
    if not isinstance(raw, dict):
        raise InvalidInput(path, f"expected a FHIR resource (JSON object), got {type(raw).__name__}")
    rtype = raw.get("resourceType")
    if allowed is not None and isinstance(rtype, str) and rtype:
        allowed = tuple(allowed)
        if rtype not in allowed:
            raise InvalidInput(f"{path}.resourceType", f"expected {' or '.join(allowed)}, got {shown(rtype)}", 422)
    resource_type(raw, path)
    fhir_id(raw, "id", path)
    return raw


def parse_bundle_entries(raw: Any, path: str, allowed: Iterable[str] | None = None) -> list[tuple[str, Json]]:
    """(path, resource) of each entry of a Bundle (entries with `search.mode` = outcome are server
    messages, skipped)."""
    if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle":
        got = raw.get("resourceType") if isinstance(raw, dict) else type(raw).__name__
        raise InvalidInput(path, f"expected a FHIR Bundle, got {got!r}")
    entries = raw.get("entry", [])
    if not isinstance(entries, list):
        raise InvalidInput(f"{path}.entry", "expected a list")
    if len(entries) > MAX_ENTRIES:
        raise InvalidInput(f"{path}.entry", f"{len(entries)} entries; at most {MAX_ENTRIES} accepted", 413)
    allowed = tuple(allowed) if allowed is not None else None
    out = []
    types = RESOURCE_TYPES
    for i, entry in enumerate(entries):
        if type(entry) is not dict:
            raise InvalidInput(f"{path}.entry[{i}]", "expected a Bundle entry (JSON object)")
        search = entry.get("search")
        if search is not None and type(search) is dict and search.get("mode") == "outcome":
            continue
        resource = entry.get("resource")
        rpath = f"{path}.entry[{i}].resource"
        if resource is None:
            raise InvalidInput(rpath, "missing")
        # The checks of `parse_resource`, with its common case inlined (this loop sees every entry).
        if type(resource) is dict and allowed is None:
            rtype = resource.get("resourceType")
            rid = resource.get("id")
            if (
                type(rtype) is str
                and rtype in types
                and (rid is None or (type(rid) is str and match_id(rid) is not None))
            ):
                out.append((rpath, resource))
                continue
        out.append((rpath, parse_resource(resource, rpath, allowed)))
    return out


@dataclass
class ResourceIndex:
    """Resources (plain JSON) by type and by ``Type/id`` reference; `paths` remembers where each came
    from (by object identity: the index lives as long as the request it was built from)."""

    by_type: dict[str, list[Json]] = field(default_factory=dict)
    by_ref: dict[str, Json] = field(default_factory=dict)
    paths: dict[int, str] = field(default_factory=dict)

    def add(self, resource: Json, path: str) -> None:
        """Index a resource already checked by `parse_resource`."""
        rtype: str = resource["resourceType"]
        found = self.by_type.get(rtype)
        if found is None:
            self.by_type[rtype] = [resource]
        else:
            found.append(resource)
        self.paths[id(resource)] = path
        rid = resource.get("id")
        if rid:
            self.by_ref.setdefault(f"{rtype}/{rid}", resource)

    def of(self, rtype: str) -> list[Json]:
        return self.by_type.get(rtype, [])

    def located(self, rtype: str) -> list[tuple[Json, str]]:
        """(resource, path) of each resource of a type."""
        paths = self.paths
        return [(r, paths[id(r)]) for r in self.by_type.get(rtype, [])]

    def resolve(self, reference: str | None, container: Json | None = None, container_path: str = "") -> Json | None:
        """A reference's target among the indexed resources, or contained (``#id``) in `container` (found
        at `container_path`, default where it was indexed). Absolute references resolve by their last
        two segments (``.../Medication/42``), versioned ones without ``_history/n``."""
        if not reference:
            return None
        if reference.startswith("#"):
            if container is None:
                return None
            cpath = container_path or self.path_of(container)
            contained = container.get("contained")
            if contained is None:
                return None
            if not isinstance(contained, list):
                invalid(f"{cpath}.contained", "a JSON array of resources", contained)
            for i, c in enumerate(contained):
                here = f"{cpath}.contained[{i}]"
                if not isinstance(c, dict):
                    invalid(here, "a FHIR resource (JSON object)", c)
                if fhir_id(c, "id", here) == reference[1:]:
                    resource_type(c, here)
                    self.paths[id(c)] = here
                    return c
            return None
        parts = reference.rstrip("/").split("/")
        if len(parts) >= 2:
            key = f"{parts[-2]}/{parts[-1]}"
            if parts[-2] == "_history" and len(parts) >= 4:
                key = f"{parts[-4]}/{parts[-3]}"
            return self.by_ref.get(key)
        return None

    def path_of(self, resource: Json) -> str:
        return self.paths.get(id(resource), "?")


def index_prefetch(prefetch: Mapping[str, Any] | None, base: str = "prefetch") -> ResourceIndex:
    """Every resource in every prefetch value (a resource or a Bundle; ``null`` = no data)."""
    index = ResourceIndex()
    by_type, by_ref, paths = index.by_type, index.by_ref, index.paths
    for key, value in (prefetch or {}).items():
        path = f"{base}.{key}"
        if value is None:
            continue
        if not isinstance(value, dict):
            raise InvalidInput(path, f"expected a FHIR resource or Bundle, got {type(value).__name__}")
        rtype = value.get("resourceType")
        if rtype == "Bundle":
            for res_path, res in parse_bundle_entries(value, path):
                # `index.add`, inline (every resource of the request passes here)
                res_type = res["resourceType"]
                found = by_type.get(res_type)
                if found is None:
                    by_type[res_type] = [res]
                else:
                    found.append(res)
                paths[id(res)] = res_path
                rid = res.get("id")
                if rid:
                    key = f"{res_type}/{rid}"
                    if key not in by_ref:
                        by_ref[key] = res
        elif rtype == "OperationOutcome":
            issues = value.get("issue") or []
            first = issues[0] if isinstance(issues, list) and issues and isinstance(issues[0], dict) else {}
            details = first.get("details")
            text = first.get("diagnostics") or (details.get("text") if isinstance(details, dict) else None)
            raise InvalidInput(
                path, f"the EHR sent an OperationOutcome instead of data: {str(text or 'no details')[:200]!r}", 412
            )
        else:
            index.add(parse_resource(value, path), path)
    return index
