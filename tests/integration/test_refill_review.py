"""The refill review API (`cds_hooks.review_api`, `cds_hooks.refill_review`) end to end, over real HTTP: the
Medplum FHIR engine loaded with a seeded population, the sandbox EHR in front of it (SMART authorization
server with token introspection, FHIR gateway), and the service with its Backend Services client.

The engine and the sandbox are shared by the module; each test gets a fresh service database (SQLite and
PostgreSQL, `database_url`) and its own service, and runs the refill scan in-process at the seed's today,
10:00 America/New_York. Approvals write to the shared FHIR server, so tests take different seeded patients
and `restore_charts` takes off the server, after each test, whatever it wrote there (prescriptions,
Provenance, added observations): every test finds the seeded charts, whichever ran before it. Faults are
injected by a proxy between the service and the gateway (`tests.support.fault_proxy` for reads,
`tests.support.write_faults` for the transaction).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI

from cds_hooks import refill_store as store
from cds_hooks.app import Population, create_app
from cds_hooks.refill_scan import ScanReport
from cds_hooks.settings import Settings
from fhir_mappings.medication import AUTHORIZATION_SYSTEM
from fhir_mappings.writes import REFILL_DRAFT_SYSTEM
from sandbox.app import BACKEND_CLIENT_ID, backend_key, create_sandbox_app, default_config
from sandbox.fhir_engine import FHIR_JSON, start_fhir_server
from sandbox.seed import PatientPlan, generate, plan, write
from sandbox.smart_auth import SmartAuthServer
from tests.support.cds_server import free_port, serve_app
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.threads import all_at_once
from tests.support.write_faults import WriteFault, WriteFaults

TODAY = date(2026, 11, 21)
ZONE = "America/New_York"
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=ZoneInfo(ZONE))
PATIENTS = 33
SEED = 1
APP_CLIENT = "imid-rems-app"
USER_SCOPE = "openid fhirUser user/*.rs"
RPH1, RPH2 = "sb-role-rph1", "sb-role-rph2"
DOCTOR = "sb-role-onc1"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
ADDED_TEST = "-hcg-positive-today"

Json = dict[str, Any]


# --- the shared sandbox ------------------------------------------------------------------------------------


@dataclass
class Sandbox:
    engine: str
    """The FHIR engine's own base (no auth): what the tests read, change and clean up through."""
    origin: str
    """The sandbox EHR (SMART server, gateway under ``/fhir``)."""
    auth: SmartAuthServer
    key_file: Path
    plans: dict[str, PatientPlan]
    added: list[str] = field(default_factory=list)
    """Resources the running test put on the server (`restore_charts` deletes them)."""

    @property
    def gateway(self) -> str:
        return f"{self.origin}/fhir"

    def token(self, role: str) -> str:
        issued = self.auth.issue_token(APP_CLIENT, USER_SCOPE, user=f"PractitionerRole/{role}")
        return str(issued["access_token"])

    def patients(self, want: Callable[[PatientPlan], bool], n: int = 1) -> list[PatientPlan]:
        """The first `n` seeded patients that fit (the same ones every time: tests leave the charts as
        they found them, see `restore_charts`)."""
        found = [p for p in self.plans.values() if want(p)][:n]
        if len(found) < n:
            pytest.fail(f"the seeded population has {len(found)} such patients, not {n}: raise PATIENTS")
        return found

    def patient(self, want: Callable[[PatientPlan], bool], k: int = 0) -> PatientPlan:
        """The `k`-th patient that fits (counting round): tests pick different ones where they can."""
        found = [p for p in self.plans.values() if want(p)]
        if not found:
            pytest.fail("the seeded population has no such patient: raise PATIENTS")
        return found[k % len(found)]

    def read(self, reference: str) -> Json:
        response = httpx.get(f"{self.engine}/{reference}", headers={"Accept": FHIR_JSON}, timeout=10)
        response.raise_for_status()
        body: Json = response.json()
        return body

    def search(self, query: str) -> list[Json]:
        response = httpx.get(f"{self.engine}/{query}", headers={"Accept": FHIR_JSON}, timeout=10)
        response.raise_for_status()
        return [e["resource"] for e in response.json().get("entry") or []]

    def put(self, resource: Json) -> None:
        response = httpx.put(
            f"{self.engine}/{resource['resourceType']}/{resource['id']}",
            json=resource,
            headers={"Content-Type": FHIR_JSON, "Accept": FHIR_JSON},
            timeout=10,
        )
        assert response.status_code in (200, 201), response.text
        self.added.append(f"{resource['resourceType']}/{resource['id']}")

    def delete(self, reference: str) -> None:
        response = httpx.delete(f"{self.engine}/{reference}", headers={"Accept": FHIR_JSON}, timeout=10)
        assert response.status_code in (200, 204, 404, 410), response.text

    def written(self, request_key: str | None = None) -> list[Json]:
        """MedicationRequests on the server carrying the draft's refill-draft identifier (any draft's: None)."""
        system = quote(REFILL_DRAFT_SYSTEM, safe="")
        return self.search(f"MedicationRequest?identifier={system}|{request_key or ''}&_count=1000")

    def provenances(self, reference: str) -> list[Json]:
        return self.search(f"Provenance?target={reference}&_count=1000")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    root = tmp_path_factory.mktemp("refill-review")
    state = root / "state"
    state.mkdir()
    write(root / "seed", generate(PATIENTS, seed=SEED, today=TODAY, zone=ZONE))
    plans = {p.patient_id: p for p in plan(PATIENTS, seed=SEED, today=TODAY)}
    with start_fhir_server(load=[root / "seed"]) as engine:
        port = free_port()
        origin = f"http://127.0.0.1:{port}"
        config = default_config(
            base_url=origin, fhir_upstream=engine.base, service_base="http://127.0.0.1:9", state_dir=state
        )
        app = create_sandbox_app(config)
        key_file = root / "backend-key.pem"
        key_file.write_bytes(backend_key(state).private_pem())
        with serve_app(app, port):
            yield Sandbox(engine.base, origin, app.state.auth, key_file, plans)


