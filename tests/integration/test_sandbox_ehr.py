"""The sandbox EHR's pages over real HTTP: the home page and launcher, the patient page that fires
``patient-view``, the order form that fires ``order-sign`` at the real imid-rems service (authentication
on, trusting the sandbox's CDS client key), errors shown plainly, card markdown rendered safely, and the
JWT the EHR sends verified with the key it publishes at ``/.well-known/jwks.json``.

The FHIR server is the raw engine demanding a bearer token; the SMART authorization server is stood in
for by a fake `Launches` and a fake token function that record what the pages ask of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from sandbox.cds_client import CdsClient
from sandbox.config import SandboxConfig, SmartClient
from sandbox.corpus import CorpusScenario, load_corpus, transaction
from sandbox.ehr import router
from sandbox.ehr_keys import EhrKey, generate_key
from sandbox.fhir_engine import FhirServer, post_bundle, start_fhir_server
from tests.support.cds_server import CdsServer, Clock, free_port, run_cds_server, serve_app

TOKEN = "ehr-token"  # noqa: S105 (a test value)
STALE = "frp-test-8-days-stale"
NAMES = [STALE, "lenalidomide-adult-male-ongoing-clean", "epic-text-only-medication-note-rems-data"]
APP = SmartClient("imid-rems-app", redirect_uris=("http://app.test/cb",), launch_url="http://app.test/launch?x=1")
PHARMACIST: list[dict[str, Any]] = [
    {
        "resourceType": "Practitioner",
        "id": "rph-1",
        "name": [{"family": "Quimby", "given": ["Rhea"], "suffix": ["PharmD"]}],
    },
    {
        "resourceType": "PractitionerRole",
        "id": "rph-1-role",
        "practitioner": {"reference": "Practitioner/rph-1", "display": "Rhea Quimby, PharmD"},
        "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "46255001", "display": "Pharmacist"}]}],
    },
]


@dataclass
class FakeLaunches:
    made: list[dict[str, Any]] = field(default_factory=list)

    def create_launch(
        self,
        *,
        client_id: str,
        user: str,
        patient: str | None,
        encounter: str | None = None,
        need_patient_banner: bool = True,
        app_context: str | None = None,
    ) -> str:
        self.made.append({"client_id": client_id, "user": user, "patient": patient, "app_context": app_context})
        return f"launch-{len(self.made)}"


@dataclass
class FakeTokens:
    """Tokens for the FHIR server: the right one, unless `cds_token` says otherwise for the CDS service."""

    asked: list[dict[str, Any]] = field(default_factory=list)
    cds_token: str = TOKEN

    def __call__(
        self, client_id: str, scope: str, *, patient: str | None = None, user: str | None = None
    ) -> dict[str, Any]:
        self.asked.append({"client_id": client_id, "scope": scope, "patient": patient, "user": user})
        token = self.cds_token if client_id == "imid-rems-cds" else TOKEN
        return {"access_token": token, "token_type": "Bearer", "expires_in": 300, "scope": scope}


@dataclass
class Sandbox:
    base: str
    launches: FakeLaunches
    tokens: FakeTokens
    key: EhrKey
    config: SandboxConfig


@pytest.fixture(scope="module")
def fhir() -> Iterator[FhirServer]:
    with start_fhir_server(require_token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def corpus(fhir: FhirServer) -> dict[str, CorpusScenario]:
    post_bundle(fhir.base, transaction(PHARMACIST), token=TOKEN)
    return {sc.name: sc for sc in load_corpus(fhir.base, token=TOKEN, names=NAMES)}


@pytest.fixture(scope="module")
def key() -> EhrKey:
    return generate_key()


@pytest.fixture(scope="module")
def clock(corpus: dict[str, CorpusScenario]) -> Clock:
    return Clock(corpus[STALE].now)


@pytest.fixture(scope="module")
def sandbox_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def cds(tmp_path_factory: pytest.TempPathFactory, key: EhrKey, clock: Clock, sandbox_port: int) -> Iterator[CdsServer]:
    """The real service, trusting the sandbox (iss = its base URL) through a JWK Set file."""
    folder = tmp_path_factory.mktemp("sandbox-ehr")
    (folder / "jwks.json").write_text(json.dumps(key.public_jwks()), encoding="utf-8")
    clients = json.dumps([{"iss": f"http://127.0.0.1:{sandbox_port}", "jwks_path": str(folder / "jwks.json")}])
    with run_cds_server(
        clock,
        cds_auth="on",
        cds_clients=clients,
        database_url=f"sqlite:///{folder / 'cds.sqlite'}",
        clinic_tz="America/New_York",
        smart_launch_url="http://app.test/launch?x=1",
    ) as server:
        yield server


@asynccontextmanager
async def _closing(http: httpx.AsyncClient) -> AsyncIterator[None]:
    yield
    await http.aclose()


def start_sandbox(
    stack: ExitStack, services_url: str, fhir: FhirServer, key: EhrKey, clock: Clock, port: int
) -> Sandbox:
    base = f"http://127.0.0.1:{port}"
    config = SandboxConfig(
        base_url=base, fhir_upstream=fhir.base, cds_services_url=services_url, clients=(APP,), now=clock
    )
    http = httpx.AsyncClient(timeout=30.0)
    launches, tokens = FakeLaunches(), FakeTokens()
    cds_client = CdsClient(services_url, base, key, http)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _closing(http):
            yield

    app = FastAPI(lifespan=lifespan)
    app.include_router(router(config, cds_client, launches, tokens, fhir_base=fhir.base))
    stack.enter_context(serve_app(app, port))
    return Sandbox(base, launches, tokens, key, config)


@pytest.fixture(scope="module")
def sandbox(
    fhir: FhirServer, corpus: dict[str, CorpusScenario], cds: CdsServer, key: EhrKey, clock: Clock, sandbox_port: int
) -> Iterator[Sandbox]:
    with ExitStack() as stack:
        yield start_sandbox(stack, f"{cds.base}/cds-services", fhir, key, clock, sandbox_port)


@pytest.fixture
def browser(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.base, timeout=60.0) as c:
        yield c


def stale_order_form(sc: CorpusScenario, **changes: str) -> dict[str, str]:
    form = {
        "drug": "602910",
        "schedule": "21of28",
        "days_supply": "28",
        "quantity": "21",
        "refills": "0",
        "authorization": "47193348",
        "category": "adult-female-rp",
        "prescriber": sc.user_id,
    }
    return {**form, **changes}


def text_of(page: str) -> str:
    """The page's visible text, tags removed and whitespace collapsed (entities left as they are)."""
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())


