"""The SMART app (`smart_app`) launched from the sandbox EHR over real HTTP: the sandbox's authorization server
(PKCE, single-use codes, refresh-token rotation that revokes a reused token's whole family), its FHIR gateway
in front of the FHIR engine, and the imid-rems service (one or two replicas) on one SQLite file.

A "browser" is an ``httpx.Client`` that keeps cookies; a second client is another browser. What is checked is
what a user or an attacker can do with URLs: the launch's security (issuer allow-list before any request,
state bound to the browser and single use, PKCE S256, ``aud``), sessions bound to the browser's cookie, pages'
security headers, tokens that never leave the server, refresh before expiry (once across replicas), CSRF on
forms, and the EHR's ``need_patient_banner`` / ``smart_style_url``.

Clocks: the service's clock (`Clock`, frozen unless moved) and the sandbox's (``SandboxConfig.now``: real time
plus a skew) are moved together by `Stack.travel`, and put back after every test (the service's Backend
Services assertions carry real time, which the sandbox checks against its own clock).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit, urlunsplit
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import Engine, select

from cds_hooks import db
from cds_hooks import refill_store as store
from cds_hooks.refill_store import NewDraft
from sandbox import seed
from sandbox.app import (
    APP_CLIENT_ID,
    BACKEND_CLIENT_ID,
    BACKEND_KEY_FILE,
    backend_key,
    create_sandbox_app,
    default_config,
)
from sandbox.config import SandboxConfig
from sandbox.fhir_engine import start_fhir_server
from sandbox.smart_auth import SmartAuthServer
from smart_app import sessions
from smart_app.oauth import SmartOAuth, sanitize_style
from smart_app.sessions import AppSession, Tokens, smart_session
from tests.support.cds_server import CdsServer, Clock, free_port, run_cds_server, serve_app
from tests.support.threads import all_at_once

NY = ZoneInfo("America/New_York")
PRESCRIBER = "Practitioner/sb-prac-onc1"
PHARMACIST = "Practitioner/sb-prac-rph1"
COOKIE = "imid_rems_browser"
MARGIN_S = 120.0
BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


@dataclass
class Counter:
    """A server that must never be called: it counts every request (and would answer like a SMART server)."""

    base: str = ""
    hits: list[str] = field(default_factory=list)


@dataclass
class Stack:
    base: str
    """The sandbox EHR (``http://127.0.0.1:PORT``)."""
    config: SandboxConfig
    auth: SmartAuthServer
    cds: CdsServer
    engine: Engine
    """The service's database (the same SQLite file), for reading ``smart_session`` rows."""
    settings: dict[str, Any]
    patients: dict[str, str]
    """Seeded patient id → family name."""
    counter: Counter
    skew: timedelta = timedelta(0)
    replicas: list[CdsServer] = field(default_factory=list)

    @property
    def fhir_base(self) -> str:
        return f"{self.base}/fhir"

    def travel(self, to: datetime) -> None:
        """Move every clock (the service's replicas and the sandbox's) to `to`."""
        for server in (self.cds, *self.replicas):
            server.clock.now = to
        self.skew = to - datetime.now(UTC)

    def row(self, sid: str) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(select(smart_session).where(smart_session.c.id == sid)).mappings().one()


def _counter_app(counter: Counter) -> FastAPI:
    app = FastAPI()

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def anything(path: str, request: Request) -> JSONResponse:
        counter.hits.append(str(request.url))
        return JSONResponse(
            {
                "authorization_endpoint": f"{counter.base}/authorize",
                "token_endpoint": f"{counter.base}/token",
                "code_challenge_methods_supported": ["S256"],
                "color_highlight": "#ff0000",
            }
        )

    return app


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("smart-launch")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    today = datetime.now(UTC).astimezone(NY).date()
    bundles = list(seed.generate(3, 1, today))
    patients = {
        e["resource"]["id"]: e["resource"]["name"][0]["family"]
        for b in bundles
        for e in b["entry"]
        if e["resource"]["resourceType"] == "Patient"
    }
    backend_key(state)  # the service reads its Backend Services key at start-up
    database_url = f"sqlite:///{state / 'service.sqlite'}"
    settings: dict[str, Any] = {
        "database_url": database_url,
        "cds_auth": "off",
        "clinic_tz": "America/New_York",
        "smart_issuers": f"{base}/fhir",
        "smart_client_id": APP_CLIENT_ID,
        "smart_refresh_margin_s": MARGIN_S,
        "fhir_base_url": f"{base}/fhir",
        "backend_client_id": BACKEND_CLIENT_ID,
        "backend_key_file": str(state / BACKEND_KEY_FILE),
        "refill_scan_interval_s": 0,
    }
    counter = Counter()
    with start_fhir_server() as fhir, serve_app(_counter_app(counter)) as counter_base:
        counter.base = counter_base
        seed.load(fhir.base, bundles)
        with run_cds_server(Clock(), **settings) as cds:
            config = default_config(base_url=base, fhir_upstream=fhir.base, service_base=cds.base, state_dir=state)
            sandbox = create_sandbox_app(config)
            engine = db.make_engine(database_url)
            stack = Stack(base, config, sandbox.state.auth, cds, engine, settings, patients, counter)
            config.now = lambda: datetime.now(UTC) + stack.skew
            try:
                with serve_app(sandbox, port):
                    yield stack
            finally:
                engine.dispose()


@pytest.fixture(autouse=True)
def clocks_back(stack: Stack) -> Iterator[None]:
    yield
    stack.travel(datetime.now(UTC))
    stack.counter.hits.clear()


@pytest.fixture(scope="module")
def replica_b(stack: Stack) -> Iterator[CdsServer]:
    """A second service instance on the same database. Its own port, same host: cookies are per host, not per
    port, so a browser's cookie reaches both replicas."""
    with run_cds_server(Clock(stack.cds.clock.now), **stack.settings) as b:
        stack.replicas.append(b)
        try:
            yield b
        finally:
            stack.replicas.remove(b)


def browser() -> httpx.Client:
    return httpx.Client(follow_redirects=True, trust_env=False, timeout=30.0)


def text_of(page: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", page).split())


def launch(stack: Stack, client: httpx.Client, patient: str | None, user: str = PRESCRIBER) -> httpx.Response:
    """The EHR launcher's form, followed to wherever the app lands."""
    return client.post(
        f"{stack.base}/ehr/launch", data={"user": user, "patient": patient or "", "client_id": APP_CLIENT_ID}
    )


def session_id(response: httpx.Response) -> str:
    match = re.fullmatch(r"/smart/s/([A-Za-z0-9_-]+)/(patient|worklist)", response.url.path)
    assert match, f"landed on {response.url} ({response.status_code}): {text_of(response.text)[:500]}"
    return match.group(1)


@dataclass
class Steps:
    authorize: str
    """The authorization request the app sent the browser to."""
    callback: str
    """The authorization server's answer, not yet opened."""


def until_callback(stack: Stack, client: httpx.Client, patient: str | None) -> Steps:
    """Launch from the EHR and follow redirects by hand, stopping before the callback is opened."""
    response = client.post(
        f"{stack.base}/ehr/launch",
        data={"user": PRESCRIBER, "patient": patient or "", "client_id": APP_CLIENT_ID},
        follow_redirects=False,
    )
    authorize = None
    for _ in range(5):
        assert response.status_code in (302, 303), f"{response.url}: {response.status_code} {response.text[:500]}"
        url = urljoin(str(response.url), response.headers["location"])
        if url.startswith(f"{stack.cds.base}/smart/callback?"):
            assert authorize is not None
            return Steps(authorize, url)
        if url.startswith(f"{stack.base}/auth/authorize?"):
            authorize = url
        response = client.get(url, follow_redirects=False)
    raise AssertionError("the launch never reached the callback")


def with_query(url: str, **changes: str | None) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    for key, value in changes.items():
        if value is None:
            query.pop(key, None)
        else:
            query[key] = value
    return urlunsplit(parts._replace(query=urlencode(query)))


# --- 1. the launch ---------------------------------------------------------------------------------------------


def test_prescriber_ehr_launch_lands_on_the_patients_page_after_a_pkce_s256_authorization(stack: Stack) -> None:
    patient = "sb-p000001"
    with browser() as client:
        page = launch(stack, client, patient)
    assert page.status_code == 200, text_of(page.text)[:1000]
    session_id(page)
    assert page.url.path.endswith("/patient")
    assert stack.patients[patient] in text_of(page.text)
    assert f"Patient/{patient}" in page.text

    chain = [str(r.url) for r in page.history]
    ehr_to_app = urlsplit(chain[1])
    assert f"{ehr_to_app.scheme}://{ehr_to_app.netloc}{ehr_to_app.path}" == f"{stack.cds.base}/smart/launch"
    launch_id = parse_qs(ehr_to_app.query)["launch"][0]
    authorize = next(urlsplit(u) for u in chain if u.startswith(f"{stack.base}/auth/authorize?"))
    query = parse_qs(authorize.query)
    assert all(len(v) == 1 for v in query.values()), query  # no parameter sent twice
    q = {k: v[0] for k, v in query.items()}
    assert q["response_type"] == "code"
    assert q["client_id"] == APP_CLIENT_ID
    assert q["redirect_uri"] == f"{stack.cds.base}/smart/callback"
    assert q["aud"] == stack.fhir_base
    assert q["launch"] == launch_id
    assert len(q["state"]) >= 43 and BASE64URL.fullmatch(q["state"])
    assert q["code_challenge_method"] == "S256"
    assert len(q["code_challenge"]) == 43 and BASE64URL.fullmatch(q["code_challenge"])  # unpadded SHA-256
    assert q["nonce"]
    assert {"launch", "openid", "fhirUser"} <= set(q["scope"].split())
    # The sandbox checks S256(code_verifier) == code_challenge at the token endpoint: a session exists only if
    # it accepted the verifier the service kept for this state.
    callback = next(urlsplit(u) for u in chain if u.startswith(f"{stack.cds.base}/smart/callback?"))
    assert parse_qs(callback.query)["state"] == [q["state"]]


# --- 2. issuers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iss", ["http://evil.example/fhir", "{counter}/fhir", "{counter}/fhir?also={sandbox}/fhir"])
def test_a_launch_naming_another_fhir_server_is_refused_before_any_request_to_it(stack: Stack, iss: str) -> None:
    iss = iss.format(counter=stack.counter.base, sandbox=stack.fhir_base)
    with browser() as client:
        page = client.get(f"{stack.cds.base}/smart/launch", params={"iss": iss, "launch": "x"})
    assert page.status_code == 403
    assert "Launch refused: unknown FHIR server" in page.text
    assert iss in text_of(page.text).replace("&#39;", "'")
    assert "set-cookie" not in page.headers
    assert "frame-ancestors" in page.headers["content-security-policy"]
    assert stack.counter.hits == []


def test_a_launch_without_iss_is_incomplete(stack: Stack) -> None:
    with browser() as client:
        page = client.get(f"{stack.cds.base}/smart/launch", params={"launch": "x"})
    assert page.status_code == 400
    assert "The launch is incomplete" in page.text


# --- 3. the callback -------------------------------------------------------------------------------------------


def test_callback_with_altered_state_is_refused_and_a_used_state_cannot_be_replayed(stack: Stack) -> None:
    with browser() as client:
        steps = until_callback(stack, client, "sb-p000000")
        state = parse_qs(urlsplit(steps.callback).query)["state"][0]
        altered = state[:-1] + ("A" if state[-1] != "A" else "B")
        refused = client.get(with_query(steps.callback, state=altered))
        assert refused.status_code == 403
        assert "Sign-in refused" in refused.text

        page = client.get(steps.callback)  # the genuine answer still works: the altered one burnt nothing
        assert page.status_code == 200
        sid = session_id(page)

        replay = client.get(steps.callback)
        assert replay.status_code == 403
        assert "Sign-in refused" in replay.text
        assert "already used" in text_of(replay.text)
        # The replay never reached the token endpoint: a second use of the code would have made the sandbox
        # revoke every token issued from it, and this session's page could no longer read the chart.
        again = client.get(f"{stack.cds.base}/smart/s/{sid}/patient")
        assert again.status_code == 200
        assert stack.patients["sb-p000000"] in text_of(again.text)
        assert stack.row(sid)["version"] == 1


def test_callback_opened_in_another_browser_is_refused_and_burns_nothing(stack: Stack) -> None:
    with browser() as victim, browser() as attacker:
        steps = until_callback(stack, victim, "sb-p000000")
        no_cookie = attacker.get(steps.callback)
        assert no_cookie.status_code == 403
        assert "Sign-in refused" in no_cookie.text
        assert "cookie is missing" in text_of(no_cookie.text)

        launch(stack, attacker, "sb-p000002")  # the attacker now has a cookie of its own
        assert attacker.cookies.get(COOKIE, path="/smart")
        other_cookie = attacker.get(steps.callback)
        assert other_cookie.status_code == 403
        assert "Sign-in refused" in other_cookie.text

        page = victim.get(steps.callback)
        assert page.status_code == 200
        assert stack.patients["sb-p000000"] in text_of(page.text)


def test_callback_without_state_is_a_400(stack: Stack) -> None:
    with browser() as client:
        page = client.get(f"{stack.cds.base}/smart/callback", params={"code": "abc"})
    assert page.status_code == 400
    assert "it carries no state" in text_of(page.text)


def test_access_denied_is_shown_with_the_ehrs_description_and_ends_the_launch(stack: Stack) -> None:
    with browser() as client:
        steps = until_callback(stack, client, "sb-p000000")
        state = parse_qs(urlsplit(steps.authorize).query)["state"][0]
        answer = f"{stack.cds.base}/smart/callback?" + urlencode(
            {"error": "access_denied", "error_description": "The user declined", "state": state}
        )
        page = client.get(answer)
        assert page.status_code == 403
        assert "The EHR did not authorize the app" in page.text
        assert "access_denied: The user declined" in text_of(page.text)
        assert client.get(steps.callback).status_code == 403  # that state is spent


# --- 4. sessions belong to the browser -------------------------------------------------------------------------


def test_a_session_url_opens_nothing_in_another_browser(stack: Stack) -> None:
    patient = "sb-p000002"
    with browser() as owner, browser() as stranger, browser() as other:
        page = launch(stack, owner, patient)
        assert page.status_code == 200
        url = str(page.url)
        launch(stack, other, "sb-p000000")
        assert other.cookies.get(COOKIE, path="/smart")
        for client in (stranger, other):
            refused = client.get(url)
            assert refused.status_code == 401
            assert "Session not found" in refused.text
            assert stack.patients[patient] not in refused.text
            assert patient not in refused.text
        assert owner.get(url).status_code == 200


def test_two_launches_in_one_browser_keep_two_sessions(stack: Stack) -> None:
    with browser() as client:
        first = launch(stack, client, "sb-p000000")
        second = launch(stack, client, "sb-p000001")
        assert session_id(first) != session_id(second)
        assert len([c for c in client.cookies.jar if c.name == COOKIE]) == 1
        for url, mine, theirs in ((first.url, "sb-p000000", "sb-p000001"), (second.url, "sb-p000001", "sb-p000000")):
            page = client.get(url)
            assert page.status_code == 200
            assert stack.patients[mine] in text_of(page.text)
            assert f"Patient/{theirs}" not in page.text


# --- 5. headers, cookie, tokens --------------------------------------------------------------------------------


def test_pages_send_security_headers_and_tokens_never_reach_the_browser(stack: Stack) -> None:
    with browser() as client:
        page = launch(stack, client, "sb-p000000")
        sid = session_id(page)
        error = client.get(f"{stack.cds.base}/smart/s/not-a-session/patient")
    assert error.status_code == 401
    for response in (page, error):
        csp = {d.split()[0]: d.split()[1:] for d in response.headers["content-security-policy"].split(";") if d.strip()}
        assert csp["frame-ancestors"] == ["'self'", stack.base]
        assert csp["default-src"] == ["'none'"]
        assert "script-src" not in csp
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert "<script" not in response.text.lower()

    app_launch = next(r for r in page.history if r.url.path == "/smart/launch")
    assert app_launch.headers["cache-control"] == "no-store"
    cookie = app_launch.headers["set-cookie"]
    attributes = {a.strip().split("=")[0].lower(): a.strip() for a in cookie.split(";")}
    assert cookie.startswith(f"{COOKIE}=")
    assert "httponly" in attributes
    assert attributes["path"] == "Path=/smart"
    assert attributes["samesite"].lower() == "samesite=lax"
    assert "secure" not in attributes  # plain http (development)

    row = stack.row(sid)
    secrets = [row["access_token"], row["refresh_token"]]
    assert all(secrets)
    seen = [page.text, error.text, *(r.text for r in page.history)]
    seen += [f"{k}: {v}" for r in (page, *page.history) for k, v in r.headers.multi_items()]
    seen += [str(r.url) for r in (page, *page.history)]
    seen += [c.value or "" for c in client.cookies.jar]
    for secret in secrets:
        assert not any(secret in s for s in seen)


# --- 6. refresh ------------------------------------------------------------------------------------------------


def near_expiry(stack: Stack, sid: str) -> datetime:
    """A moment inside the refresh margin of the session's access token, 30 s before it expires."""
    expires = stack.row(sid)["access_expires_at"]
    assert expires - stack.cds.clock.now > timedelta(seconds=MARGIN_S)
    return expires - timedelta(seconds=30)


def test_the_access_token_is_refreshed_once_when_it_nears_expiry(stack: Stack) -> None:
    with browser() as client:
        page = launch(stack, client, "sb-p000000")
        sid = session_id(page)
        before = stack.row(sid)
        assert before["version"] == 1
        assert client.get(page.url).status_code == 200
        assert stack.row(sid)["version"] == 1  # not yet in the margin: no refresh

        stack.travel(near_expiry(stack, sid))
        renewed = client.get(page.url)
        assert renewed.status_code == 200, text_of(renewed.text)[:1000]
        assert stack.patients["sb-p000000"] in text_of(renewed.text)  # read with the new token
        after = stack.row(sid)
        assert after["version"] == 2
        assert after["access_token"] != before["access_token"]
        assert after["refresh_token"] not in (None, before["refresh_token"])  # the sandbox rotates it
        assert after["access_expires_at"] > before["access_expires_at"]
        assert after["refreshing_until"] is None

        assert client.get(page.url).status_code == 200
        assert stack.row(sid)["version"] == 2


def test_a_refresh_the_ehr_refuses_ends_the_session(stack: Stack) -> None:
    with browser() as client:
        page = launch(stack, client, "sb-p000000")
        sid = session_id(page)
        stack.auth.revoke(stack.row(sid)["refresh_token"])
        stack.travel(near_expiry(stack, sid))
        refused = client.get(page.url)
        assert refused.status_code == 401
        assert "could not be renewed" in refused.text
        assert "refresh token revoked" in text_of(refused.text)
        assert stack.patients["sb-p000000"] not in refused.text
        row = stack.row(sid)
        assert row["ended_at"] is not None
        assert row["access_token"] == ""
        assert row["refresh_token"] is None
        ended = client.get(page.url)
        assert ended.status_code == 401
        assert "this session has ended" in text_of(ended.text)


# --- 7. two replicas -------------------------------------------------------------------------------------------


def poll(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("when", ["about to expire", "expired"])
def test_two_replicas_share_sessions_and_refresh_only_once(
    stack: Stack, replica_b: CdsServer, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both replicas get the request while the token needs renewing, and the refresh is held at the token
    endpoint's door until both have decided who refreshes (so the two really overlap): exactly one calls the
    token endpoint; the other uses the still-valid token, or waits for the new one when the old has expired."""
    claims: list[tuple[int, bool]] = []  # (which replica's engine, won)
    refreshes: list[str] = []
    release = threading.Event()
    claim, refresh = sessions.claim_refresh, SmartOAuth.refresh

    def counted_claim(engine: Engine, *args: Any, **kwargs: Any) -> bool:
        won = claim(engine, *args, **kwargs)
        claims.append((id(engine), won))
        return won

    async def held_refresh(self: SmartOAuth, session: AppSession, now: datetime) -> Tokens:
        refreshes.append(session.id)
        await asyncio.to_thread(release.wait, 20)
        return await refresh(self, session, now)

    with browser() as client:
        page = launch(stack, client, "sb-p000001")
        sid = session_id(page)
        on_b = client.get(f"{replica_b.base}{page.url.path}")
        assert on_b.status_code == 200
        assert stack.patients["sb-p000001"] in text_of(on_b.text)
        before = stack.row(sid)

        expires = before["access_expires_at"]
        stack.travel(near_expiry(stack, sid) if when == "about to expire" else expires + timedelta(seconds=5))
        cookie = {COOKIE: client.cookies.get(COOKIE, path="/smart") or ""}
        urls = [f"{stack.cds.base}{page.url.path}", f"{replica_b.base}{page.url.path}"]
        monkeypatch.setattr(sessions, "claim_refresh", counted_claim)
        monkeypatch.setattr(SmartOAuth, "refresh", held_refresh)

        def work(i: int) -> httpx.Response | None:
            if i == 2:  # let the refresh through once both replicas have tried to claim it
                try:
                    poll(lambda: len({e for e, _ in claims}) == 2, "both replicas to try to claim the refresh")
                finally:
                    release.set()
                return None
            with httpx.Client(cookies=cookie, trust_env=False, timeout=30.0) as one:
                return one.get(urls[i])

        pages = [p for p in all_at_once(3, work) if p is not None]
    assert [p.status_code for p in pages] == [200, 200], [text_of(p.text)[:500] for p in pages]
    for p in pages:
        assert stack.patients["sb-p000001"] in text_of(p.text)
    assert [won for _, won in claims].count(True) == 1  # the loser may try again on each FHIR call
    assert refreshes == [sid]
    after = stack.row(sid)
    assert after["version"] == before["version"] + 1
    assert after["ended_at"] is None
    assert after["access_token"] != before["access_token"]


# --- 8. CSRF ---------------------------------------------------------------------------------------------------


def test_draft_forms_need_the_sessions_csrf_token(stack: Stack) -> None:
    now = stack.cds.clock.now
    today = now.astimezone(NY).date()
    draft, _ = store.upsert_draft(
        stack.engine,
        NewDraft(
            patient_id="sb-p000002",
            prior_order="MedicationRequest/csrf-test",
            drug="lenalidomide",
            medication_request={
                "resourceType": "MedicationRequest",
                "status": "draft",
                "intent": "order",
                "subject": {"reference": "Patient/sb-p000002"},
                "dosageInstruction": [{"text": "lenalidomide 10 mg daily"}],
            },
            days_left=5,
            runs_out=today + timedelta(days=5),
            earliest_dispense=today,
        ),
        [],
        now=now,
    )

    def unchanged() -> None:
        current = store.get_draft(stack.engine, draft.id)
        assert current is not None
        assert (current.status, current.version) == ("pending", 1)
        assert [a.action for a in store.audit_trail(stack.engine, draft.id)] == ["created"]

    with browser() as pharmacist, browser() as prescriber, browser() as stranger:
        worklist = launch(stack, pharmacist, None, user=PHARMACIST)
        assert worklist.status_code == 200, text_of(worklist.text)[:1000]
        assert worklist.url.path.endswith("/worklist")
        sid = session_id(worklist)
        base = f"{stack.cds.base}/smart/s/{sid}"
        review = pharmacist.get(f"{base}/drafts/{draft.id}")
        assert review.status_code == 200, text_of(review.text)[:1000]
        forms = re.findall(r'name="csrf" value="([^"]+)"', review.text)
        csrf = stack.row(sid)["csrf"]
        assert forms and set(forms) == {csrf}

        other_sid = session_id(launch(stack, prescriber, "sb-p000002"))
        other_csrf = stack.row(other_sid)["csrf"]
        assert other_csrf != csrf
        reject = f"{base}/drafts/{draft.id}/reject"
        for form in ({}, {"csrf": ""}, {"csrf": other_csrf}, {"csrf": csrf[:-1]}):
            refused = pharmacist.post(reject, data={**form, "version": "1", "reason": "forged"})
            assert refused.status_code == 403
            assert "The form could not be accepted" in refused.text
            unchanged()
        elsewhere = stranger.post(reject, data={"csrf": csrf, "version": "1", "reason": "forged"})
        assert elsewhere.status_code == 401
        unchanged()

        done = pharmacist.post(reject, data={"csrf": csrf, "version": "1", "reason": "duplicate order"})
        assert done.status_code == 200
        assert done.url.path == f"/smart/s/{sid}/drafts/{draft.id}"
    decided = store.get_draft(stack.engine, draft.id)
    assert decided is not None
    assert decided.status == "rejected"
    assert decided.decision_reason == "duplicate order"


# --- 9. the EHR's banner and style -----------------------------------------------------------------------------


@pytest.mark.parametrize("banner", [True, False])
def test_the_patient_banner_is_shown_only_when_the_ehr_asks(stack: Stack, banner: bool) -> None:
    launch_id = stack.auth.create_launch(
        client_id=APP_CLIENT_ID, user=PRESCRIBER, patient="sb-p000001", need_patient_banner=banner
    )
    with browser() as client:
        page = client.get(stack.auth.launch_url(launch_id))
    assert page.status_code == 200
    assert page.url.path.endswith("/patient")
    assert ('aria-label="Patient"' in page.text) is banner
    assert (stack.patients["sb-p000001"] in page.text) is banner  # the name is the banner's


def test_the_ehrs_style_is_applied_sanitized_under_the_pages_nonce(stack: Stack) -> None:
    url = stack.config.smart_style_url  # `default_config` names the sandbox's own style document
    assert url is not None and url.startswith(f"{stack.base}/")
    document = httpx.get(url, trust_env=False, timeout=10).json()
    expected = sanitize_style(document)
    assert expected
    with browser() as client:
        page = launch(stack, client, "sb-p000000")
    assert page.status_code == 200
    match = re.search(r'<style nonce="([^"]+)">:root \{ (.*?)\}</style>', page.text)
    assert match, page.text[:1500]
    assert f"'nonce-{match.group(1)}'" in page.headers["content-security-policy"]
    declared = dict(d.strip().split(": ", 1) for d in match.group(2).split(";") if d.strip())
    assert declared == expected


def test_a_style_url_on_another_origin_is_never_fetched(stack: Stack) -> None:
    own = stack.config.smart_style_url
    stack.config.smart_style_url = f"{stack.counter.base}/style.json"
    try:
        with browser() as client:
            page = launch(stack, client, "sb-p000000")
    finally:
        stack.config.smart_style_url = own
    assert page.status_code == 200
    assert "<style" not in page.text
    assert stack.counter.hits == []