@pytest.fixture
def restore_charts(sandbox: Sandbox) -> Iterator[None]:
    """After the test, take off the server what it put there: the prescriptions approvals wrote (every
    MedicationRequest with a refill-draft identifier), their Provenance, and the test's observations. So
    each test finds the seeded charts, whatever ran before it (and every test runs twice, once per database).
    """
    yield
    for mr in sandbox.written():
        reference = f"MedicationRequest/{mr['id']}"
        for provenance in sandbox.provenances(reference):
            sandbox.delete(f"Provenance/{provenance['id']}")
        sandbox.delete(reference)
    for reference in sandbox.added:
        sandbox.delete(reference)
    sandbox.added.clear()
    assert sandbox.written() == []


# --- patients ----------------------------------------------------------------------------------------------


def frp(p: PatientPlan) -> bool:
    return p.category.value.endswith("-rp")


def plain(p: PatientPlan) -> bool:
    """Not of reproductive potential, nothing wrong in the chart but (maybe) missing prophylaxis, due soon:
    its draft's only hard stop is the missing authorization number."""
    return not frp(p) and p.problems in (("clean",), ("no-prophylaxis",)) and p.days_left <= 8


def lenalidomide_daily(p: PatientPlan) -> bool:
    return plain(p) and p.drug.value == "lenalidomide" and p.regimen.days_on == 28


def frp_tested(p: PatientPlan) -> bool:
    """Of reproductive potential, a recent negative test, no pregnancy-test problem planted, due within the
    horizon."""
    test_problems = {"stale-test", "missing-test", "positive-test"}
    return frp(p) and p.last_negative_test is not None and not test_problems & set(p.problems) and p.days_left <= 9


# --- the service -------------------------------------------------------------------------------------------


@dataclass
class Service:
    base: str
    app: FastAPI
    settings: Settings
    sandbox: Sandbox
    clients: list[httpx.Client] = field(default_factory=list)

    def client(self, role: str | None = RPH1, *, token: str | None = None) -> httpx.Client:
        headers = {}
        if role is not None or token is not None:
            headers["Authorization"] = f"Bearer {token or self.sandbox.token(role or RPH1)}"
        c = httpx.Client(base_url=self.base, headers=headers, timeout=30, trust_env=False)
        self.clients.append(c)
        return c

    def _population(self, work: Callable[[Population], Any]) -> Any:
        async def go() -> Any:
            async with httpx.AsyncClient(timeout=httpx.Timeout(self.settings.fhir_timeout_s)) as http:
                return await work(Population(self.settings, self.app.state.imid, http))

        return asyncio.run(go())

    def scan(self) -> ScanReport:
        report: ScanReport = self._population(lambda p: p.scanner.scan(NOW))
        assert report.error is None, report.error
        return report

    def run_once(self) -> bool:
        ok: bool = self._population(lambda p: p.run_once())
        return ok

    def retry_writes(self) -> int:
        landed: int = self._population(lambda p: p.review.retry_writes())
        return landed

    def request_key(self, draft_id: str) -> str:
        draft = store.get_draft(self.app.state.imid.engine, draft_id)
        assert draft is not None
        return draft.request_key

    def draft_of(self, patient: PatientPlan, c: httpx.Client | None = None) -> Json:
        """The patient's draft (any status), in full."""
        c = c or self.client()
        listed = c.get("/api/refills", params={"status": "all", "limit": 500})
        assert listed.status_code == 200, listed.text
        mine = [d for d in listed.json()["drafts"] if d["patientId"] == patient.patient_id]
        assert len(mine) == 1, f"{patient.patient_id}: {len(mine)} drafts ({patient.problems}, {patient.days_left} d)"
        return get(c, mine[0]["id"])


