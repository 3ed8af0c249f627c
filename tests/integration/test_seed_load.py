"""The seeded population on a real FHIR server (the sandbox's Medplum engine): it loads, loads again without
duplicating anything, answers the searches the product makes, and — the realism check — the product,
fed by its own prefetch queries against that server, raises exactly the rule codes the manifest planned.

One server for the module (started with a required token, so every call here proves the token is sent);
the population is the first bundle of 50 patients, which holds every risk category, drug and problem.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Iterator
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from cds_hooks.prefetch import FhirSource, fetch_missing
from cds_hooks.services import chart_templates
from rems.model import Drug, RiskCategory
from sandbox.fhir_engine import FHIR_JSON, start_fhir_server
from sandbox.seed import PROBLEMS, PatientPlan, SeedLoadError, generate, load, main, plan, write
from tests.support.seed_charts import evaluate, medication_refill, order_sign, other_topics, rule_codes

TODAY = date(2026, 11, 21)
ZONE = "America/New_York"
SEED = 7
PATIENTS = 50
TOKEN = "seed-test-token"  # noqa: S105 (a test value, not a secret)
LOINC = "http://loinc.org"
Json = dict[str, Any]


class Loaded:
    def __init__(self, base: str, written: int, bundles: list[Json]) -> None:
        self.base = base
        self.written = written
        self.bundles = bundles
        self.plans = plan(PATIENTS, SEED, TODAY)
        self.types = Counter(e["resource"]["resourceType"] for b in bundles for e in b["entry"])


@pytest.fixture(scope="module")
def loaded() -> Iterator[Loaded]:
    bundles = list(generate(PATIENTS, SEED, TODAY, ZONE))
    with start_fhir_server(require_token=TOKEN) as server:
        written = load(server.base, iter(bundles), token=TOKEN)
        yield Loaded(server.base, written, bundles)


@pytest.fixture(scope="module")
def fhir(loaded: Loaded) -> Iterator[httpx.Client]:
    headers = {"Accept": FHIR_JSON, "Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=loaded.base + "/", headers=headers, timeout=30.0) as client:
        yield client


def total(fhir: httpx.Client, query: str) -> int:
    response = fhir.get(query + ("&" if "?" in query else "?") + "_count=1")
    assert response.status_code == 200, response.text
    count: int = response.json()["total"]
    return count


def ids(fhir: httpx.Client, query: str) -> set[str]:
    response = fhir.get(query + "&_count=1000")
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", [])}


def test_every_resource_is_written_once(loaded: Loaded, fhir: httpx.Client) -> None:
    assert loaded.written == sum(loaded.types.values()) > PATIENTS * 40
    for rtype, n in loaded.types.items():
        assert total(fhir, rtype) == n, rtype


def test_loading_again_duplicates_nothing(loaded: Loaded, fhir: httpx.Client) -> None:
    again = load(loaded.base, generate(PATIENTS, SEED, TODAY, ZONE), token=TOKEN, concurrency=2)
    assert again == loaded.written
    for rtype, n in loaded.types.items():
        assert total(fhir, rtype) == n, rtype


def test_searches_find_the_orders_tests_and_labs(loaded: Loaded, fhir: httpx.Client) -> None:
    imid_active = [i for i in ids(fhir, "MedicationRequest?status=active") if "-rx" in i]
    assert sorted(imid_active) == sorted(p.active_order for p in loaded.plans)
    hcg = f"{LOINC}|2106-3,{LOINC}|21198-7"
    for p in loaded.plans:
        active = ids(fhir, f"MedicationRequest?patient={p.patient_id}&status=active")
        assert p.active_order in active
        tests = ids(fhir, f"Observation?patient={p.patient_id}&code={hcg}")
        assert len(tests) == len(p.pregnancy_tests)
        anc = ids(fhir, f"Observation?subject=Patient/{p.patient_id}&code={LOINC}|751-8")
        assert len(anc) == len(p.labs.cbc)
    rp = [p for p in loaded.plans if p.category.can_get_pregnant and "missing-test" not in p.problems]
    assert rp and all(p.pregnancy_tests for p in rp)
    roles = ids(fhir, "PractitionerRole?specialty=http://nucc.org/provider-taxonomy|207RH0003X")
    assert roles == {"sb-role-onc1", "sb-role-onc2"}


def test_the_population_on_the_server_is_varied(loaded: Loaded) -> None:
    assert {p.category for p in loaded.plans} == set(RiskCategory)
    assert {p.drug for p in loaded.plans} == set(Drug)
    assert {q for p in loaded.plans for q in p.problems} >= set(PROBLEMS)


def _prefetch(base: str, p: PatientPlan) -> Json:
    """What the service itself fetches for this patient: its own prefetch templates, against the server."""
    context = {"patientId": p.patient_id, "userId": f"Practitioner/{p.prescriber}"}

    async def fetch() -> Json:
        async with httpx.AsyncClient(timeout=30.0) as client:
            templates = chart_templates()
            return await fetch_missing(client, FhirSource(base, TOKEN), templates, templates, context)

    return asyncio.run(fetch())


def test_the_product_finds_exactly_what_was_planned_from_the_server(loaded: Loaded) -> None:
    zone = ZoneInfo(ZONE)
    now = datetime.combine(TODAY, time(9, 30), zone)
    wrong = []
    for p in loaded.plans:
        prefetch = _prefetch(loaded.base, p)
        assert prefetch["userRole"] is None  # the user is a Practitioner: no role id to read
        signed = evaluate(order_sign(p, prefetch, now), now, zone)
        refill = evaluate(medication_refill(p, prefetch), now, zone)
        assert other_topics(signed) == [] and other_topics(refill) == ["refill-draft"]
        want = sorted(p.expected_rules)
        if (rule_codes(signed), rule_codes(refill)) != (want, want):
            wrong.append((p.patient_id, p.problems, p.days_left, want, rule_codes(signed), rule_codes(refill)))
        if p.clean and p.days_left <= 7 and not p.is_child:
            assert signed.cards == [], p.patient_id
    assert wrong == []


def test_the_engine_loads_a_written_directory_at_start(tmp_path: Path) -> None:
    bundles = list(generate(60, 3, TODAY, ZONE))
    write(tmp_path, bundles)
    with start_fhir_server(load=[tmp_path]) as server:
        response = httpx.get(f"{server.base}/Patient?_count=1", timeout=30.0)
        assert response.json()["total"] == 60
        orders = sum(1 for b in bundles for e in b["entry"] if e["resource"]["resourceType"] == "MedicationRequest")
        response = httpx.get(f"{server.base}/MedicationRequest?_count=1", timeout=30.0)
        assert response.json()["total"] == orders


@pytest.fixture(scope="module")
def scratch() -> Iterator[str]:
    """A server of its own for the failures: a batch writes its good entries, whose fixed ids would
    otherwise overwrite the loaded population."""
    with start_fhir_server() as server:
        yield server.base


def test_a_failed_entry_is_named_with_its_bundle(scratch: str) -> None:
    bundles = list(generate(2, SEED, TODAY, ZONE))
    broken = copy.deepcopy(bundles)
    index = next(i for i, e in enumerate(broken[0]["entry"]) if e["request"]["url"] == "Patient/sb-p000001")
    broken[0]["entry"][index]["resource"]["birthDate"] = "1961-13-02"
    with pytest.raises(SeedLoadError) as failure:
        load(scratch, broken)
    message = str(failure.value)
    assert message.startswith("Bundle 0000 (from Patient/sb-p000000): 1 entries failed")
    assert f"entry {index} (Patient/sb-p000001): 400" in message
    assert "Patient.birthDate" in message


def test_a_failed_transaction_is_retried_as_a_batch_to_name_the_entry(scratch: str) -> None:
    bundle = next(generate(1, SEED, TODAY, ZONE, bundle_type="transaction"))
    small = {**bundle, "entry": copy.deepcopy(bundle["entry"][-30:])}  # Medplum: at most 50 updates
    index = next(i for i, e in enumerate(small["entry"]) if "effectiveDateTime" in e["resource"])
    small["entry"][index]["resource"]["effectiveDateTime"] = "2026-13-40"
    url = small["entry"][index]["request"]["url"]
    with pytest.raises(SeedLoadError) as failure:
        load(scratch, [small])
    message = str(failure.value)
    assert message.startswith("Bundle 0000: the transaction failed with 400 (Invalid dateTime format"), message
    assert f"entry {index} ({url}): 400" in message


def test_a_missing_token_is_refused_by_name(loaded: Loaded) -> None:
    with pytest.raises(
        SeedLoadError, match=r"^Bundle 0000 \(from Patient/sb-p000000\): the server answered 401: Missing bearer token"
    ):
        load(loaded.base, generate(1, SEED, TODAY, ZONE))


def test_the_command_loads_onto_a_server(loaded: Loaded, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--patients", "5", "--seed", str(SEED), "--today", TODAY.isoformat(), "--tz", ZONE]
    assert main([*argv, "--fhir", loaded.base, "--token", TOKEN]) == 0
    out = capsys.readouterr().out
    written = sum(len(b["entry"]) for b in generate(5, SEED, TODAY, ZONE))
    assert out.startswith(f"seeded 5 patients, {written} resources (loaded into {loaded.base};")
    assert main([*argv, "--fhir", loaded.base]) == 1
    assert "401" in capsys.readouterr().err
