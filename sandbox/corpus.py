"""The scenario corpus (tests/scenarios/<name>/) loaded into one FHIR server, side by side.

Each scenario is a CDS Hooks request with a full prefetch plus its expected rule codes. To hold all of them
in one server at once, every resource id of a scenario gets a per-scenario prefix (``c1a2b3c-``, from a
hash of the scenario's name, so it does not change when scenarios are added) and every reference is
rewritten to match; the hook context (``patientId``, ``userId``, ``encounterId``, ``draftOrders``,
``selections``, ``medications``) is rewritten the same way, so the request still describes the chart the
server holds. Only the prefetch resources go to the server (transaction Bundles of ``PUT Type/id``, so
loading twice updates instead of duplicating), never the draft orders: the hook carries those.

The scenario files are read as data; this module imports no test code.

    scenarios = load_corpus(fhir_base, token=token)   # list[CorpusScenario], in name order
    sc = scenarios[0]; sc.request["context"]["patientId"]   # e.g. "c1a2b3c-pat-3ea626e040"
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import httpx

SCENARIOS_DIR: Final = Path(__file__).resolve().parents[1] / "tests" / "scenarios"
FHIR_JSON: Final = "application/fhir+json"
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_RELATIVE = re.compile(
    r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})(?P<history>/_history/[A-Za-z0-9\-.]{1,64})?"
)
_CONTEXT_IDS: Final = ("patientId", "encounterId")
_CONTEXT_REFERENCES: Final = ("userId",)
_CONTEXT_BUNDLES: Final = ("draftOrders", "medications")


class CorpusError(ValueError):
    """A scenario cannot be loaded as it is (the message names the scenario and what is wrong)."""


@dataclass(frozen=True)
class CorpusScenario:
    """One scenario as it lives in the server.

    ``request``: ``hook``, ``hookInstance`` and the rewritten ``context`` (no ``prefetch``, no
    ``fhirServer``: the caller resolves and points those). ``resources``: what was loaded (rewritten)."""

    name: str
    prefix: str
    hook: str
    description: str
    request: dict[str, Any]
    resources: tuple[dict[str, Any], ...]
    now: datetime
    timezone: str
    codes: tuple[str, ...]

    @property
    def context(self) -> dict[str, Any]:
        context: dict[str, Any] = self.request["context"]
        return context

    @property
    def patient_id(self) -> str:
        return str(self.context["patientId"])

    @property
    def user_id(self) -> str:
        return str(self.context["userId"])


def scenario_prefix(name: str) -> str:
    """``c`` + 6 hex digits of SHA-256(name) + ``-``: short, stable, a valid start of a FHIR id."""
    return f"c{hashlib.sha256(name.encode('utf-8')).hexdigest()[:6]}-"


def scenario_names(directory: Path = SCENARIOS_DIR) -> list[str]:
    return sorted(p.parent.name for p in directory.glob("*/request.json"))


class _Rewriter:
    def __init__(self, name: str, prefix: str) -> None:
        self.name = name
        self.prefix = prefix

    def fail(self, what: str) -> CorpusError:
        return CorpusError(f"{self.name}: {what}")

    def id(self, value: Any) -> str:
        if not isinstance(value, str) or _ID.fullmatch(value) is None:
            raise self.fail(f"{value!r} is not a FHIR id")
        new = self.prefix + value
        if _ID.fullmatch(new) is None:
            raise self.fail(f"{value!r} is too long to prefix (FHIR ids have at most 64 characters)")
        return new

    def reference(self, value: Any) -> Any:
        if not isinstance(value, str) or value.startswith("#"):
            return value  # contained resources keep their local ids
        match = _RELATIVE.fullmatch(value)
        if match is None:
            raise self.fail(
                f"reference {value!r} is neither Type/id nor #contained (absolute and urn: are not rewritten)"
            )
        return f"{match['type']}/{self.id(match['id'])}{match['history'] or ''}"

    def references(self, value: Any) -> Any:
        """A copy of `value` with every ``reference`` rewritten (contained resources included)."""
        if isinstance(value, dict):
            return {k: self.reference(v) if k == "reference" else self.references(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.references(v) for v in value]
        return value

    def resource(self, resource: Any) -> dict[str, Any]:
        if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
            raise self.fail("a prefetch or context entry is not a FHIR resource")
        out: dict[str, Any] = self.references(resource)
        out["id"] = self.id(resource.get("id"))
        return out

    def bundle(self, bundle: Any) -> dict[str, Any]:
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise self.fail("a context Bundle is not a Bundle")
        out = {k: copy.deepcopy(v) for k, v in bundle.items() if k != "entry"}
        entries = []
        for entry in bundle.get("entry") or []:
            new = {k: copy.deepcopy(v) for k, v in entry.items() if k not in ("resource", "fullUrl")}
            new["resource"] = self.resource(entry.get("resource"))
            entries.append(new)
        out["entry"] = entries
        return out

    def context(self, context: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in context.items():
            if key in _CONTEXT_IDS:
                out[key] = self.id(value)
            elif key in _CONTEXT_REFERENCES:
                out[key] = self.reference(value)
            elif key in _CONTEXT_BUNDLES:
                out[key] = self.bundle(value)
            elif key == "selections":
                out[key] = [self.reference(v) for v in value]
            else:
                raise self.fail(f"context.{key} is not a field the loader knows how to rewrite")
        return out


def _prefetch_resources(prefetch: Mapping[str, Any]) -> Iterator[Any]:
    for value in prefetch.values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            for entry in value.get("entry") or []:
                yield entry.get("resource") if isinstance(entry, dict) else None
        elif value is not None:
            yield value


def read_scenario(name: str, directory: Path = SCENARIOS_DIR) -> CorpusScenario:
    """One scenario, rewritten with its prefix (no I/O but reading its two files)."""
    folder = directory / name
    request = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    expected = json.loads((folder / "expected.json").read_text(encoding="utf-8"))
    prefix = scenario_prefix(name)
    rewriter = _Rewriter(name, prefix)
    resources: dict[str, dict[str, Any]] = {}
    for raw in _prefetch_resources(request.get("prefetch") or {}):
        resource = rewriter.resource(raw)
        if resource["resourceType"] in ("Bundle", "OperationOutcome"):
            raise rewriter.fail(f"the prefetch holds a {resource['resourceType']} where resources are expected")
        resources.setdefault(f"{resource['resourceType']}/{resource['id']}", resource)
    return CorpusScenario(
        name=name,
        prefix=prefix,
        hook=str(request["hook"]),
        description=str(expected.get("description", "")),
        request={
            "hook": request["hook"],
            "hookInstance": request.get("hookInstance"),
            "context": rewriter.context(request["context"]),
        },
        resources=tuple(resources.values()),
        now=datetime.fromisoformat(str(expected["now"])),
        timezone=str(expected["timezone"]),
        codes=tuple(expected["codes"]),
    )


def read_corpus(names: Iterable[str] | None = None, directory: Path = SCENARIOS_DIR) -> list[CorpusScenario]:
    """Every scenario (or `names`), rewritten, in name order. Two scenarios never share a prefix."""
    chosen = sorted(names) if names is not None else scenario_names(directory)
    out = [read_scenario(n, directory) for n in chosen]
    prefixes: dict[str, str] = {}
    for sc in out:
        other = prefixes.setdefault(sc.prefix, sc.name)
        if other != sc.name:
            raise CorpusError(f"{sc.name} and {other} hash to the same prefix {sc.prefix}: rename one")
    return out


def transaction(resources: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that PUTs each resource at ``Type/id`` (idempotent)."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": dict(r), "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources
        ],
    }


def load_corpus(
    fhir_base: str,
    *,
    token: str | None = None,
    names: Iterable[str] | None = None,
    directory: Path = SCENARIOS_DIR,
) -> list[CorpusScenario]:
    """Load every scenario's chart (or `names`') into the FHIR server at `fhir_base`, one transaction per
    scenario; returns the scenarios as `read_corpus` does. Raises `CorpusError` naming the scenario
    when the server refuses its transaction."""
    scenarios = read_corpus(names, directory)
    headers = {"Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(headers=headers, timeout=60.0) as http:
        for sc in scenarios:
            response = http.post(fhir_base.rstrip("/"), json=transaction(sc.resources))
            if response.status_code != 200:
                raise CorpusError(f"{sc.name}: the FHIR server answered {response.status_code}: {response.text[:2000]}")
            failed = [
                e
                for e in response.json().get("entry", [])
                if not str(e.get("response", {}).get("status", "")).startswith("2")
            ]
            if failed:
                raise CorpusError(f"{sc.name}: {len(failed)} entries failed: {json.dumps(failed)[:2000]}")
    return scenarios