@pytest.fixture
def services(
    sandbox: Sandbox, database_url: str, restore_charts: None
) -> Iterator[Callable[..., AbstractContextManager[Service]]]:
    """``with services(fhir_base=...) as svc``: a service on this test's database, reading the sandbox's
    gateway (or `fhir_base`, e.g. a proxy in front of it)."""

    def start(fhir_base: str | None = None) -> AbstractContextManager[Service]:
        settings = Settings(
            database_url=database_url,
            fhir_base_url=fhir_base or sandbox.gateway,
            backend_client_id=BACKEND_CLIENT_ID,
            backend_key_file=sandbox.key_file,
            refill_scan_interval_s=0,
            clinic_tz=ZONE,
            cds_auth="off",
        )
        return _serve(settings, sandbox)

    yield start


class _serve(AbstractContextManager[Service]):
    def __init__(self, settings: Settings, sandbox: Sandbox) -> None:
        self.settings, self.sandbox = settings, sandbox
        self.stack = ExitStack()

    def __enter__(self) -> Service:
        app = create_app(self.settings, now=lambda: NOW)
        base = self.stack.enter_context(serve_app(app))
        self.service = Service(base, app, self.settings, self.sandbox)
        return self.service

    def __exit__(self, *exc: object) -> None:
        for c in self.service.clients:
            c.close()
        self.stack.close()


class Proxy:
    """A FaultProxy (read faults) wrapped in WriteFaults (transaction faults) in front of the sandbox, served
    on a fixed port so it can be stopped (the EHR is down) and started again."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.reads = FaultProxy(sandbox.origin)
        self.writes = WriteFaults(self.reads)
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self._stack: ExitStack | None = None

    @property
    def fhir(self) -> str:
        return f"{self.origin}/fhir"

    def start(self) -> None:
        assert self._stack is None
        self._stack = ExitStack()
        self._stack.enter_context(serve_app(self.writes, self.port))

    def stop(self) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None

    def heal(self) -> None:
        self.reads.clear()
        self.writes.clear()


@pytest.fixture
def proxy(sandbox: Sandbox) -> Iterator[Proxy]:
    p = Proxy(sandbox)
    p.start()
    try:
        yield p
    finally:
        if p._stack is not None:
            p.stop()


# --- API helpers -------------------------------------------------------------------------------------------


def get(c: httpx.Client, draft_id: str) -> Json:
    response = c.get(f"/api/refills/{draft_id}")
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


def patch(c: httpx.Client, draft: Json, **fields: Any) -> httpx.Response:
    return c.patch(f"/api/refills/{draft['id']}", json={"version": draft["version"], **fields})


def approve(c: httpx.Client, draft: Json, version: int | None = None) -> httpx.Response:
    return c.post(f"/api/refills/{draft['id']}/approve", json={"version": version or draft["version"]})


def edited(c: httpx.Client, draft: Json, **fields: Any) -> Json:
    response = patch(c, draft, **fields)
    assert response.status_code == 200, response.text
    body: Json = response.json()
    return body


def authorized(c: httpx.Client, draft: Json, number: str = "73100042") -> Json:
    """The draft with a fresh REMS authorization number (no hard stop left, for a plain patient)."""
    out = edited(c, draft, authorizationNumber=number)
    assert out["authorizationNumber"] == number
    return out


def error(response: httpx.Response, status: int) -> Json:
    assert response.status_code == status, response.text
    body: Json = response.json()["error"]
    assert body["status"] == status
    return body


def check_codes(draft: Json) -> list[str]:
    return [c["code"] for c in draft["checks"]]


def auth_number_of(resource: Json) -> str | None:
    for i in resource.get("identifier") or []:
        if i.get("system") == AUTHORIZATION_SYSTEM:
            return str(i["value"])
    return None


def agents(provenance: Json) -> dict[str, str]:
    return {a["type"]["coding"][0]["code"]: a["who"]["reference"] for a in provenance["agent"]}


def positive_test(p: PatientPlan) -> Json:
    """A positive urine pregnancy test taken this morning (after the scan)."""
    taken = NOW - timedelta(hours=2)
    return {
        "resourceType": "Observation",
        "id": f"{p.patient_id}{ADDED_TEST}",
        "status": "final",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}
        ],
        "code": {
            "coding": [
                {
                    "system": LOINC,
                    "code": "2106-3",
                    "display": "Choriogonadotropin (pregnancy test) [Presence] in Urine",
                }
            ],
            "text": "Urine pregnancy test",
        },
        "subject": {"reference": f"Patient/{p.patient_id}"},
        "effectiveDateTime": taken.isoformat(),
        "valueCodeableConcept": {"coding": [{"system": SNOMED, "code": "10828004", "display": "Positive"}]},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS",
                        "display": "Positive",
                    }
                ]
            }
        ],
    }


def one_written(sandbox: Sandbox, key: str, reference: str) -> Json:
    """Exactly one MedicationRequest with the draft's key, it is `reference`, with exactly one Provenance."""
    found = sandbox.written(key)
    assert [f"MedicationRequest/{r['id']}" for r in found] == [reference]
    assert len(sandbox.provenances(reference)) == 1
    return found[0]


