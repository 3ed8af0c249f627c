"""Prefetch fallback against a real FHIR R4 server (sandbox/fhir_server, Medplum's engine): whatever the EHR
did not prefetch, the service fetches from ``fhirServer`` with ``fhirAuthorization.access_token``.

Each scenario's prefetch (never its draft orders) is loaded into the FHIR server as a transaction of
``PUT Type/id`` entries, so ids and references stay as written. The same order-sign (order-select,
medication-refill) call then gets the same answer with the full prefetch, with part of it, and with
none. When the server refuses the token, is down, pages, or answers garbage, the answer is a 412 that
names the prefetch key and says what went wrong, never a 500 and never a silent empty answer.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from cds_hooks.services import BY_ID
from sandbox.fhir_engine import FHIR_JSON, FhirServer, post_bundle, start_fhir_server
from tests.support.cds_server import CdsServer, Clock, free_port, run_cds_server
from tests.support.fhir_load import (
    Scenario,
    chart_transaction,
    rule_codes,
    scenario,
    transaction,
    without_prefetch,
)

NY = "America/New_York"
TOKEN = "tok"  # noqa: S105 (a test value)
SERVICE = {
    "order-sign": "imid-rems-order-sign",
    "order-select": "imid-rems-order-select",
    "medication-refill": "imid-rems-medication-refill",
}
ALL_KEYS = list(BY_ID["imid-rems-order-sign"].prefetch)


def all_but(key: str) -> list[str]:
    return [k for k in ALL_KEYS if k != key]


EQUIVALENT = [
    "frp-test-8-days-stale",  # pregnancy tests (Observation search by code)
    "early-refill-frp-test-expires-before-dispensable-day",  # dispenses and tests
    "renal-lenalidomide-crcl-25",  # creatinine and body weight
    "adult-female-nrp-menopause-12-months-mismatch",  # conditions
    "thalidomide-adult-female-nrp-hysterectomy-clean",  # procedures: without them, a category mismatch
    "concurrent-imid-pomalidomide-while-lenalidomide-active",  # earlier MedicationRequests
    "epic-text-only-medication-note-rems-data",  # user is a Practitioner: PractitionerRole search
    "pregnancy-test-positive-newest",  # order-select
    "medication-refill-30-days-with-refill",  # medication-refill
    "lenalidomide-adult-male-ongoing-clean",
]
KNOWN_BUGS = {  # found by these tests, fixed: kept as regression tests
    "prescriber-family-medicine-not-specialist": (
        "context.userId is a PractitionerRole, so the practitionerRoles template "
        "PractitionerRole?practitioner={{userPractitionerId}} cannot be rendered: prefetch.fetch_missing sets "
        "the key to null and the prescriber's specialty is never read (prescriber-not-specialist lost)"
    ),
    "pomalidomide-adult-female-nrp-bilateral-oophorectomy-clean": (
        "the risk category is an Observation the draft names in supportingInformation, coded by text only; "
        "the observations template (LOINC codes) does not return it and the service reads only medicationReference "
        "targets, so fetched data gives a false risk-category-missing"
    ),
}
MEDICATION_BY_REFERENCE = "cerner-medication-reference-quantity-only"
PAGING = "thrombocytopenia-pomalidomide-platelets-20"


def medication_by_reference_only() -> Scenario:
    """The Cerner-shaped order with nothing but ``medicationReference.reference`` (no display) and two
    refills: only a read of the Medication tells that it is lenalidomide, so ``refills-not-allowed`` proves
    the Medication was read."""
    sc = scenario(MEDICATION_BY_REFERENCE)
    [entry] = sc.request["context"]["draftOrders"]["entry"]
    entry["resource"]["medicationReference"].pop("display")
    entry["resource"]["dispenseRequest"]["numberOfRepeatsAllowed"] = 2
    return Scenario(sc.name, sc.request, sc.description, sc.now, sc.timezone, ["refills-not-allowed"])


def extra_cbcs(patient_id: str, n: int) -> list[dict[str, Any]]:
    """`n` older, normal platelet counts: enough to push the chart's own results past the first page."""
    return [
        {
            "resourceType": "Observation",
            "id": f"obs-extra-plt-{i:03d}",
            "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": "777-3", "display": "Platelets"}]},
            "subject": {"reference": f"Patient/{patient_id}"},
            "effectiveDateTime": f"2026-{6 + i // 28:02d}-{1 + i % 28:02d}T08:00:00-04:00",
            "valueQuantity": {"value": 250, "unit": "K/uL", "system": "http://unitsofmeasure.org", "code": "10*3/uL"},
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirServer]:
    """One FHIR server for the module, holding every chart used here."""
    with start_fhir_server() as server:
        for name in [*EQUIVALENT, *KNOWN_BUGS, MEDICATION_BY_REFERENCE]:
            post_bundle(server.base, chart_transaction(scenario(name).request))
        paged = scenario(PAGING)
        post_bundle(server.base, transaction(extra_cbcs(paged.patient_id, 45)))  # first: they page first
        post_bundle(server.base, chart_transaction(paged.request))
        yield server


