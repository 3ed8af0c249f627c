"""FHIR R4 in, domain facts out (and, later, domain results back into FHIR).

Reads plain FHIR JSON (dicts and lists as `json` / `orjson` produce them) with strict, targeted checks:
each field a rule acts on is checked when it is read (`fhir_mappings.access`), nothing else is built.
Code lists are data (`data/codes.toml`).
"""

from fhir_mappings.case import build_case, check_drafts
from fhir_mappings.errors import InvalidInput
from fhir_mappings.resources import ResourceIndex, index_prefetch, parse_bundle_entries, parse_resource

__all__ = [
    "InvalidInput",
    "ResourceIndex",
    "build_case",
    "check_drafts",
    "index_prefetch",
    "parse_bundle_entries",
    "parse_resource",
]