# --- 1. the whole flow -------------------------------------------------------------------------------------


def test_scan_review_edit_authorize_approve_writes_one_prescription_with_provenance(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p = sandbox.patient(lenalidomide_daily)
    prior_ref = f"MedicationRequest/{p.active_order}"
    prior = sandbox.read(prior_ref)
    prior_number = auth_number_of(prior)
    assert prior_number, "the seeded prior order carries its authorization number"
    with services() as svc:
        report = svc.scan()
        assert report.created > 0
        c = svc.client(RPH1)

        listed = c.get("/api/refills", params={"limit": 500})
        assert listed.status_code == 200, listed.text
        worklist = listed.json()
        drafts = worklist["drafts"]
        assert worklist["status"] == "pending" and {d["status"] for d in drafts} == {"pending"}
        assert worklist["counts"]["pending"] == len(drafts) == report.created
        assert sum(worklist["counts"].values()) == len(drafts)
        urgency = [(d["daysLeft"], -d["blocking"]) for d in drafts]
        assert urgency == sorted(urgency)
        ties = [{d["blocking"] for d in drafts if d["daysLeft"] == n} for n in {d["daysLeft"] for d in drafts}]
        assert len(ties) > 1 and any(len(t) > 1 for t in ties)  # both keys of the order are exercised
        assert all(d["blocking"] == len(d["blockingCodes"]) for d in drafts)

        summary = next(d for d in drafts if d["patientId"] == p.patient_id)
        assert summary["priorOrder"] == prior_ref and summary["daysLeft"] == p.days_left
        assert summary["blockingCodes"] == ["authorization-missing"]

        draft = get(c, summary["id"])
        key = svc.request_key(draft["id"])
        to_write = draft["toWrite"]
        assert to_write["status"] == "active" and to_write["intent"] == "order"
        assert to_write["requester"] == {"reference": f"PractitionerRole/{RPH1}"}
        assert {"system": REFILL_DRAFT_SYSTEM, "value": key} in to_write["identifier"]
        assert draft["medicationRequest"]["priorPrescription"] == {"reference": prior_ref}
        assert "authorization-missing" in check_codes(draft)
        supply = draft["medicationRequest"]["dispenseRequest"]
        assert supply["expectedSupplyDuration"]["value"] == 28 and supply["quantity"]["value"] == 28

        after = edited(c, draft, supplyDays=21, note="Short fill: cycle moved for travel")
        assert after["version"] == draft["version"] + 1
        dispense = after["medicationRequest"]["dispenseRequest"]
        assert dispense["expectedSupplyDuration"]["value"] == 21
        assert dispense["quantity"]["value"] == 21  # one capsule a day: recomputed for the new supply
        notes = [n["text"] for n in after["medicationRequest"]["note"]]
        assert "Short fill: cycle moved for travel" in notes

        bad = error(patch(c, after, authorizationNumber="abc"), 422)
        assert bad["field"] == "authorizationNumber"
        assert get(c, draft["id"])["version"] == after["version"]

        reused = edited(c, after, authorizationNumber=prior_number)
        assert "authorization-reused" in reused["blockingCodes"]
        assert "authorization-missing" not in reused["blockingCodes"]
        refused = error(approve(c, reused), 422)
        assert "authorization-reused" in refused["blocking"]

        number = str(int(prior_number) + 1)
        ready = edited(c, reused, authorizationNumber=number)
        assert ready["blockingCodes"] == [] and ready["blocking"] == 0
        assert ready["medicationRequest"]["dispenseRequest"]["expectedSupplyDuration"]["value"] == 21

        approved = approve(c, ready)
        assert approved.status_code == 200, approved.text
        done = approved.json()
        assert done["status"] == "written" and done["decidedBy"] == f"PractitionerRole/{RPH1}"
        reference = done["writtenReference"]
        assert reference.startswith("MedicationRequest/")

        mr = one_written(sandbox, key, reference)
        assert mr["status"] == "active" and mr["intent"] == "order"
        assert mr["requester"]["reference"] == f"PractitionerRole/{RPH1}"
        assert mr["priorPrescription"]["reference"] == prior_ref
        assert mr["subject"]["reference"] == f"Patient/{p.patient_id}"
        assert mr["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
        assert mr["dispenseRequest"]["expectedSupplyDuration"]["value"] == 21
        assert auth_number_of(mr) == number
        provenance = sandbox.provenances(reference)[0]
        assert provenance["target"] == [{"reference": reference}]
        assert agents(provenance) == {
            "author": f"PractitionerRole/{RPH1}",
            "verifier": prior["requester"]["reference"],
        }
        assert prior["requester"]["reference"] == f"PractitionerRole/{p.prescriber_role}"

        trail = c.get(f"/api/refills/{draft['id']}/audit")
        assert trail.status_code == 200
        actions = [(a["action"], a["actor"]) for a in trail.json()["audit"]]
        me = f"PractitionerRole/{RPH1}"
        assert actions[0] == ("created", store.SCAN_ACTOR)
        assert actions[-2:] == [("approved", me), ("written", me)]
        middle = actions[1:-2]
        assert len(middle) == 3 and all(a in {"edited", "authorization-entered"} and who == me for a, who in middle)

        again = approve(c, ready)  # the answer was lost, the pharmacist clicks again: nothing more is written
        assert again.status_code == 200 and again.json()["writtenReference"] == reference
        one_written(sandbox, key, reference)


# --- 2. REMS hard stops ------------------------------------------------------------------------------------


def test_a_pregnancy_test_hard_stop_refuses_approval(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    cases = {"stale-test": "pregnancy-test-stale", "positive-test": "pregnancy-test-positive"}
    with services() as svc:
        svc.scan()
        c = svc.client(RPH1)
        for problem, code in cases.items():
            p = sandbox.patient(lambda p: problem in p.problems and p.days_left <= 8)  # noqa: B023
            draft = svc.draft_of(p, c)
            assert code in draft["blockingCodes"]
            ready = authorized(c, draft)
            assert "authorization-missing" not in ready["blockingCodes"] and code in ready["blockingCodes"]
            refused = error(approve(c, ready), 422)
            assert code in refused["blocking"]
            after = get(c, draft["id"])
            assert after["status"] == "pending" and after["version"] == ready["version"]
            assert after["decidedBy"] is None and after["writtenReference"] is None


# --- 3. who may do what ------------------------------------------------------------------------------------


def test_callers_need_an_active_token_and_only_pharmacists_change_drafts(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p = sandbox.patient(plain, 1)
    with services() as svc:
        svc.scan()
        draft = svc.draft_of(p)
        anonymous = svc.client(None)
        for response in (
            anonymous.get("/api/refills"),
            anonymous.get(f"/api/refills/{draft['id']}"),
            anonymous.post(f"/api/refills/{draft['id']}/approve", json={"version": draft["version"]}),
        ):
            assert error(response, 401)["field"] == "Authorization"
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        garbage = svc.client(token="not-a-token-the-ehr-issued")  # noqa: S106 (not a secret)
        response = garbage.get("/api/refills")
        error(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        basic = anonymous.get("/api/refills", headers={"Authorization": "Basic cnBoMTpwdw=="})
        error(basic, 401)
        revoked = sandbox.token(RPH2)
        sandbox.auth.revoke(revoked)
        error(svc.client(token=revoked).get("/api/refills"), 401)

        doctor = svc.client(DOCTOR)
        listed = doctor.get("/api/refills")
        assert listed.status_code == 200 and any(d["id"] == draft["id"] for d in listed.json()["drafts"])
        seen = get(doctor, draft["id"])
        assert seen["version"] == draft["version"]
        assert doctor.get(f"/api/refills/{draft['id']}/audit").status_code == 200
        for response in (
            patch(doctor, draft, note="I am not a pharmacist"),
            approve(doctor, draft),
            doctor.post(f"/api/refills/{draft['id']}/reject", json={"version": draft["version"], "reason": "no"}),
        ):
            assert "pharmacist" in error(response, 403)["message"]
        after = get(svc.client(RPH1), draft["id"])
        assert after["status"] == "pending" and after["version"] == draft["version"]


# --- 4. two pharmacists at once ----------------------------------------------------------------------------


def test_two_pharmacists_approving_at_once_one_wins_the_other_is_told_who(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p = sandbox.patient(plain, 2)
    with services() as svc:
        svc.scan()
        first, second = svc.client(RPH1), svc.client(RPH2)
        ready = authorized(first, svc.draft_of(p, first))
        key = svc.request_key(ready["id"])
        get(second, ready["id"])  # both have looked (and their tokens are known)
        answers = all_at_once(2, lambda i: approve((first, second)[i], ready))
        statuses = sorted(a.status_code for a in answers)
        assert statuses == [200, 409], [a.text for a in answers]
        won = next(a for a in answers if a.status_code == 200).json()
        lost = error(next(a for a in answers if a.status_code == 409), 409)
        winner = won["decidedBy"]
        assert winner in (f"PractitionerRole/{RPH1}", f"PractitionerRole/{RPH2}")
        assert winner in lost["message"]
        assert won["status"] == "written"
        one_written(sandbox, key, won["writtenReference"])


# --- 5. faults during approval -----------------------------------------------------------------------------


def test_an_ehr_that_cannot_be_read_during_the_recheck_refuses_approval_and_changes_nothing(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]], proxy: Proxy
) -> None:
    p = sandbox.patient(plain, 3)
    with services(fhir_base=proxy.fhir) as svc:
        svc.scan()
        c = svc.client(RPH1)
        ready = authorized(c, svc.draft_of(p, c))
        key = svc.request_key(ready["id"])
        errors = set()
        read_faults: tuple[Fault, ...] = ("500", "garbage", "drop")
        for fault in read_faults:
            proxy.reads.chart_faults[p.patient_id] = fault
            refused = error(approve(c, ready), 503)
            assert "re-check" in refused["message"]
            after = get(c, ready["id"])
            assert (after["status"], after["version"]) == ("pending", ready["version"])
            assert after["lastError"] and "re-check" in after["lastError"]
            errors.add(after["lastError"])
            assert proxy.writes.transactions == 0
        assert len(errors) == 3  # each failure is recorded as it was
        proxy.heal()

        proxy.stop()  # the EHR is down
        error(approve(c, ready), 503)
        down = get(c, ready["id"])
        assert (down["status"], down["version"]) == ("pending", ready["version"])
        assert "unreachable" in down["lastError"]
        proxy.start()

        approved = approve(c, ready)
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "written"
        one_written(sandbox, key, approved.json()["writtenReference"])
        trail = [a["action"] for a in c.get(f"/api/refills/{ready['id']}/audit").json()["audit"]]
        assert trail.count("check-failed") == 4 and trail[-2:] == ["approved", "written"]


def test_a_transaction_refused_or_whose_answer_was_lost_is_write_failed_and_written_once_on_retry(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]], proxy: Proxy
) -> None:
    """``500``: the EHR refused the transaction (nothing written). ``lost-*``: it landed, but the answer
    never came back (a gateway timeout, a cut connection): the retry finds it and sends nothing."""
    faults: tuple[WriteFault, ...] = ("500", "lost-504", "lost-drop")
    patients = sandbox.patients(plain, 3)
    with services(fhir_base=proxy.fhir) as svc:
        svc.scan()
        c = svc.client(RPH1)
        for fault, p in zip(faults, patients, strict=True):
            ready = authorized(c, svc.draft_of(p, c))
            key = svc.request_key(ready["id"])
            sent, forwarded = proxy.writes.transactions, proxy.writes.forwarded
            proxy.writes.fault = fault
            failed = error(approve(c, ready), 502)
            assert failed["draft"]["status"] == "write-failed"
            after = get(c, ready["id"])
            assert after["status"] == "write-failed" and after["lastError"], fault
            assert after["decidedBy"] == f"PractitionerRole/{RPH1}" and after["writtenReference"] is None
            landed = sandbox.written(key)
            if fault == "500":
                assert "500" in after["lastError"]
                assert landed == [] and proxy.writes.forwarded == forwarded
            else:
                assert len(landed) == 1 and proxy.writes.forwarded == forwarded + 1  # on the server all the same
            assert proxy.writes.transactions == sent + 1

            proxy.heal()
            retried = approve(c, ready)
            assert retried.status_code == 200, retried.text
            assert retried.json()["status"] == "written"
            reference = retried.json()["writtenReference"]
            one_written(sandbox, key, reference)
            if fault == "500":
                assert proxy.writes.transactions == sent + 2
            else:
                assert reference == f"MedicationRequest/{landed[0]['id']}"
                assert proxy.writes.transactions == sent + 1  # the retry found it and sent nothing


# --- 6. the chart changed after the pharmacist looked ------------------------------------------------------


def test_approval_rechecks_the_chart_and_refuses_when_the_checks_changed(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p = sandbox.patient(frp_tested)
    with services() as svc:
        svc.scan()
        c = svc.client(RPH1)
        draft = svc.draft_of(p, c)
        assert "pregnancy-test-positive" not in check_codes(draft)
        ready = authorized(c, draft)
        assert ready["blockingCodes"] == [], ready["blockingCodes"]
        key = svc.request_key(ready["id"])

        sandbox.put(positive_test(p))
        changed = error(approve(c, ready), 409)
        assert "pre-checks changed" in changed["message"]
        assert "pregnancy-test-positive" in changed["draft"]["blockingCodes"]
        now = get(c, ready["id"])
        assert now["status"] == "pending" and now["version"] == ready["version"] + 1
        assert "pregnancy-test-positive" in check_codes(now) and now["blocking"] >= 1

        refused = error(approve(c, now), 422)
        assert "pregnancy-test-positive" in refused["blocking"]
        assert get(c, ready["id"])["status"] == "pending"
        assert sandbox.written(key) == []


# --- 7. rejection ------------------------------------------------------------------------------------------


def test_reject_needs_a_reason_and_a_decided_draft_cannot_be_changed(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p, q = sandbox.patients(plain, 2)
    with services() as svc:
        svc.scan()
        c = svc.client(RPH1)
        draft = svc.draft_of(p, c)
        rejected = c.post(
            f"/api/refills/{draft['id']}/reject",
            json={"version": draft["version"], "reason": "  Therapy stopped by the oncologist  "},
        )
        assert rejected.status_code == 200, rejected.text
        body = rejected.json()
        assert body["status"] == "rejected" and body["decisionReason"] == "Therapy stopped by the oncologist"
        assert body["decidedBy"] == f"PractitionerRole/{RPH1}" and body["version"] == draft["version"] + 1
        assert get(c, draft["id"])["decisionReason"] == "Therapy stopped by the oncologist"

        late = error(patch(c, body, note="too late"), 409)
        assert "rejected" in late["message"]
        other = svc.client(RPH2)
        too_late = error(approve(other, draft), 409)
        assert f"PractitionerRole/{RPH1}" in too_late["message"]
        trail = [a["action"] for a in c.get(f"/api/refills/{draft['id']}/audit").json()["audit"]]
        assert trail == ["created", "rejected"]

        pending = svc.draft_of(q, c)
        for payload in ({"version": pending["version"]}, {"version": pending["version"], "reason": "   "}):
            missing = error(c.post(f"/api/refills/{pending['id']}/reject", json=payload), 422)
            assert missing["field"] == "reason"
        assert get(c, pending["id"])["status"] == "pending"


# --- 8. bad input ------------------------------------------------------------------------------------------


def test_malformed_and_out_of_range_input_is_refused_naming_the_field(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p = sandbox.patient(lambda p: plain(p) and p.drug.value == "lenalidomide", 1)
    with services() as svc:
        svc.scan()
        c = svc.client(RPH1)
        draft = svc.draft_of(p, c)
        url = f"/api/refills/{draft['id']}"
        v = draft["version"]
        json_headers = {"Content-Type": "application/json"}

        error(c.patch(url, content=b'{"version": 1, "note": ', headers=json_headers), 400)
        error(c.post(f"{url}/approve", content=b"{not json}", headers=json_headers), 400)
        error(c.patch(url, json=[{"version": v}]), 400)
        error(c.post(f"{url}/approve", json=[v]), 400)
        assert error(c.patch(url, json={"version": v, "dose": 5}), 422)["field"] == "dose"
        error(c.patch(url, json={"version": v, "note": "x" * 25_000}), 413)
        assert error(c.patch(url, json={"note": "no version"}), 422)["field"] == "version"
        assert error(c.post(f"{url}/approve", json={}), 422)["field"] == "version"
        assert error(c.patch(url, json={"version": "1", "note": "x"}), 422)["field"] == "version"
        assert error(c.patch(url, json={"version": v, "supplyDays": 29}), 422)["field"] == "supplyDays"
        assert error(c.patch(url, json={"version": v, "supplyDays": 0}), 422)["field"] == "supplyDays"
        dose = error(c.patch(url, json={"version": v, "doseMg": 7}), 422)
        assert dose["field"] == "doseMg"
        assert dose["message"].endswith("(2.5, 5, 10, 15, 20, 25)")  # lenalidomide's capsule strengths
        assert error(c.patch(url, json={"version": v}), 422)["field"] == "(body)"
        status = error(c.get("/api/refills", params={"status": "maybe"}), 422)
        assert status["field"] == "status"
        assert c.get("/api/refills/no-such-draft").status_code == 404
        unchanged = get(c, draft["id"])
        assert unchanged["version"] == v and unchanged["medicationRequest"] == draft["medicationRequest"]

        newer = edited(c, draft, doseMg=5)
        assert newer["version"] == v + 1
        stale = error(patch(c, draft, note="based on what I saw before"), 409)
        assert f"version {v + 1}" in stale["message"]
        error(approve(c, draft), 409)
        assert get(c, draft["id"])["version"] == v + 1


# --- 9. rescans and the periodic retry ---------------------------------------------------------------------


def test_a_pharmacists_edit_survives_a_rescan_whose_checks_are_recomputed(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]]
) -> None:
    p = sandbox.patient(frp_tested)
    with services() as svc:
        svc.scan()
        c = svc.client(RPH1)
        draft = svc.draft_of(p, c)
        mine = edited(c, authorized(c, draft), supplyDays=21, note="Pharmacist: split fill")
        assert "pregnancy-test-positive" not in check_codes(mine)

        sandbox.put(positive_test(p))
        report = svc.scan()
        assert report.rechecked >= 1
        after = get(c, draft["id"])
        assert after["status"] == "pending"
        assert after["medicationRequest"] == mine["medicationRequest"]  # the pharmacist's edit is kept
        assert after["authorizationNumber"] == mine["authorizationNumber"]
        assert "pregnancy-test-positive" in after["blockingCodes"]  # ... checked against today's chart
        assert after["version"] > mine["version"]

        unchanged = svc.scan()
        assert get(c, draft["id"])["version"] == after["version"]
        assert unchanged.rechecked == 0


def test_the_periodic_run_writes_an_approval_whose_write_failed_once_the_ehr_is_back(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]], proxy: Proxy
) -> None:
    p = sandbox.patient(plain, 6)
    with services(fhir_base=proxy.fhir) as svc:
        svc.scan()
        c = svc.client(RPH1)
        ready = authorized(c, svc.draft_of(p, c))
        key = svc.request_key(ready["id"])
        proxy.writes.fault = "500"
        error(approve(c, ready), 502)
        assert svc.retry_writes() == 0  # still failing: left write-failed
        assert get(c, ready["id"])["status"] == "write-failed"

        proxy.heal()
        assert svc.run_once() is True
        after = get(c, ready["id"])
        assert after["status"] == "written" and after["decidedBy"] == f"PractitionerRole/{RPH1}"
        one_written(sandbox, key, after["writtenReference"])
        trail = c.get(f"/api/refills/{ready['id']}/audit").json()["audit"]
        assert (trail[-1]["action"], trail[-1]["actor"]) == ("written", store.SCAN_ACTOR)
        assert svc.retry_writes() == 0  # nothing left to write: written once
        one_written(sandbox, key, after["writtenReference"])


# --- a write in flight ------------------------------------------------------------------------------------


def test_a_second_approval_while_the_first_write_is_in_flight_is_told_who_decided_and_writes_nothing(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]], proxy: Proxy
) -> None:
    """Module docstring of `cds_hooks.refill_review`, step 2: of two pharmacists approving, the other is told
    who did (409), also when the winner's transaction is still on its way to the EHR."""
    p = sandbox.patient(plain, 7)
    with services(fhir_base=proxy.fhir) as svc:
        svc.scan()
        first, second = svc.client(RPH1), svc.client(RPH2)
        ready = authorized(first, svc.draft_of(p, first))
        key = svc.request_key(ready["id"])
        get(second, ready["id"])
        proxy.writes.delay_s = 1.0
        with ThreadPoolExecutor(1) as pool:
            winner = pool.submit(approve, first, ready)
            _wait_for(lambda: get(second, ready["id"])["status"] == "approved")
            late = approve(second, ready)
            won = winner.result()
        assert won.status_code == 200, won.text
        assert f"PractitionerRole/{RPH1}" in error(late, 409)["message"]
        one_written(sandbox, key, won.json()["writtenReference"])
        assert proxy.writes.transactions == 1