@pytest.fixture(scope="module")
def cds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CdsServer]:
    url = f"sqlite:///{tmp_path_factory.mktemp('cds-fallback') / 'service.sqlite'}"
    with run_cds_server(Clock(), database_url=url, cds_auth="off", clinic_tz=NY) as s:
        yield s


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0) as c:
        yield c


def post(http: httpx.Client, cds: CdsServer, sc: Scenario, body: dict[str, Any]) -> httpx.Response:
    cds.clock.now = sc.now
    return http.post(cds.url(f"/cds-services/{SERVICE[sc.hook]}"), json=body)


def ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def assert_412(response: httpx.Response, keys: list[str], *phrases: str) -> str:
    assert response.status_code == 412, response.text
    error = response.json()["error"]
    assert error["status"] == 412
    assert error["field"] in {f"prefetch.{k}" for k in keys}, error
    for phrase in phrases:
        assert phrase in error["message"], error["message"]
    return str(error["message"])


def comparable(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    return sorted((c["source"]["topic"]["code"], c["indicator"], c["summary"]) for c in result["cards"])


# --- same answer, fetched or prefetched --------------------------------------------------------------------


def check_fetched_equals_prefetched(http: httpx.Client, cds: CdsServer, fhir: FhirServer, sc: Scenario) -> None:
    prefetched = ok(post(http, cds, sc, sc.request))
    fetched = ok(post(http, cds, sc, without_prefetch(sc.request, fhir.base, token=TOKEN)))
    assert rule_codes(prefetched) == sc.codes, sc.description
    assert rule_codes(fetched) == sc.codes, sc.description
    assert comparable(fetched) == comparable(prefetched)


@pytest.mark.parametrize("name", EQUIVALENT)
def test_fetched_chart_gives_the_prefetched_answer(
    http: httpx.Client, cds: CdsServer, fhir: FhirServer, name: str
) -> None:
    check_fetched_equals_prefetched(http, cds, fhir, scenario(name))


@pytest.mark.parametrize("name", list(KNOWN_BUGS))
def test_fetched_chart_gives_the_prefetched_answer_fixed_bugs(
    http: httpx.Client, cds: CdsServer, fhir: FhirServer, name: str
) -> None:
    check_fetched_equals_prefetched(http, cds, fhir, scenario(name))


def test_medication_reference_is_read_from_the_fhir_server(
    http: httpx.Client, cds: CdsServer, fhir: FhirServer
) -> None:
    sc = medication_by_reference_only()
    assert ok(post(http, cds, sc, sc.request))["cards"]  # prefetched: the Medication is in `medications`
    check_fetched_equals_prefetched(http, cds, fhir, sc)
    # Control: with the Medication neither prefetched nor on the server, the order cannot be identified.
    elsewhere = without_prefetch(sc.request, fhir.base, token=TOKEN)
    elsewhere["context"]["draftOrders"]["entry"][0]["resource"]["medicationReference"]["reference"] = (
        "Medication/not-on-the-server"
    )
    assert post(http, cds, sc, elsewhere).status_code == 412


@pytest.mark.parametrize(
    "keep",
    [
        ["patient", "medications"],
        ["patient", "observations", "practitionerRoles"],
        all_but("observations"),
    ],
    ids=["patient+medications", "patient+observations", "all-but-observations"],
)
def test_partial_prefetch_fetches_the_rest(
    http: httpx.Client, cds: CdsServer, fhir: FhirServer, keep: list[str]
) -> None:
    sc = scenario("early-refill-frp-test-expires-before-dispensable-day")
    full = ok(post(http, cds, sc, sc.request))
    partial = ok(post(http, cds, sc, without_prefetch(sc.request, fhir.base, token=TOKEN, keep=keep)))
    assert rule_codes(partial) == rule_codes(full) == sc.codes
    assert comparable(partial) == comparable(full)


def test_null_prefetch_is_not_fetched(http: httpx.Client, cds: CdsServer, fhir: FhirServer) -> None:
    """``null`` means "no data": the service must not fetch it. (The server holds the hysterectomy that
    makes this patient one who cannot get pregnant; without it the category no longer fits.)"""
    sc = scenario("thalidomide-adult-female-nrp-hysterectomy-clean")
    body = without_prefetch(sc.request, fhir.base, token=TOKEN, keep=["patient"])
    body["prefetch"]["procedures"] = None
    body["prefetch"]["conditions"] = None
    assert sc.codes == []
    assert rule_codes(ok(post(http, cds, sc, body))) == ["risk-category-mismatch"]


def test_next_links_are_followed(http: httpx.Client, cds: CdsServer, fhir: FhirServer) -> None:
    sc = scenario(PAGING)
    query = BY_ID["imid-rems-order-sign"].prefetch["observations"].replace("{{context.patientId}}", sc.patient_id)
    first = httpx.get(f"{fhir.base}/{query}", headers={"Accept": FHIR_JSON}).json()
    page_ids = {e["resource"]["id"] for e in first["entry"]}
    assert len(page_ids) == 20 and any(link["relation"] == "next" for link in first["link"])
    assert "obs-plt-b5b7ecd4" not in page_ids, "the low platelet count must be past the first page"
    result = ok(post(http, cds, sc, without_prefetch(sc.request, fhir.base, token=TOKEN)))
    assert rule_codes(result) == sc.codes == ["thrombocytopenia"]


# --- the FHIR server's access token --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded() -> Iterator[FhirServer]:
    """A FHIR server that answers 401 unless ``Authorization: Bearer tok``."""
    with start_fhir_server(require_token=TOKEN) as server:
        post_bundle(server.base, chart_transaction(scenario("frp-test-8-days-stale").request), token=TOKEN)
        yield server


def test_the_access_token_is_sent(http: httpx.Client, cds: CdsServer, guarded: FhirServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    result = ok(post(http, cds, sc, without_prefetch(sc.request, guarded.base, token=TOKEN)))
    assert rule_codes(result) == sc.codes


@pytest.mark.parametrize("token", ["wrong-token", None], ids=["wrong-token", "no-fhirAuthorization"])
def test_a_refused_token_is_412_naming_the_key(
    http: httpx.Client, cds: CdsServer, guarded: FhirServer, token: str | None
) -> None:
    """Wrong token: the server's 401 is quoted. No fhirAuthorization at all: 412 too, whether the service
    asks without a token (the 401 again) or does not ask (CDS Hooks 2.0 grants access with both)."""
    sc = scenario("frp-test-8-days-stale")
    said = () if token is None else ("401",)
    assert_412(post(http, cds, sc, without_prefetch(sc.request, guarded.base, token=token)), ALL_KEYS, *said)
    partial = without_prefetch(sc.request, guarded.base, token=token, keep=["patient", "medications"])
    missing = [k for k in ALL_KEYS if k not in ("patient", "medications")]
    assert_412(post(http, cds, sc, partial), missing, *said)


# --- the FHIR server is down -------------------------------------------------------------------------------


def test_a_closed_port_is_412(http: httpx.Client, cds: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    body = without_prefetch(sc.request, f"http://127.0.0.1:{free_port()}/fhir/R4", token=TOKEN)
    assert_412(post(http, cds, sc, body), ALL_KEYS, "unreachable")


def test_a_stopped_fhir_server_is_412(http: httpx.Client, cds: CdsServer) -> None:
    sc = scenario("frp-test-8-days-stale")
    server = start_fhir_server()
    post_bundle(server.base, chart_transaction(sc.request))
    body = without_prefetch(sc.request, server.base, token=TOKEN)
    assert rule_codes(ok(post(http, cds, sc, body))) == sc.codes
    server.stop()
    assert_412(post(http, cds, sc, body), ALL_KEYS, "unreachable")


# --- a FHIR server that answers garbage ----------------------------------------------------------------------


class Garbage(BaseHTTPRequestHandler):
    """Answers by the first path segment (``/<mode>/fhir/...``): the service must turn each into a 412."""

    seen: ClassVar[list[tuple[str, str | None]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, body: bytes, content_type: str = FHIR_JSON) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        Garbage.seen.append((self.path, self.headers.get("Authorization")))
        mode = self.path.split("/")[1]
        host = f"http://{self.headers['Host']}"
        page = int(parse_qs(urlsplit(self.path).query).get("page", ["0"])[0])
        bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset", "entry": []}
        if mode == "text":
            self._send(200, b"not json")
        elif mode == "array":
            self._send(200, b"[]")
        elif mode == "no-resource-type":
            self._send(200, b'{"entry": []}')
        elif mode == "error":
            outcome = {
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "error", "code": "exception", "diagnostics": "database on fire"}],
            }
            self._send(500, json.dumps(outcome).encode())
        elif mode == "foreign-next":
            bundle["link"] = [{"relation": "next", "url": "http://elsewhere.example.org/fhir/Observation?page=2"}]
            self._send(200, json.dumps(bundle).encode())
        elif mode == "endless":
            base = self.path.split("?")[0]
            bundle["link"] = [{"relation": "next", "url": f"{host}{base}?page={page + 1}"}]
            self._send(200, json.dumps(bundle).encode())
        elif mode == "html":
            self._send(502, b"<html><body>Bad Gateway</body></html>", "text/html")
        else:
            self._send(404, b"{}")


@pytest.fixture(scope="module")
def garbage() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("mode", "phrase"),
    [
        ("text", "not JSON"),
        ("array", "not a FHIR resource"),
        ("no-resource-type", "not a FHIR resource"),
        ("error", "500"),
        ("html", "502"),
        ("foreign-next", "another server"),
        ("endless", "pages"),
    ],
)
def test_garbage_from_the_fhir_server_is_412_with_a_message(
    http: httpx.Client, cds: CdsServer, garbage: str, mode: str, phrase: str
) -> None:
    sc = scenario("frp-test-8-days-stale")
    # Only the observations are missing, so every request goes to the observations query.
    body = without_prefetch(sc.request, f"{garbage}/{mode}/fhir", token=TOKEN, keep=all_but("observations"))
    Garbage.seen.clear()
    message = assert_412(post(http, cds, sc, body), ["observations"], phrase)
    if mode == "error":
        assert "database on fire" in message
    assert sc.patient_id not in message  # the query (a patient id) stays out of messages
    assert Garbage.seen and all(auth == f"Bearer {TOKEN}" for _, auth in Garbage.seen)
    if mode == "endless":
        pages = [path for path, _ in Garbage.seen if "/Observation" in path]
        assert len(pages) == 20  # MAX_PAGES, then it stops


def test_garbage_in_a_patient_read_is_412(http: httpx.Client, cds: CdsServer, garbage: str) -> None:
    sc = scenario("frp-test-8-days-stale")
    body = without_prefetch(sc.request, f"{garbage}/array/fhir", token=TOKEN, keep=all_but("patient"))
    assert_412(post(http, cds, sc, body), ["patient"], "not a FHIR resource")
    body = without_prefetch(sc.request, f"{garbage}/missing/fhir", token=TOKEN, keep=all_but("patient"))
    assert_412(post(http, cds, sc, body), ["patient"])
