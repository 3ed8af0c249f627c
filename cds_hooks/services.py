"""One declaration per CDS service: discovery and routing both read `SERVICES`, keyed by service id.

Prefetch templates use only the CDS Hooks 2.0 prefetch tokens (``{{context.patientId}}``,
``{{userPractitionerId}}``) and the recommended query subset: instance reads, type searches by
reference, token equality (comma = OR) — no ``_include``, no chained parameters. Whatever the EHR does
not prefetch, the service fetches itself from ``fhirServer`` with the same relative URL
(`cds_hooks.prefetch`), so prefetched and fetched data are the same data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from fhir_mappings.codes import Codes, default_codes
from rems.findings import Family


def _observation_codes(codes: Codes) -> str:
    """LOINC codes of every Observation the rules read: hCG tests, pregnancy status, menopause age,
    regular-cycles codes (if a site configured one) and the labs."""
    wanted: set[str] = set(codes.preg_qualitative) | set(codes.preg_quantitative)
    wanted |= {codes.status_code, codes.age_at_menopause} | set(codes.regular_cycles)
    for lab in codes.labs.values():
        wanted |= lab
    return ",".join(f"{codes.loinc}|{c}" for c in sorted(wanted))


@cache
def chart_templates() -> dict[str, str]:
    """The chart the rules read. Keys are ours; values are FHIR queries relative to ``fhirServer``."""
    codes = default_codes()
    return {
        "patient": "Patient/{{context.patientId}}",
        "medications": "MedicationRequest?patient={{context.patientId}}",
        "dispenses": "MedicationDispense?patient={{context.patientId}}",
        "observations": f"Observation?patient={{{{context.patientId}}}}&code={_observation_codes(codes)}",
        "conditions": "Condition?patient={{context.patientId}}",
        "procedures": "Procedure?patient={{context.patientId}}",
        "practitionerRoles": "PractitionerRole?practitioner={{userPractitionerId}}",
        "userRole": "PractitionerRole/{{userPractitionerRoleId}}",
    }


OPTIONAL_KEYS = frozenset({"practitionerRoles", "userRole"})
"""Keys that only feed an advisory rule (the prescriber's specialty; the rule is silent when it is
unknown): an EHR that cannot fill them (the user is a Practitioner *or* a PractitionerRole, never both)
leaves them out, and their absence is "no data", not 412. They are still fetched when a server is there."""


@dataclass(frozen=True)
class CdsService:
    id: str
    hook: str
    title: str
    description: str
    prefetch_keys: tuple[str, ...]
    families: frozenset[Family] | None = None
    """Rule families this service runs (None = all)."""
    usage: str | None = None

    @property
    def required_keys(self) -> tuple[str, ...]:
        return tuple(k for k in self.prefetch_keys if k not in OPTIONAL_KEYS)

    @property
    def prefetch(self) -> dict[str, str]:
        templates = chart_templates()
        return {k: templates[k] for k in self.prefetch_keys}

    def discovery(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "hook": self.hook,
            "id": self.id,
            "title": self.title,
            "description": self.description,
            "prefetch": self.prefetch,
        }
        if self.usage:
            out["usageRequirements"] = self.usage
        return out


_ALL_KEYS = (
    "patient",
    "medications",
    "dispenses",
    "observations",
    "conditions",
    "procedures",
    "practitionerRoles",
    "userRole",
)
_USAGE = (
    "Send a signed JWT (ES384/RS384/ES256/RS256) from a registered issuer on every call. Prefetch what you can; "
    "the service fetches the rest from fhirServer with fhirAuthorization (read scopes for the prefetch resources)."
)

SERVICES: tuple[CdsService, ...] = (
    CdsService(
        id="imid-rems-order-select",
        hook="order-select",
        title="IMiD REMS: early check while an IMiD is chosen",
        description=(
            "While a lenalidomide, pomalidomide or thalidomide order is selected: the REMS checks only "
            "(supply, refills, risk category, authorization number, pregnancy tests), for the selected orders."
        ),
        prefetch_keys=_ALL_KEYS,
        families=frozenset({Family.REMS}),
        usage=_USAGE,
    ),
    CdsService(
        id="imid-rems-order-sign",
        hook="order-sign",
        title="IMiD REMS: full check at signing",
        description=(
            "Every REMS, coverage and clinical rule for the draft IMiD orders, with fixes as suggestions "
            "(supply set to 28 days, refills removed, pregnancy test ordered)."
        ),
        prefetch_keys=_ALL_KEYS,
        usage=_USAGE,
    ),
    CdsService(
        id="imid-rems-patient-view",
        hook="patient-view",
        title="IMiD REMS status",
        description=(
            "For a patient on an IMiD: one card with the REMS status: risk category, last negative pregnancy "
            "test and when it expires, next test due, days of supply left, next fill date."
        ),
        prefetch_keys=_ALL_KEYS[:-2],
        usage=_USAGE,
    ),
    CdsService(
        id="imid-rems-medication-refill",
        hook="medication-refill",
        title="IMiD REMS: drafted next prescription",
        description=(
            "For a pharmacist renewing an IMiD: the next 28-day prescription drafted with the REMS fields and "
            "no refills, offered as a create suggestion, with the pre-check results."
        ),
        prefetch_keys=_ALL_KEYS,
        usage=_USAGE,
    ),
)

BY_ID: dict[str, CdsService] = {s.id: s for s in SERVICES}
BY_HOOK: dict[str, CdsService] = {s.hook: s for s in SERVICES}
"""One service per hook here, so the CLI (which has no service id) can find the declaration by hook."""
