"""The whole scenario corpus through the sandbox EHR's parts: every scenario's chart loaded with
`sandbox.corpus` into ONE FHIR server (ids prefixed per scenario), then each scenario's hook fired at the
real imid-rems service over HTTP with authentication on, by `sandbox.cds_client.CdsClient`:

1. with the prefetch the client resolved from the service's discovery templates against that server
   (plus ``fhirServer`` and ``fhirAuthorization``, as EHRs send them), and
2. without prefetch: ``fhirServer`` + ``fhirAuthorization`` only, so the service fetches everything itself.

Both must answer the expected rule codes of expected.json (compared as tests/integration/
test_cds_corpus_http.py compares them), and the same cards. The prefetch itself is checked against the
scenario's chart: nothing foreign, nothing altered by the round trip through the server, nothing missing.
The FHIR server demands a bearer token; the service trusts the sandbox's CDS client key through a JWK Set
file. One service per clinic zone (a server setting); the clock is set per scenario.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from sandbox.cds_client import CdsClient, fhir_authorization
from sandbox.corpus import SCENARIOS_DIR, CorpusScenario, load_corpus, read_corpus, scenario_names
from sandbox.ehr_keys import EhrKey, generate_key
from sandbox.fhir_engine import FHIR_JSON, FhirServer, start_fhir_server
from tests.support.cds_server import CdsServer, Clock, run_cds_server
from tests.support.fhir_load import card_codes, rule_codes

TOKEN = "corpus-token"  # noqa: S105 (a test value)
ISS = "http://sandbox-ehr.test"
EXCLUDED: dict[str, str] = {}
"""Scenarios a FHIR server cannot reproduce, with the reason. None so far: every chart stores and reads back."""
NAMES = [n for n in scenario_names() if n not in EXCLUDED]
SCENARIOS = {sc.name: sc for sc in read_corpus(NAMES)}
ZONES = sorted({sc.timezone for sc in SCENARIOS.values()})
COMPLETE_TYPES = ("MedicationRequest", "MedicationDispense", "Condition", "Procedure")
"""Every resource of these types in a scenario's chart is the patient's: a patient search returns them all."""


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirServer]:
    with start_fhir_server(require_token=TOKEN) as server:
        load_corpus(server.base, token=TOKEN, names=NAMES)
        yield server


@pytest.fixture(scope="module")
def key() -> EhrKey:
    return generate_key()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, key: EhrKey) -> Iterator[dict[str, CdsServer]]:
    folder = tmp_path_factory.mktemp("sandbox-corpus")
    jwks = folder / "ehr-jwks.json"
    jwks.write_text(json.dumps(key.public_jwks()), encoding="utf-8")
    clients = json.dumps([{"iss": ISS, "jwks_path": str(jwks)}])
    with ExitStack() as stack:
        yield {
            zone: stack.enter_context(
                run_cds_server(
                    Clock(),
                    database_url=f"sqlite:///{folder / f'{i}.sqlite'}",
                    cds_auth="on",
                    cds_clients=clients,
                    clinic_tz=zone,
                )
            )
            for i, zone in enumerate(ZONES)
        }


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def ehr(servers: dict[str, CdsServer], key: EhrKey, loop: asyncio.AbstractEventLoop) -> Iterator[dict[str, CdsClient]]:
    http = httpx.AsyncClient(timeout=30.0)
    yield {zone: CdsClient(f"{s.base}/cds-services", ISS, key, http) for zone, s in servers.items()}
    loop.run_until_complete(http.aclose())


def without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k != "meta"}


def resources_of(prefetch: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for value in prefetch.values():
        if isinstance(value, dict) and value.get("resourceType") == "Bundle":
            out.extend(e["resource"] for e in value["entry"])
        elif value is not None:
            out.append(value)
    return out


def check_prefetch(
    sc: CorpusScenario, templates: dict[str, str], values: dict[str, Any], skipped: dict[str, str]
) -> None:
    """Every key answered except those whose user token this user cannot fill; the data is the chart's own."""
    assert set(values) | set(skipped) == set(templates)
    assert all("has no value in this context" in why for why in skipped.values()), skipped
    assert values["patient"] is not None and values["patient"]["id"] == sc.patient_id
    chart = {f"{r['resourceType']}/{r['id']}": r for r in sc.resources}
    fetched = resources_of(values)
    for resource in fetched:
        ref = f"{resource['resourceType']}/{resource['id']}"
        assert ref in chart, f"{ref} is not in {sc.name}'s chart"
        assert without_meta(resource) == without_meta(chart[ref]), f"{ref} changed on its way through the server"
    got = {f"{r['resourceType']}/{r['id']}" for r in fetched}
    for ref, resource in chart.items():
        if resource["resourceType"] in COMPLETE_TYPES:
            assert ref in got, f"{ref} of {sc.name} was not prefetched"
        if resource["resourceType"] == "Observation":
            codes = [f"{c.get('system')}|{c.get('code')}" for c in resource["code"].get("coding") or []]
            if any(code in templates["observations"] for code in codes):
                assert ref in got, f"{ref} of {sc.name} matches the observations query but was not prefetched"