# --- home and launcher --------------------------------------------------------------------------------------


def test_home_lists_patients_prescribers_pharmacists(
    browser: httpx.Client, corpus: dict[str, CorpusScenario], sandbox: Sandbox
) -> None:
    page = browser.get("/")
    assert page.status_code == 200, page.text
    for sc in corpus.values():
        patient = next(r for r in sc.resources if r["resourceType"] == "Patient")
        assert f'href="/ehr/patients/{sc.patient_id}"' in page.text
        assert patient["name"][0]["family"] in page.text
    visible = text_of(page.text)
    assert "Olivia Park" in visible and "lenalidomide 10 mg capsule (completed)" in visible
    assert "Rhea Quimby" in visible.split("Pharmacists", 1)[1]  # a pharmacist, listed as one
    assert "Dana Whitfield, MD" in visible.split("Prescribers", 1)[1].split("Pharmacists", 1)[0]
    stale = corpus[STALE]
    practitioner = next(r for r in stale.resources if r["resourceType"] == "PractitionerRole")["practitioner"]
    assert f'<option value="{practitioner["reference"]}">' in page.text  # launch as the Practitioner (fhirUser)
    assert '<option value="Practitioner/rph-1">' in page.text
    assert all(t["client_id"] == "sandbox-ehr" and t["scope"] == "system/*.rs" for t in sandbox.tokens.asked)


