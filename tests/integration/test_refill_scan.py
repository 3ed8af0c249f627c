"""The refill scan (`cds_hooks.refill_scan`) against the real sandbox stack: the seeded population on the
FHIR engine, behind the sandbox's SMART authorization server and FHIR gateway, read with a SMART Backend
Services token (``system/*.rs``), drafts stored on SQLite and on PostgreSQL (`engine` fixture).

What it must do (the manifest of `sandbox.seed` says what each patient needs):

- draft exactly the planned refills (one per patient due within the 10-day horizon, continuing the active
  order), with the planned rule findings, and change nothing when run again;
- make one draft per order when two replicas scan at once;
- leave drafts exactly as they were when their charts cannot be fetched (5xx, garbage, a Bundle whose
  ``entry`` is not a list, a server slower than the client's timeout, a dropped connection), record the
  error on them, and clear it on the next good scan; withdraw nothing when the order listing fails;
- report a chart it cannot read with the field, and draft the others;
- withdraw a pending draft once its order is no longer the patient's active one.

One FHIR engine, sandbox app and fault proxy (`tests.support.fault_proxy`) for the module; every test has
its own database. Tests that need drafts to exist first store them straight from the seeded charts
(`cds_hooks.refills.plan_patient`, no server), which the first test proves is what the scan makes. Tests
that change the server put it back as it was.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from cds_hooks import refill_store as store
from cds_hooks.backend_auth import BackendAuth, BackendCredentials
from cds_hooks.fhir_client import FhirClient
from cds_hooks.refill_scan import RefillScanner, ScanOptions, ScanReport
from cds_hooks.refill_store import Check, Draft, find_draft
from cds_hooks.refills import PatientChart, Planned, plan_patient
from rems.config import default_config
from rems.findings import RULES
from sandbox.app import BACKEND_CLIENT_ID, backend_key, create_sandbox_app
from sandbox.app import default_config as sandbox_config
from sandbox.fhir_engine import FHIR_JSON, start_fhir_server
from sandbox.seed import PatientPlan, generate, plan, write
from tests.support.cds_server import free_port, serve_app
from tests.support.fault_proxy import Fault, FaultProxy
from tests.support.seed_charts import CHART_KEYS, Charts, charts_of, searchset
from tests.support.threads import all_at_once

Json = dict[str, Any]

TODAY = date(2026, 11, 21)
ZONE_NAME = "America/New_York"
ZONE = ZoneInfo(ZONE_NAME)
NOW = datetime.combine(TODAY, time(10, 0), ZONE)
SEED = 1
PATIENTS = 120
HORIZON = 10
DUE = 82
"""Patients of the population with at most `HORIZON` days left (the seed's manifest says so; checked below)."""

HARD_STOPS = frozenset(code.value for code, info in RULES.items() if info.hard_stop)
NOT_RULES = ("earliest-dispense", "pregnancy-test-plan", "chart-unreadable")

HELD_TIMEOUT_S = 1.0
"""The scanning client's read timeout for the requests the proxy holds (``slow``: 5 s). The others keep a
generous one, so a loaded test machine cannot make a good batch time out."""
BATCH = 10
"""Patients per chart batch in the fault tests (12 batches: faulty ones and good ones)."""


@dataclass
class Stack:
    engine_base: str
    """The FHIR engine itself (open: for the tests' own writes)."""
    gateway: str
    """The sandbox's FHIR base, behind SMART (``…/fhir``)."""
    proxied: str
    """The same FHIR base through the fault proxy."""
    proxy: FaultProxy
    credentials: BackendCredentials
    plans: list[PatientPlan]
    charts: Charts
    _planned: list[Planned] | None = None

    @property
    def due(self) -> dict[tuple[str, str], PatientPlan]:
        """(patient id, order being continued) → plan, for the patients the scan must draft for."""
        return {(p.patient_id, f"MedicationRequest/{p.active_order}"): p for p in self.plans if p.days_left <= HORIZON}

    def chart(self, patient_id: str) -> PatientChart:
        """The patient's chart as the scan reads it from the server, built from the generated data."""
        c = self.charts.by_patient[patient_id]
        prefetch = {key: as_served(searchset(c[rtype])) for rtype, key in CHART_KEYS.items()}
        return PatientChart(as_served(c["Patient"][0]), prefetch, tuple(as_served(a) for a in c["Appointment"]))

    def planned(self) -> list[Planned]:
        """What the scan drafts at `NOW`, worked out from the seeded charts once for the module."""
        if self._planned is None:
            self._planned = [
                planned
                for p in self.plans
                for planned in plan_patient(self.chart(p.patient_id), now=NOW, zone=ZONE, horizon_days=HORIZON).planned
            ]
        return self._planned

    def put(self, resource: Json) -> None:
        url = f"{self.engine_base}/{resource['resourceType']}/{resource['id']}"
        response = httpx.put(url, json=resource, headers={"Content-Type": FHIR_JSON}, timeout=30.0)
        assert response.status_code in (200, 201), response.text

    def delete(self, resource_type: str, rid: str) -> None:
        response = httpx.delete(f"{self.engine_base}/{resource_type}/{rid}", timeout=30.0)
        assert response.status_code in (200, 204), response.text

    def order(self, p: PatientPlan) -> Json:
        found = [r for r in self.charts.of(p.patient_id, "MedicationRequest") if r["id"] == p.active_order]
        assert len(found) == 1
        return copy.deepcopy(found[0])


def as_served(resource: Json) -> Json:
    """`resource` as the engine serves it back: JSON numbers the way JavaScript writes them (``17.0`` is
    ``17``). The checks quote lab values as the chart has them, so this matters for "unchanged"."""

    def number(text: str) -> float | int:
        value = float(text)
        return int(value) if value.is_integer() else value

    loaded: Json = json.loads(json.dumps(resource), parse_float=number)
    return loaded


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("refill-scan")
    bundles = list(generate(PATIENTS, SEED, TODAY, ZONE_NAME))
    write(work / "seed", bundles)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with start_fhir_server(load=[work / "seed"]) as fhir:
        config = sandbox_config(
            base_url=base, fhir_upstream=fhir.base, service_base="http://127.0.0.1:9", state_dir=work / "state"
        )
        with serve_app(create_sandbox_app(config), port):
            proxy = FaultProxy(base, slow_s=5 * HELD_TIMEOUT_S)
            with serve_app(proxy) as proxied:
                key = backend_key(work / "state")
                credentials = BackendCredentials(BACKEND_CLIENT_ID, key.private_key, key.kid, key.alg, "system/*.rs")
                yield Stack(
                    fhir.base,
                    f"{base}/fhir",
                    f"{proxied}/fhir",
                    proxy,
                    credentials,
                    plan(PATIENTS, SEED, TODAY),
                    charts_of(bundles),
                )


@pytest.fixture
def proxy(stack: Stack) -> Iterator[FaultProxy]:
    stack.proxy.clear()
    yield stack.proxy
    stack.proxy.clear()


def scan(
    stack: Stack,
    engine: Engine,
    *,
    base: str | None = None,
    options: ScanOptions | None = None,
    authenticated: bool = True,
) -> ScanReport:
    """One scan at `NOW` (on the gateway unless `base`), with a Backend Services token."""
    fhir_base = base or stack.gateway

    async def held_briefly(request: httpx.Request) -> None:
        if stack.proxy.holds(request.url.path, request.url.query.decode()):
            request.extensions["timeout"] = httpx.Timeout(30.0, read=HELD_TIMEOUT_S).as_dict()

    async def go() -> ScanReport:
        hooks = {"request": [held_briefly]}
        async with httpx.AsyncClient(trust_env=False, timeout=30.0, event_hooks=hooks) as http:
            auth = BackendAuth(fhir_base, stack.credentials, http) if authenticated else None
            scanner = RefillScanner(
                engine, FhirClient(fhir_base, http, auth), zone=ZONE, config=default_config(), options=options
            )
            return await scanner.scan(NOW)

    return asyncio.run(go())


def draft_in_process(stack: Stack, engine: Engine, patients: set[str] | None = None) -> int:
    """Store what the scan drafts, straight from the seeded charts (no server): the drafts a previous scan
    left. Returns how many."""
    stored = 0
    for planned in stack.planned():
        if patients is None or planned.draft.patient_id in patients:
            store.store_draft(engine, planned.draft, planned.checks, now=NOW)
            stored += 1
    return stored


def drafts(engine: Engine) -> dict[tuple[str, str], Draft]:
    all_drafts = store.worklist(engine, status=None, limit=10_000)
    keyed = {(d.patient_id, d.prior_order): d for d in all_drafts}
    assert len(keyed) == len(all_drafts), "two drafts for one (patient, order)"
    return keyed


def content(d: Draft) -> tuple[Any, ...]:
    """What a pharmacist reviews, and what bumps the version."""
    return (
        d.status,
        d.version,
        d.updated_at,
        d.medication_request,
        d.checks,
        d.days_left,
        d.runs_out,
        d.earliest_dispense,
        d.next_test_due,
        d.blocking,
    )


def rule_codes(checks: tuple[Check, ...]) -> set[str]:
    return {c.code for c in checks if not c.code.startswith("check-") and c.code not in NOT_RULES}


def expected_rules(p: PatientPlan) -> set[str]:
    """The order-sign findings of the manifest, for a draft: no requester yet (so no specialist check),
    and no authorization number until the pharmacist enters one."""
    return set(p.expected_rules) - {"prescriber-not-specialist"} | {"authorization-missing"}


def actions(engine: Engine, d: Draft) -> list[str]:
    return [a.action for a in store.audit_trail(engine, d.id)]


def listing_batches(stack: Stack, size: int) -> list[list[str]]:
    """The patients in the order the scan meets them (first active IMiD order of each, as the server lists
    them), cut into batches of `size`."""
    response = httpx.get(f"{stack.engine_base}/MedicationRequest?status=active&_count=1000", timeout=30.0)
    response.raise_for_status()
    order: list[str] = []
    for entry in response.json().get("entry", []):
        r = entry["resource"]
        pid = r["subject"]["reference"].removeprefix("Patient/")
        if "-rx" in r["id"] and pid not in order:  # the seed's IMiD orders are <patient>-rxNN
            order.append(pid)
    return [order[i : i + size] for i in range(0, len(order), size)]


def seen_batches(proxy: FaultProxy) -> list[list[str]]:
    """The patient batches whose charts the scan asked for (one ``Patient?_id=`` search each)."""
    out = []
    for kind, path, query in proxy.seen:
        if kind == "chart" and path.endswith("/Patient"):
            out.append(sorted(proxy.patients_named(path, query)))
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# The scan
# ------------------------------------------------------------------------------------------------


def test_the_scan_drafts_exactly_the_planned_refills_and_a_rescan_changes_nothing(stack: Stack, engine: Engine) -> None:
    due = stack.due
    assert len(due) == DUE
    report = scan(stack, engine)
    assert report.error is None and report.failures == []
    assert (report.patients, report.active_orders, report.pages) == (PATIENTS, PATIENTS, 1)
    assert (report.created, report.rechecked, report.unchanged) == (DUE, 0, 0)
    assert (report.not_due, report.withdrawn) == (PATIENTS - DUE, 0)
    assert report.as_json()["notDue"] == PATIENTS - DUE and report.as_json()["failed"] == 0

    first = drafts(engine)
    assert set(first) == set(due)
    wrong = []
    for key, d in first.items():
        p = due[key]
        want = expected_rules(p)
        if rule_codes(d.checks) != want:
            wrong.append((p.patient_id, p.problems, sorted(rule_codes(d.checks) ^ want)))
        assert (d.status, d.version, d.drug, d.last_error) == ("pending", 1, p.drug.value, None), key
        assert (d.days_left, d.runs_out) == (p.days_left, p.runs_out), key
        assert d.earliest_dispense == max(TODAY, p.runs_out - timedelta(days=7)), key
        assert d.blocking == len(want & HARD_STOPS) == sum(c.blocking for c in d.checks), key
        assert {c.code for c in d.checks if c.blocking} == want & HARD_STOPS, key
        assert (d.next_test_due is None) == (not p.category.can_get_pregnant), key
        mr = d.medication_request
        assert (mr["status"], mr["intent"], mr["priorPrescription"]) == ("draft", "order", {"reference": key[1]})
        assert mr["subject"] == {"reference": f"Patient/{p.patient_id}"}
        assert mr["dispenseRequest"]["numberOfRepeatsAllowed"] == 0
        assert d.authorization_number is None
        assert actions(engine, d) == ["created"]
    assert wrong == []

    again = scan(stack, engine)
    assert again.error is None and again.failures == []
    assert (again.created, again.rechecked, again.unchanged, again.not_due, again.withdrawn) == (
        0,
        0,
        DUE,
        PATIENTS - DUE,
        0,
    )
    second = drafts(engine)
    assert {k: content(d) for k, d in second.items()} == {k: content(d) for k, d in first.items()}
    assert all(actions(engine, d) == ["created"] for d in second.values())


def test_the_scan_needs_the_backend_token(stack: Stack, engine: Engine) -> None:
    report = scan(stack, engine, authenticated=False)
    assert report.error is not None
    assert report.error.startswith("listing active orders: FHIR server answered 401 on GET /fhir/MedicationRequest?…")
    assert (report.patients, report.created, report.withdrawn) == (0, 0, 0)
    assert drafts(engine) == {}


def test_two_replicas_scanning_at_once_make_one_draft_per_order(
    stack: Stack, engine: Engine, engines: Callable[[], Engine]
) -> None:
    replicas = [engine, engines()]
    reports = all_at_once(2, lambda i: scan(stack, replicas[i]))
    assert [r.error for r in reports] == [None, None]
    assert [r.failures for r in reports] == [[], []]
    assert sum(r.created for r in reports) == DUE  # each draft created once ...
    assert sum(r.unchanged for r in reports) == DUE  # ... and found as it was by the other replica
    assert sum(r.rechecked + r.withdrawn for r in reports) == 0
    stored = drafts(engine)
    assert set(stored) == set(stack.due)
    assert all(d.version == 1 and actions(engine, d) == ["created"] for d in stored.values())


# ------------------------------------------------------------------------------------------------
# Faults
# ------------------------------------------------------------------------------------------------

REASONS: dict[Fault, str] = {
    "500": r"FHIR server answered 500 on GET /fhir/\w+\?…: injected failure",
    "garbage": r"FHIR server answered something that is not JSON on GET /fhir/\w+\?…",
    "entry-not-list": r"FHIR Bundle\.entry is not a list on GET /fhir/\w+\?…",
    "slow": r"FHIR server timed out on GET /fhir/\w+\?…",
    "drop": r"FHIR server unreachable \(RemoteProtocolError\) on GET /fhir/\w+\?…",
}


def test_charts_that_cannot_be_fetched_leave_their_drafts_as_they_were(
    stack: Stack, engine: Engine, proxy: FaultProxy
) -> None:
    assert draft_in_process(stack, engine) == DUE
    before = drafts(engine)
    batches = listing_batches(stack, BATCH)
    assert len(batches) == PATIENTS // BATCH
    faulty: dict[str, Fault] = {}  # patient → the fault their whole batch meets
    for batch, fault in zip(batches[1::2], REASONS, strict=False):
        proxy.chart_faults[batch[0]] = fault
        faulty.update(dict.fromkeys(batch, fault))
    assert set(faulty.values()) == set(REASONS)

    options = ScanOptions(batch_size=BATCH)
    report = scan(stack, engine, base=stack.proxied, options=options)
    assert seen_batches(proxy) == sorted(sorted(b) for b in batches)  # the batches were the ones assumed
    assert report.error is None
    assert sorted(pid for pid, _ in report.failures) == sorted(faulty)
    for pid, reason in report.failures:
        assert re.fullmatch(f"chart fetch failed: {REASONS[faulty[pid]]}", reason), (faulty[pid], reason)
        assert "sb-p" not in reason  # patient ids stay out of messages
    reasons = dict(report.failures)
    affected = {k for k in before if k[0] in faulty}
    assert affected  # some of the failing patients had a pending draft
    assert (report.created, report.rechecked, report.withdrawn) == (0, 0, 0)
    assert report.unchanged == DUE - len(affected)

    after = drafts(engine)
    assert {k: content(d) for k, d in after.items()} == {k: content(d) for k, d in before.items()}
    for key, d in after.items():
        if key in affected:
            assert d.last_error == reasons[key[0]], key
            trail = store.audit_trail(engine, d.id)
            assert [a.action for a in trail] == ["created", "check-failed"]
            assert (trail[-1].actor, trail[-1].after) == ("system:scan", {"last_error": reasons[key[0]]})
        else:
            assert d.last_error is None, key
            assert actions(engine, d) == ["created"]

    proxy.clear()  # the server is well again
    recovered = scan(stack, engine, base=stack.proxied)
    assert (recovered.error, recovered.failures) == (None, [])
    assert (recovered.created, recovered.rechecked, recovered.unchanged) == (0, 0, DUE)
    final = drafts(engine)
    assert {k: content(d) for k, d in final.items()} == {k: content(d) for k, d in before.items()}
    assert [k for k, d in final.items() if d.last_error is not None] == []
    assert all(
        actions(engine, d) == (["created", "check-failed"] if k in affected else ["created"]) for k, d in final.items()
    )


def test_a_failed_order_listing_stops_the_scan_and_withdraws_nothing(
    stack: Stack, engine: Engine, proxy: FaultProxy
) -> None:
    assert draft_in_process(stack, engine) == DUE
    before = drafts(engine)

    # The server refuses connections.
    refused = scan(stack, engine, base=f"http://127.0.0.1:{free_port()}/fhir", authenticated=False)
    assert (
        refused.error
        == "listing active orders: FHIR server unreachable (ConnectError) on GET /fhir/MedicationRequest?…"
    )
    assert (refused.patients, refused.withdrawn) == (0, 0)

    # The second page of the listing answers 500, after the first page's patients were checked.
    proxy.listing_fault = "500"
    proxy.listing_pages_from = 2
    paged = ScanOptions(page_size=40, batch_size=BATCH)
    report = scan(stack, engine, base=stack.proxied, options=paged)
    assert report.error == (
        "listing active orders: FHIR server answered 500 on GET /fhir/MedicationRequest?…: injected failure"
    )
    assert report.pages == 1 and 0 < report.patients < PATIENTS
    assert report.failures == [] and report.withdrawn == 0
    assert report.unchanged > 0
    after = drafts(engine)
    assert {k: content(d) for k, d in after.items()} == {k: content(d) for k, d in before.items()}
    assert all(d.status == "pending" and actions(engine, d) == ["created"] for d in after.values())


def test_the_next_scan_follows_changed_charts(stack: Stack, engine: Engine) -> None:
    """Since the last scan: one patient's order was stopped, one was renewed by the prescriber (the old one
    completed, the renewal active and not dispensed yet), one chart got a malformed Observation."""
    assert draft_in_process(stack, engine) == DUE
    before = drafts(engine)
    due = sorted(stack.due.values(), key=lambda p: p.patient_id)
    stopped_p, renewed_p, broken_p = due[0], due[1], next(p for p in due[2:] if p.clean)
    originals = [stack.order(stopped_p), stack.order(renewed_p)]
    stopped, old, renewal = stack.order(stopped_p), stack.order(renewed_p), stack.order(renewed_p)
    stopped["status"] = "stopped"
    old["status"] = "completed"
    renewal.update(
        id=f"{renewed_p.active_order}-renewal",
        authoredOn=NOW.replace(hour=9).isoformat(),
        priorPrescription={"reference": f"MedicationRequest/{renewed_p.active_order}"},
    )
    bad: Json = {
        "resourceType": "Observation",
        "id": f"{broken_p.patient_id}-scan-test-bad-anc",
        "status": "final",
        "subject": {"reference": f"Patient/{broken_p.patient_id}"},
        "code": {"coding": [{"system": "http://loinc.org", "code": "751-8"}]},
        "effectiveDateTime": "2026-11-20T10:00:00",  # a time without a UTC offset: the engine stores it as is
        "valueQuantity": {"value": 2.1, "unit": "10*3/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"},
    }
    for resource in (stopped, old, renewal, bad):
        stack.put(resource)
    try:
        report = scan(stack, engine)
    finally:
        stack.delete("MedicationRequest", renewal["id"])
        stack.delete("Observation", bad["id"])
        for resource in originals:
            stack.put(resource)

    assert report.error is None
    assert report.patients == PATIENTS - 1  # the stopped patient has no active IMiD order left
    assert [pid for pid, _ in report.failures] == [broken_p.patient_id]
    reason = report.failures[0][1]
    assert re.fullmatch(
        r"chart could not be read: chart\.observations\.entry\[\d+\]\.resource\.effectiveDateTime: .+", reason
    ), reason
    assert (report.withdrawn, report.created, report.rechecked) == (2, 0, 0)
    assert report.unchanged == DUE - 3
    assert report.not_due == PATIENTS - DUE + 1  # the renewal is the next fill: not drafted again

    after = drafts(engine)
    assert set(after) == set(stack.due)  # nothing drafted for the renewal
    withdrawn = {
        stopped_p.patient_id: "the patient has no active IMiD order",
        renewed_p.patient_id: f"MedicationRequest/{renewed_p.active_order} is no longer the active order",
    }
    for key, d in after.items():
        if key[0] in withdrawn:
            assert (d.status, d.version, d.decided_by, d.decided_at, d.decision_reason) == (
                "rejected",
                2,
                "system:scan",
                NOW,
                withdrawn[key[0]],
            )
            trail = store.audit_trail(engine, d.id)
            assert [a.action for a in trail] == ["created", "withdrawn"]
            assert (trail[-1].actor, trail[-1].note) == ("system:scan", withdrawn[key[0]])
        elif key[0] == broken_p.patient_id:
            assert content(d) == content(before[key])  # left as it was, with the error
            assert d.last_error == reason
            assert actions(engine, d) == ["created", "check-failed"]
        else:
            assert content(d) == content(before[key]), key
            assert actions(engine, d) == ["created"]


class MemoryScanner(RefillScanner):
    """The scan with the charts served from memory: for what happens after the fetch (storing, counting)."""

    def __init__(self, engine: Engine, charts: dict[str, PatientChart], options: ScanOptions) -> None:
        listing = [
            order
            for chart in charts.values()
            for entry in chart.prefetch["medications"]["entry"]
            if (order := entry["resource"])["status"] == "active"
        ]

        def answer(request: httpx.Request) -> httpx.Response:
            assert request.url.path == "/fhir/MedicationRequest", request.url
            return httpx.Response(200, json=searchset(listing))

        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        super().__init__(
            engine, FhirClient("http://fhir.test/fhir", http, None), zone=ZONE, config=default_config(), options=options
        )
        self.charts = charts

    async def fetch_charts(self, ids: list[str], now: datetime) -> dict[str, PatientChart]:
        await asyncio.sleep(0)
        return {pid: self.charts[pid] for pid in ids}


def test_withdrawals_in_concurrent_batches_are_all_counted(stack: Stack, engine: Engine) -> None:
    """Every due patient's order was renewed since the last scan: each batch withdraws its patients' drafts
    while the other batches store theirs. The report must count every withdrawal."""
    assert draft_in_process(stack, engine) == DUE
    charts: dict[str, PatientChart] = {}
    for p in stack.plans:
        chart = stack.chart(p.patient_id)
        if p.days_left <= HORIZON:
            orders = [e["resource"] for e in chart.prefetch["medications"]["entry"]]
            old = next(o for o in orders if o["id"] == p.active_order)
            renewal = {
                **copy.deepcopy(old),
                "id": f"{p.active_order}-renewal",
                "authoredOn": NOW.replace(hour=9).isoformat(),
                "priorPrescription": {"reference": f"MedicationRequest/{p.active_order}"},
            }
            old["status"] = "completed"
            chart.prefetch["medications"]["entry"].append({"resource": renewal})
        charts[p.patient_id] = chart

    async def go() -> ScanReport:
        scanner = MemoryScanner(engine, charts, ScanOptions(batch_size=5, concurrency=4))
        async with scanner.fhir.http:
            return await scanner.scan(NOW)

    report = asyncio.run(go())
    assert (report.error, report.failures, report.created) == (None, [], 0)
    assert report.not_due == PATIENTS  # every renewal is the next fill, the others have days left
    rejected = [d for d in drafts(engine).values() if d.status == "rejected"]
    assert len(rejected) == DUE
    assert report.withdrawn == DUE


def memory_charts(stack: Stack) -> dict[str, PatientChart]:
    return {p.patient_id: stack.chart(p.patient_id) for p in stack.plans}


def memory_scan(engine: Engine, charts: dict[str, PatientChart], options: ScanOptions) -> ScanReport:
    async def go() -> ScanReport:
        scanner = MemoryScanner(engine, charts, options)
        async with scanner.fhir.http:
            return await scanner.scan(NOW)

    return asyncio.run(go())


def test_a_draft_that_cannot_be_stored_is_reported_and_the_batch_goes_on(
    stack: Stack, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refuses one patient's draft (a lost connection, say): that patient is reported, and
    the other patients of its batch are still drafted. Nothing may pass silently."""
    victim = sorted(stack.due.values(), key=lambda p: p.patient_id)[3]
    real = store.store_draft

    def store_draft(engine: Engine, draft: store.NewDraft, checks: Any, **kw: Any) -> tuple[Draft, store.Outcome]:
        if draft.patient_id == victim.patient_id:
            raise OperationalError("INSERT INTO refill_draft …", {}, ConnectionError("server closed the connection"))
        return real(engine, draft, checks, **kw)

    monkeypatch.setattr(store, "store_draft", store_draft)
    report = memory_scan(engine, memory_charts(stack), ScanOptions(batch_size=PATIENTS))  # one batch
    summary = report.as_json()
    missing = set(stack.due) - set(drafts(engine))
    assert missing == {(victim.patient_id, f"MedicationRequest/{victim.active_order}")}, (len(missing), summary)
    assert report.created == DUE - 1
    assert victim.patient_id in {pid for pid, _ in report.failures} or report.error is not None, summary


def test_an_order_whose_supply_cannot_be_worked_out_is_reported(stack: Stack, engine: Engine) -> None:
    """refills: "A drug whose supply cannot be worked out is not drafted: the scan reports it (...) it never
    passes silently". Here no IMiD order of the patient states a supply and nothing was dispensed."""
    victim = sorted(stack.due.values(), key=lambda p: p.patient_id)[3]
    charts = memory_charts(stack)
    chart = charts[victim.patient_id]
    for entry in chart.prefetch["medications"]["entry"]:
        if "-rx" in entry["resource"]["id"]:  # every IMiD order of the patient, past ones too
            del entry["resource"]["dispenseRequest"]
            for dosage in entry["resource"].get("dosageInstruction", []):
                dosage.pop("timing", None)
                dosage.pop("doseAndRate", None)
                dosage["text"] = "Take as directed"
    chart.prefetch["dispenses"]["entry"].clear()
    report = memory_scan(engine, charts, ScanOptions())
    assert report.created == DUE - 1
    assert find_draft(engine, victim.patient_id, f"MedicationRequest/{victim.active_order}") is None
    reported = [reason for pid, reason in report.failures if pid == victim.patient_id]
    assert reported and "supply unknown" in reported[0], report.as_json()
