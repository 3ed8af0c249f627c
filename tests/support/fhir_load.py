"""The scenario corpus as test data for the HTTP tests: read a scenario, pick its rule codes out of an
answer, and turn its prefetch into a FHIR transaction Bundle so a real FHIR server holds the same chart.

    s = scenario("frp-test-8-days-stale")
    post_bundle(fhir_base, chart_transaction(s.request))          # the chart, ids kept (PUT Type/id)
    body = without_prefetch(s.request, fhir_base, token="tok")    # no prefetch: the service must fetch
    assert rule_codes(answer) == s.codes

Only the prefetch goes to the server, never the draft orders: the hook carries those itself.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from cds_hooks.cards import CARD_SYSTEM, RULE_SYSTEM
from sandbox.corpus import transaction  # PUT Type/id entries: ids and references stay as written

SCENARIOS_DIR = Path(__file__).resolve().parents[1] / "scenarios"


@dataclass(frozen=True)
class Scenario:
    name: str
    request: dict[str, Any]
    description: str
    now: datetime
    timezone: str
    codes: list[str]

    @property
    def hook(self) -> str:
        return str(self.request["hook"])

    @property
    def patient_id(self) -> str:
        return str(self.request["context"]["patientId"])


def scenario_names() -> list[str]:
    return sorted(p.parent.name for p in SCENARIOS_DIR.glob("*/request.json"))


def scenario(name: str) -> Scenario:
    """A fresh (deep) copy of the scenario: tests may change its request freely."""
    folder = SCENARIOS_DIR / name
    request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    exp = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    return Scenario(
        name=name,
        request=request,
        description=str(exp["description"]),
        now=datetime.fromisoformat(str(exp["now"])),
        timezone=str(exp["timezone"]),
        codes=list(exp["codes"]),
    )


def rule_codes(response: Mapping[str, Any]) -> list[str]:
    """Sorted rule codes of an answer's cards (topics in RULE_SYSTEM), one per card."""
    return sorted(
        c["source"]["topic"]["code"] for c in response["cards"] if c["source"]["topic"]["system"] == RULE_SYSTEM
    )


def card_codes(response: Mapping[str, Any]) -> list[str]:
    """Sorted non-rule card topics (CARD_SYSTEM: ``rems-status``, ``refill-draft``)."""
    return sorted(
        c["source"]["topic"]["code"] for c in response["cards"] if c["source"]["topic"]["system"] == CARD_SYSTEM
    )


def _resources(value: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(value, dict):
        return
    if value.get("resourceType") == "Bundle":
        for entry in value.get("entry") or []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if isinstance(resource, dict):
                yield resource
    elif value.get("resourceType") != "OperationOutcome":
        yield value


def prefetch_resources(request: Mapping[str, Any], keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Every resource of the request's prefetch (or of `keys` only), once per ``Type/id``."""
    prefetch = request.get("prefetch") or {}
    wanted = list(prefetch) if keys is None else list(keys)
    seen: dict[str, dict[str, Any]] = {}
    for key in wanted:
        for resource in _resources(prefetch.get(key)):
            seen.setdefault(f"{resource['resourceType']}/{resource['id']}", copy.deepcopy(resource))
    return list(seen.values())


def chart_transaction(request: Mapping[str, Any]) -> dict[str, Any]:
    """The scenario's prefetch (not its draft orders) as a transaction Bundle."""
    return transaction(prefetch_resources(request))


def fhir_authorization(token: str) -> dict[str, Any]:
    """A CDS Hooks 2.0 ``fhirAuthorization`` object carrying `token`."""
    return {
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": 300,
        "scope": "patient/Patient.read patient/Observation.read patient/MedicationRequest.read",
        "subject": "imid-rems",
    }


def without_prefetch(
    request: Mapping[str, Any], fhir_server: str | None, *, token: str | None = None, keep: Iterable[str] = ()
) -> dict[str, Any]:
    """A copy of the request with only the prefetch `keys` in `keep` (none: no ``prefetch`` at all),
    pointed at `fhir_server` with `token` as ``fhirAuthorization`` (no authorization when None)."""
    out = copy.deepcopy(dict(request))
    kept = {k: v for k, v in (out.get("prefetch") or {}).items() if k in set(keep)}
    if kept:
        out["prefetch"] = kept
    else:
        out.pop("prefetch", None)
    out.pop("fhirAuthorization", None)
    if fhir_server is None:
        out.pop("fhirServer", None)
    else:
        out["fhirServer"] = fhir_server
        if token is not None:
            out["fhirAuthorization"] = fhir_authorization(token)
    return out