def test_launch_redirects_to_the_app_with_iss_and_launch(
    browser: httpx.Client, sandbox: Sandbox, corpus: dict[str, CorpusScenario]
) -> None:
    sc = corpus[STALE]
    before = len(sandbox.launches.made)
    response = browser.post(
        "/ehr/launch", data={"client_id": APP.client_id, "user": "Practitioner/cbf-prac", "patient": sc.patient_id}
    )
    assert response.status_code == 303
    target = urlsplit(response.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == "http://app.test/launch"
    query = parse_qs(target.query)
    assert query == {"x": ["1"], "iss": [f"{sandbox.base}/fhir"], "launch": [f"launch-{before + 1}"]}
    assert sandbox.launches.made[-1] == {
        "client_id": APP.client_id,
        "user": "Practitioner/cbf-prac",
        "patient": sc.patient_id,
        "app_context": None,
    }
    worklist = browser.post("/ehr/launch", data={"client_id": APP.client_id, "user": "Practitioner/rph-1"})
    assert worklist.status_code == 303 and sandbox.launches.made[-1]["patient"] is None
    assert parse_qs(urlsplit(worklist.headers["location"]).query)["launch"] == [f"launch-{before + 2}"]


@pytest.mark.parametrize(
    "data",
    [
        {"client_id": APP.client_id, "user": "javascript:alert(1)", "patient": "p"},
        {"client_id": APP.client_id, "user": "Practitioner/x", "patient": "../etc"},
        {"client_id": "not-registered", "user": "Practitioner/x"},
    ],
)
def test_a_bad_launch_is_refused_and_registers_nothing(
    browser: httpx.Client, sandbox: Sandbox, data: dict[str, str]
) -> None:
    before = len(sandbox.launches.made)
    response = browser.post("/ehr/launch", data=data)
    assert response.status_code == 400 and "location" not in response.headers
    assert len(sandbox.launches.made) == before


# --- the patient page and order-sign against the real service ----------------------------------------------


def test_patient_page_shows_the_chart_the_status_card_and_a_prefilled_form(
    browser: httpx.Client, corpus: dict[str, CorpusScenario], clock: Clock
) -> None:
    sc = corpus[STALE]
    clock.now = sc.now
    page = browser.get(f"/ehr/patients/{sc.patient_id}")
    assert page.status_code == 200, page.text
    visible = text_of(page.text)
    assert "Last pregnancy test 2026-11-13T16:45:00-05:00: Negative" in visible
    assert "Last fill 2026-10-28T15:40:00-04:00: lenalidomide 10 mg capsule, 28 days" in visible
    assert "REMS authorization 96220017; risk category Adult Female Who Can Get Pregnant" in visible
    assert "CDS Hooks: patient-view" in visible and "Sent with prefetch" in visible
    assert "REMS status" in visible and "The CDS service answered" not in visible
    assert 'value="96220017"' in page.text  # the authorization number of the current order
    assert '<option value="adult-female-rp" selected>' in page.text
    assert f'<option value="{sc.user_id}" selected>' in page.text
    assert "Open the REMS timeline" in visible  # the card's SMART link, offered as a launch


@pytest.mark.parametrize("no_prefetch", [False, True], ids=["prefetch", "no-prefetch"])
def test_signing_with_a_stale_pregnancy_test_shows_the_card(
    browser: httpx.Client, corpus: dict[str, CorpusScenario], clock: Clock, sandbox: Sandbox, no_prefetch: bool
) -> None:
    sc = corpus[STALE]
    clock.now = sc.now
    form = stale_order_form(sc)
    if no_prefetch:
        form["no_prefetch"] = "on"
    page = browser.post(f"/ehr/patients/{sc.patient_id}/sign", data=form)
    assert page.status_code == 200, page.text
    visible = text_of(page.text)
    assert "CDS Hooks: order-sign" in visible and "The CDS service answered" not in visible
    assert ("Sent without prefetch" in visible) is no_prefetch
    assert "<code>pregnancy-test-stale</code>" in page.text
    topics = re.findall(r"topic [^(]+\(<code>([a-z0-9-]+)</code>\)", page.text)
    assert topics == ["pregnancy-test-stale"]  # the one finding of this scenario, nothing else
    cds_tokens = [t for t in sandbox.tokens.asked if t["client_id"] == "imid-rems-cds"]
    assert cds_tokens[-1]["patient"] == sc.patient_id and cds_tokens[-1]["user"] == sc.user_id
    assert "user/Observation.rs" in cds_tokens[-1]["scope"].split()


def test_suggestions_say_what_they_would_change(
    browser: httpx.Client, corpus: dict[str, CorpusScenario], clock: Clock
) -> None:
    sc = corpus[STALE]
    clock.now = sc.now
    page = browser.post(f"/ehr/patients/{sc.patient_id}/sign", data=stale_order_form(sc, days_supply="56", refills="2"))
    assert page.status_code == 200, page.text
    topics = sorted(re.findall(r"topic [^(]+\(<code>([a-z0-9-]+)</code>\)", page.text))
    assert topics == ["pregnancy-test-stale", "refills-not-allowed", "supply-over-28-days"]
    assert "dispenseRequest.expectedSupplyDuration.value: 56 → 28" in page.text
    assert "dispenseRequest.numberOfRepeatsAllowed: 2 → 0" in page.text
    assert "creates ServiceRequest" in page.text  # the pregnancy test the stale card offers to order


def test_an_invalid_order_form_is_refused_before_any_hook(
    browser: httpx.Client, corpus: dict[str, CorpusScenario]
) -> None:
    sc = corpus[STALE]
    page = browser.post(
        f"/ehr/patients/{sc.patient_id}/sign",
        data=stale_order_form(sc, drug="999", refills="-1", authorization="<b>x</b>", prescriber="Practitioner/nobody"),
    )
    assert page.status_code == 400
    visible = text_of(page.text)
    assert "Choose a drug and strength from the list." in visible
    assert "Refills must be a whole number from 0 to 12." in visible
    assert "Choose the prescriber from the list." in visible
    assert "CDS Hooks: order-sign" not in visible
    assert "<b>x</b>" not in page.text and "&lt;b&gt;x&lt;/b&gt;" in page.text


def test_an_error_from_the_service_is_shown_plainly(
    browser: httpx.Client, corpus: dict[str, CorpusScenario], clock: Clock, sandbox: Sandbox
) -> None:
    """Without prefetch and with a token the FHIR server refuses, the service cannot read the chart: 412."""
    sc = corpus[STALE]
    clock.now = sc.now
    sandbox.tokens.cds_token = "refused"  # noqa: S105 (a test value)
    try:
        page = browser.post(f"/ehr/patients/{sc.patient_id}/sign", data={**stale_order_form(sc), "no_prefetch": "on"})
    finally:
        sandbox.tokens.cds_token = TOKEN
    assert page.status_code == 200
    visible = text_of(page.text)
    assert re.search(r"The CDS service answered 412: prefetch\.[a-zA-Z]+: .*401", visible), visible
    assert "pregnancy-test-stale" not in page.text


# --- a fake service: the JWT, the JWKS, markdown and links -------------------------------------------------


@dataclass
class FakeService:
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    answer: tuple[int, Any] = (200, {"cards": []})

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/cds-services")
        async def discovery(request: Request) -> JSONResponse:
            self.calls.append((str(request.url), request.headers.get("authorization", ""), {}))
            return JSONResponse(
                {
                    "services": [
                        {
                            "id": "fake-view",
                            "hook": "patient-view",
                            "prefetch": {"patient": "Patient/{{context.patientId}}"},
                        },
                        {
                            "id": "fake-sign",
                            "hook": "order-sign",
                            "prefetch": {"patient": "Patient/{{context.patientId}}"},
                        },
                    ]
                }
            )

        @app.post("/cds-services/{service_id}")
        async def call(service_id: str, request: Request) -> JSONResponse:
            self.calls.append((str(request.url), request.headers.get("authorization", ""), await request.json()))
            status, body = self.answer
            return JSONResponse(body, status_code=status)

        return app


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeService, str]]:
    service = FakeService()
    with serve_app(service.app()) as base:
        yield service, base