@pytest.mark.parametrize("second", ["periodic-retry", "same-pharmacist-again"])
def test_an_approval_whose_write_is_in_flight_is_not_written_a_second_time(
    sandbox: Sandbox, services: Callable[..., AbstractContextManager[Service]], proxy: Proxy, second: str
) -> None:
    """While the approving request's transaction is on its way (the draft is ``approved``), the periodic
    retry (`ReviewService.retry_writes` takes every ``approved`` draft) or the same pharmacist clicking
    Approve again must not send the transaction again: the conditional create keeps the MedicationRequest
    single, but the Provenance in the same transaction is created twice."""
    p = sandbox.patient(plain, 8)
    with services(fhir_base=proxy.fhir) as svc:
        svc.scan()
        c = svc.client(RPH1)
        ready = authorized(c, svc.draft_of(p, c))
        key = svc.request_key(ready["id"])
        proxy.writes.delay_s = 1.0
        with ThreadPoolExecutor(1) as pool:
            approval = pool.submit(approve, c, ready)
            _wait_for(lambda: get(c, ready["id"])["status"] == "approved")
            if second == "periodic-retry":
                svc.retry_writes()
            else:
                approve(c, ready)
            done = approval.result()
        assert done.status_code == 200, done.text
        one_written(sandbox, key, done.json()["writtenReference"])
        assert proxy.writes.transactions == 1


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
