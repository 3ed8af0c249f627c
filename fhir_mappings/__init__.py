"""FHIR R4 in, domain facts out (and, later, domain results back into FHIR).

Reads with `fhir.resources` R4B models. Code lists are data (`data/codes.toml`).
"""

from fhir_mappings.case import build_case
from fhir_mappings.errors import InvalidInput
from fhir_mappings.resources import ResourceIndex, index_prefetch, parse_bundle_entries, parse_resource

__all__ = [
    "InvalidInput",
    "ResourceIndex",
    "build_case",
    "index_prefetch",
    "parse_bundle_entries",
    "parse_resource",
]