@pytest.fixture(scope="module")
def faked(
    fhir: FhirServer, corpus: dict[str, CorpusScenario], fake: tuple[FakeService, str], clock: Clock
) -> Iterator[Sandbox]:
    with ExitStack() as stack:
        yield start_sandbox(stack, f"{fake[1]}/cds-services", fhir, generate_key(), clock, free_port())


def test_the_jwt_verifies_with_the_published_jwks_and_has_the_exact_aud(
    faked: Sandbox, fake: tuple[FakeService, str], corpus: dict[str, CorpusScenario]
) -> None:
    service, base = fake
    service.calls.clear()
    sc = corpus[STALE]
    with httpx.Client(base_url=faked.base, timeout=30) as c:
        assert c.get(f"/ehr/patients/{sc.patient_id}").status_code == 200
        jwks = c.get("/.well-known/jwks.json").json()
    assert [k["kid"] for k in jwks["keys"]] == [faked.key.kid] and all("d" not in k for k in jwks["keys"])
    keys = {k["kid"]: jwt.PyJWK(k) for k in jwks["keys"]}
    assert [url for url, _, _ in service.calls] == [f"{base}/cds-services", f"{base}/cds-services/fake-view"]
    jtis = set()
    for url, authorization, _ in service.calls:
        token = authorization.removeprefix("Bearer ")
        header = jwt.get_unverified_header(token)
        assert header["alg"] == "ES384" and header["typ"] == "JWT"
        claims = jwt.decode(token, keys[header["kid"]].key, algorithms=["ES384"], audience=url)
        assert claims["aud"] == url and claims["iss"] == faked.base
        assert 0 < claims["exp"] - claims["iat"] <= 300
        jtis.add(claims["jti"])
    assert len(jtis) == len(service.calls)
    body = service.calls[-1][2]
    assert body["context"] == {"userId": sc.user_id, "patientId": sc.patient_id}
    assert body["prefetch"]["patient"]["id"] == sc.patient_id and body["fhirServer"]
    assert body["fhirAuthorization"]["subject"] == "imid-rems-cds"