def comparable(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted((c["source"]["topic"]["code"], c["indicator"], c["summary"]) for c in result["cards"])


def test_every_scenario_is_loaded_once_even_when_loaded_twice(fhir: FhirServer) -> None:
    def patients() -> list[str]:
        ids: list[str] = []
        url: str | None = f"{fhir.base}/Patient?_count=1000"
        headers = {"Authorization": f"Bearer {TOKEN}", "Accept": FHIR_JSON}
        while url:
            page = httpx.get(url, headers=headers, timeout=30).json()
            ids += [e["resource"]["id"] for e in page.get("entry", [])]
            url = next((lk["url"] for lk in page.get("link", []) if lk["relation"] == "next"), None)
        return sorted(ids)

    before = patients()
    assert before == sorted(sc.patient_id for sc in SCENARIOS.values())
    again = load_corpus(fhir.base, token=TOKEN, names=NAMES[:5])
    assert [sc.name for sc in again] == NAMES[:5]
    assert patients() == before


def test_rewritten_ids_and_references_stay_inside_each_scenario() -> None:
    assert len(NAMES) >= 90 and len({sc.prefix for sc in SCENARIOS.values()}) == len(SCENARIOS)
    for sc in SCENARIOS.values():
        text = json.dumps([sc.request, sc.resources])
        refs = [r for r in _references(json.loads(text)) if not r.startswith("#")]
        assert refs and all(r.split("/")[1].startswith(sc.prefix) for r in refs), sc.name
        assert all(r["id"].startswith(sc.prefix) and len(r["id"]) <= 64 for r in sc.resources), sc.name
        assert sc.patient_id.startswith(sc.prefix) and sc.user_id.split("/")[1].startswith(sc.prefix)
        assert "prefetch" not in sc.request and "fhirServer" not in sc.request
        drafts = sc.context.get("draftOrders") or sc.context.get("medications")
        assert drafts is not None and all(e["resource"]["id"].startswith(sc.prefix) for e in drafts["entry"])
        raw = json.loads((SCENARIOS_DIR / sc.name / "request.json").read_text(encoding="utf-8"))
        in_prefetch = {f"{r['resourceType']}/{sc.prefix}{r['id']}" for r in resources_of(raw["prefetch"])}
        assert {f"{r['resourceType']}/{r['id']}" for r in sc.resources} == in_prefetch, sc.name


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from _references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _references(v)


async def _both_ways(cds: CdsClient, sc: CorpusScenario, fhir_base: str) -> tuple[Any, ...]:
    service = await cds.service_for_hook(sc.hook)
    assert service is not None, f"discovery offers no {sc.hook} service"
    authorization = fhir_authorization(
        {"access_token": TOKEN, "expires_in": 300, "scope": "user/*.rs"}, subject="imid-rems"
    )
    values, skipped = await cds.prefetch_report(service, sc.context, fhir_base, TOKEN, sc.user_id)
    with_prefetch = await cds.call(
        service["id"], sc.hook, sc.context, prefetch=values, fhir_server=fhir_base, fhir_authorization=authorization
    )
    fetched = await cds.call(
        service["id"], sc.hook, sc.context, fhir_server=fhir_base, fhir_authorization=authorization
    )
    return service, values, skipped, with_prefetch, fetched


@pytest.mark.parametrize("name", NAMES)
def test_scenario_through_the_sandbox(
    name: str,
    fhir: FhirServer,
    servers: dict[str, CdsServer],
    ehr: dict[str, CdsClient],
    loop: asyncio.AbstractEventLoop,
) -> None:
    sc = SCENARIOS[name]
    servers[sc.timezone].clock.now = sc.now
    service, values, skipped, (status, answer), (fetched_status, fetched) = loop.run_until_complete(
        _both_ways(ehr[sc.timezone], sc, fhir.base)
    )
    check_prefetch(sc, service["prefetch"], values, skipped)
    expected = sorted(sc.codes)
    refill = ["refill-draft"] if sc.hook == "medication-refill" else []
    assert status == 200, f"with prefetch: {answer}"
    assert rule_codes(answer) == expected, f"with prefetch: {sc.description}"
    assert card_codes(answer) == refill
    assert fetched_status == 200, f"without prefetch: {fetched}"
    assert rule_codes(fetched) == expected, f"without prefetch: {sc.description}"
    assert card_codes(fetched) == refill
    assert comparable(fetched) == comparable(answer)