def test_card_markdown_and_text_are_rendered_safely(
    faked: Sandbox, fake: tuple[FakeService, str], corpus: dict[str, CorpusScenario]
) -> None:
    service, _ = fake
    card = {
        "uuid": "c1",
        "summary": "<img src=x onerror=alert(1)> summary",
        "indicator": "warning",
        "detail": (
            "**Bold** <script>alert(1)</script> [bad](javascript:alert(1)) [ok](https://example.org/a?b=1&c=2)\n\n"
            "- item `<code>`\n- *second*\n\n| k | v |\n|---|---|\n| a | <i>b</i> |\n\n---"
        ),
        "source": {"label": "<b>src</b>", "url": "javascript:alert(2)", "topic": {"code": "t-1", "display": "T"}},
        "links": [
            {"label": "Open app", "url": "http://app.test/launch?x=1", "type": "smart", "appContext": '{"view":"x"}'},
            {"label": "evil", "url": "javascript:alert(3)", "type": "absolute"},
        ],
    }
    service.answer = (200, {"cards": [card]})
    try:
        with httpx.Client(base_url=faked.base, timeout=30) as c:
            page = c.get(f"/ehr/patients/{corpus[STALE].patient_id}").text
    finally:
        service.answer = (200, {"cards": []})
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<img" not in page and "&lt;img src=x onerror=alert(1)&gt; summary" in page
    assert "javascript:" not in page.split("<main", 1)[1].replace("(not an http(s) link: javascript:alert(3))", "")
    assert "<strong>Bold</strong>" in page
    assert '<a href="https://example.org/a?b=1&amp;c=2">ok</a>' in page
    assert "<li>item <code>&lt;code&gt;</code></li>" in page and "<li><em>second</em></li>" in page
    assert "<td>&lt;i&gt;b&lt;/i&gt;</td>" in page and "<hr>" in page
    assert "&lt;b&gt;src&lt;/b&gt;" in page
    assert 'name="app_context" value="{&#34;view&#34;:&#34;x&#34;}"' in page  # SMART link → a launch form


def test_an_error_answer_is_shown_with_status_and_message(
    faked: Sandbox, fake: tuple[FakeService, str], corpus: dict[str, CorpusScenario]
) -> None:
    service, _ = fake
    service.answer = (422, {"error": {"status": 422, "field": "context.draftOrders", "message": "bad <b>order</b>"}})
    sc = corpus[STALE]
    try:
        with httpx.Client(base_url=faked.base, timeout=30) as c:
            page = c.post(f"/ehr/patients/{sc.patient_id}/sign", data=stale_order_form(sc)).text
    finally:
        service.answer = (200, {"cards": []})
    assert "The CDS service answered 422:</strong> context.draftOrders: bad &lt;b&gt;order&lt;/b&gt;" in page
    draft = service.calls[-1][2]["context"]["draftOrders"]["entry"][0]["resource"]
    assert draft["identifier"] == [
        {"use": "official", "system": "https://imid-rems.github.io/fhir/sid/rems-authorization", "value": "47193348"}
    ]
    assert draft["extension"][0]["valueCoding"]["code"] == "adult-female-rp"
    assert draft["status"] == "draft" and draft["subject"] == {"reference": f"Patient/{sc.patient_id}"}
    assert draft["dispenseRequest"]["expectedSupplyDuration"] == {
        "value": 28,
        "unit": "days",
        "system": "http://unitsofmeasure.org",
        "code": "d",
    }
