"""The SMART client side (`smart_app.oauth`) without a network: PKCE, the authorization request, token answers
checked field by field, discovery, the code exchange's id_token checks, refresh, and the EHR's style document
(sanitized, and fetched from the EHR's own origin only). The EHR is an ``httpx.MockTransport``."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from smart_app.oauth import (
    DEFAULT_EXPIRES_IN,
    MAX_STYLE_BYTES,
    OAuthFailure,
    SmartOAuth,
    SmartServer,
    parse_token_answer,
    s256,
    sanitize_style,
)
from smart_app.sessions import AppSession, PendingLaunch, Tokens

T = TypeVar("T")
ISS = "https://ehr.example/fhir"
CLIENT = "imid-rems-app"
REDIRECT = "https://rems.example/smart/callback"
NOW = datetime(2026, 11, 21, 15, 0, tzinfo=UTC)
TITLE = "step"
HS_KEY = "a-test-key-that-is-long-enough-for-hs256!"
LAUNCH = PendingLaunch(
    iss=ISS,
    launch="launch-123",
    code_verifier="v" * 86,
    nonce="nonce-abc",
    token_endpoint="https://ehr.example/auth/token",  # noqa: S106 (a URL)
    scope="launch openid fhirUser patient/*.rs",
)
SMART_CONFIGURATION = {
    "authorization_endpoint": "https://ehr.example/auth/authorize",
    "token_endpoint": "https://ehr.example/auth/token",
    "code_challenge_methods_supported": ["S256"],
}


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Ehr:
    """A MockTransport EHR: answers with `answer(request)` and keeps every request."""

    def __init__(self, answer: Callable[[httpx.Request], httpx.Response]) -> None:
        self.answer = answer
        self.requests: list[httpx.Request] = []

    def oauth(self) -> SmartOAuth:
        def handler(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return self.answer(request)

        http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return SmartOAuth(http, client_id=CLIENT, redirect_uri=REDIRECT)


def json_answer(body: Any, status: int = 200) -> Ehr:
    return Ehr(lambda _: httpx.Response(status, json=body))


def token_answer(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": "at-1",
        "token_type": "Bearer",
        "expires_in": 3600,
        "scope": "launch openid fhirUser patient/*.rs",
        "refresh_token": "rt-1",
        "patient": "p-1",
    }
    for key, value in changes.items():
        if value is ...:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def id_token(**claims: Any) -> str:
    base: dict[str, Any] = {
        "iss": "https://ehr.example/auth",
        "sub": "Practitioner/onc-1",
        "aud": CLIENT,
        "nonce": LAUNCH.nonce,
        "fhirUser": "Practitioner/onc-1",
    }
    for key, value in claims.items():
        if value is ...:
            base.pop(key, None)
        else:
            base[key] = value
    return jwt.encode(base, HS_KEY, algorithm="HS256")


# --- PKCE and the authorization request -----------------------------------------------------------------------


def test_s256_is_rfc7636_appendix_b() -> None:
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


@pytest.mark.parametrize(
    ("endpoint", "launch", "separator"),
    [
        ("https://ehr.example/auth/authorize", "launch-123", "?"),
        ("https://ehr.example/auth/authorize?tenant=7", None, "&"),
    ],
)
def test_authorize_url_carries_pkce_state_aud_and_the_launch(endpoint: str, launch: str | None, separator: str) -> None:
    oauth = SmartOAuth(httpx.AsyncClient(), client_id=CLIENT, redirect_uri=REDIRECT)
    pending = dataclasses.replace(LAUNCH, launch=launch)
    url = oauth.authorize_url(SmartServer(ISS, endpoint, LAUNCH.token_endpoint), pending, state="s" * 43)
    assert url.startswith(endpoint + separator)
    query = parse_qs(urlsplit(url).query)
    assert all(len(v) == 1 for v in query.values())
    q = {k: v[0] for k, v in query.items()}
    expected = {
        "response_type": "code",
        "client_id": CLIENT,
        "redirect_uri": REDIRECT,
        "scope": LAUNCH.scope,
        "state": "s" * 43,
        "aud": ISS,
        "code_challenge": s256(LAUNCH.code_verifier),
        "code_challenge_method": "S256",
        "nonce": LAUNCH.nonce,
    }
    if launch is not None:
        expected["launch"] = launch
    if "tenant" in endpoint:
        expected["tenant"] = "7"
    assert q == expected


# --- token answers ---------------------------------------------------------------------------------------------


def test_a_complete_token_answer() -> None:
    answer = token_answer(token_type="bearer")  # noqa: S106 (a token type)
    tokens = parse_token_answer(answer, NOW, TITLE, previous_scope=None)
    assert tokens == Tokens("at-1", "rt-1", NOW + timedelta(seconds=3600), "launch openid fhirUser patient/*.rs")


def test_expires_in_absent_counts_as_five_minutes_and_scope_absent_keeps_the_previous_one() -> None:
    tokens = parse_token_answer(token_answer(expires_in=..., scope=...), NOW, TITLE, previous_scope="patient/*.rs")
    assert tokens.access_expires_at == NOW + timedelta(seconds=DEFAULT_EXPIRES_IN)
    assert tokens.scope == "patient/*.rs"


def test_an_empty_refresh_token_counts_as_none() -> None:
    assert parse_token_answer(token_answer(refresh_token=""), NOW, TITLE, previous_scope=None).refresh_token is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"access_token": ...}, "access_token"),
        ({"access_token": ""}, "access_token"),
        ({"access_token": 12}, "access_token"),
        ({"token_type": "mac"}, "token_type"),
        ({"token_type": ...}, "token_type"),
        ({"expires_in": "x"}, "expires_in"),
        ({"expires_in": "3600"}, "expires_in"),
        ({"expires_in": 0}, "expires_in"),
        ({"expires_in": -5}, "expires_in"),
        ({"expires_in": True}, "expires_in"),
        ({"expires_in": 1e20}, "expires_in"),
        ({"scope": ...}, "scope"),
        ({"scope": ["patient/*.rs"]}, "scope"),
        ({"refresh_token": 5}, "refresh_token"),
    ],
)
def test_a_wrong_token_answer_field_is_named(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(OAuthFailure) as failure:
        parse_token_answer(token_answer(**changes), NOW, "The EHR did not hand over access", previous_scope=None)
    assert field in str(failure.value)
    assert failure.value.title == "The EHR did not hand over access"
    assert "at-1" not in str(failure.value) and "rt-1" not in str(failure.value)


# --- discovery -------------------------------------------------------------------------------------------------


def test_discovery_reads_the_endpoints_once_per_iss() -> None:
    ehr = json_answer(SMART_CONFIGURATION)
    oauth = ehr.oauth()
    server = run(oauth.discover(ISS))
    assert server == SmartServer(ISS, SMART_CONFIGURATION["authorization_endpoint"], LAUNCH.token_endpoint)
    assert run(oauth.discover(ISS)) is server
    assert [str(r.url) for r in ehr.requests] == [f"{ISS}/.well-known/smart-configuration"]


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"code_challenge_methods_supported": ["plain"]}, "S256"),
        ({"code_challenge_methods_supported": "S256 plain"}, "S256"),
        ({"code_challenge_methods_supported": ...}, "S256"),
        ({"token_endpoint": "/auth/token"}, "token_endpoint"),
        ({"token_endpoint": "javascript:alert(1)"}, "token_endpoint"),
        ({"token_endpoint": ...}, "token_endpoint"),
        ({"authorization_endpoint": 42}, "authorization_endpoint"),
    ],
)
def test_discovery_refuses_a_configuration_without_s256_or_urls(changes: dict[str, Any], named: str) -> None:
    body = {k: v for k, v in {**SMART_CONFIGURATION, **changes}.items() if v is not ...}
    oauth = json_answer(body).oauth()
    with pytest.raises(OAuthFailure) as failure:
        run(oauth.discover(ISS))
    assert named in str(failure.value)
    assert failure.value.status == 502
    with pytest.raises(OAuthFailure):  # a refusal is not cached as a success
        run(oauth.discover(ISS))


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (httpx.Response(200, text="<html>"), "did not answer with a JSON object"),
        (httpx.Response(200, json=["a"]), "did not answer with a JSON object"),
        (httpx.Response(500, text="oops"), "HTTP 500"),
    ],
)
def test_discovery_says_what_the_ehr_answered(answer: httpx.Response, detail: str) -> None:
    with pytest.raises(OAuthFailure, match=detail):
        run(Ehr(lambda _: answer).oauth().discover(ISS))


def test_an_unreachable_ehr_is_a_failure_not_an_exception() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(OAuthFailure, match="could not be reached"):
        run(Ehr(down).oauth().discover(ISS))


# --- the code exchange -----------------------------------------------------------------------------------------


def test_the_exchange_posts_the_verifier_and_reads_the_launch_context() -> None:
    body = token_answer(
        id_token=id_token(fhirUser="https://ehr.example/fhir/Practitioner/onc-1"),
        need_patient_banner=False,
        smart_style_url="https://ehr.example/style.json",
        appContext='{"view": "patient"}',
        encounter="e-1",
    )
    ehr = json_answer(body)
    grant = run(ehr.oauth().exchange(LAUNCH, "code-1", NOW))
    assert grant.tokens.access_token == "at-1"  # noqa: S105 (a test value)
    assert grant.patient == "p-1"
    assert grant.encounter == "e-1"
    assert grant.fhir_user == "Practitioner/onc-1"
    assert grant.need_patient_banner is False
    assert grant.smart_style_url == "https://ehr.example/style.json"
    assert grant.app_context == '{"view": "patient"}'
    (request,) = ehr.requests
    assert str(request.url) == LAUNCH.token_endpoint and request.method == "POST"
    form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
    assert form == {
        "grant_type": "authorization_code",
        "code": "code-1",
        "redirect_uri": REDIRECT,
        "client_id": CLIENT,
        "code_verifier": LAUNCH.code_verifier,
    }


def test_an_id_token_whose_aud_lists_the_client_among_others_is_accepted() -> None:
    grant = run(json_answer(token_answer(id_token=id_token(aud=["other", CLIENT]))).oauth().exchange(LAUNCH, "c", NOW))
    assert grant.fhir_user == "Practitioner/onc-1"


@pytest.mark.parametrize(
    ("changes", "detail"),
    [
        ({"id_token": id_token(aud="another-app")}, "aud"),
        ({"id_token": id_token(aud=["a", "b"])}, "aud"),
        ({"id_token": id_token(nonce="another-nonce")}, "nonce"),
        ({"id_token": id_token(nonce=...)}, "nonce"),
        ({"id_token": id_token(fhirUser="Organization/1")}, "fhirUser"),
        ({"id_token": "not.a.jwt"}, "not a JWT"),
        ({"id_token": 7}, "id_token"),
        ({"patient": "Patient/p-1"}, "patient"),
        ({"patient": "../p-1?x"}, "patient"),
        ({"patient": 12}, "patient"),
        ({"need_patient_banner": "false"}, "need_patient_banner"),
        ({"smart_style_url": 5}, "smart_style_url"),
        ({"access_token": ...}, "access_token"),
    ],
)
def test_the_exchange_refuses_an_answer_meant_for_someone_else_or_malformed(
    changes: dict[str, Any], detail: str
) -> None:
    oauth = json_answer(token_answer(**{"id_token": id_token(), **changes})).oauth()
    with pytest.raises(OAuthFailure) as failure:
        run(oauth.exchange(LAUNCH, "code-1", NOW))
    assert detail in str(failure.value)
    assert failure.value.title == "The EHR did not hand over access"


def test_a_refused_exchange_carries_the_ehrs_error_and_is_marked_refused() -> None:
    answer = {"error": "invalid_grant", "error_description": "code_verifier does not match"}
    with pytest.raises(OAuthFailure) as failure:
        run(json_answer(answer, 400).oauth().exchange(LAUNCH, "code-1", NOW))
    assert failure.value.refused
    assert "invalid_grant: code_verifier does not match" in str(failure.value)
    with pytest.raises(OAuthFailure) as unavailable:
        run(json_answer({"error": "temporarily_unavailable"}, 503).oauth().exchange(LAUNCH, "code-1", NOW))
    assert not unavailable.value.refused


# --- refresh ---------------------------------------------------------------------------------------------------


def session(refresh_token: str | None = "rt-1") -> AppSession:  # noqa: S107 (a test value)
    return AppSession(
        id="sid",
        iss=ISS,
        token_endpoint=LAUNCH.token_endpoint,
        tokens=Tokens("at-1", refresh_token, NOW + timedelta(seconds=60), "patient/*.rs offline_access"),
        patient="p-1",
        encounter=None,
        fhir_user="Practitioner/onc-1",
        need_patient_banner=True,
        style=None,
        app_context=None,
        csrf="c" * 43,
        version=1,
        expires_at=NOW + timedelta(hours=12),
    )


def test_refresh_sends_the_refresh_token_and_keeps_it_when_not_rotated() -> None:
    ehr = json_answer({"access_token": "at-2", "token_type": "Bearer", "expires_in": 600})
    tokens = run(ehr.oauth().refresh(session(), NOW))
    assert tokens == Tokens("at-2", "rt-1", NOW + timedelta(seconds=600), "patient/*.rs offline_access")
    form = {k: v[0] for k, v in parse_qs(ehr.requests[0].content.decode()).items()}
    assert form == {"grant_type": "refresh_token", "refresh_token": "rt-1", "client_id": CLIENT}


def test_refresh_without_a_refresh_token_is_refused_without_a_request() -> None:
    ehr = json_answer({})
    with pytest.raises(OAuthFailure) as failure:
        run(ehr.oauth().refresh(session(refresh_token=None), NOW))
    assert failure.value.refused and failure.value.status == 401
    assert ehr.requests == []


# --- style -----------------------------------------------------------------------------------------------------


def test_sanitize_style_keeps_plain_values_as_custom_properties() -> None:
    style = sanitize_style(
        {
            "color_background": "#336699",
            "color_text": " rgba(0, 0, 0, 0.8) ",
            "color_error": "darkred",
            "dim_font_size": "12px",
            "dim_border_radius": 4,
            "dim_spacing_size": 1.5,
            "font_family_body": "DejaVu Sans, Helvetica, Arial, sans-serif",
            "font_family_heading": "Georgia, Times, 'Times New Roman', serif",
            "unknown_key": "#000",
        }
    )
    assert style == {
        "--ehr-background": "#336699",
        "--ehr-text": "rgba(0, 0, 0, 0.8)",
        "--ehr-error": "darkred",
        "--ehr-font-size": "12px",
        "--ehr-radius": "4px",
        "--ehr-spacing": "1.5px",
        "--ehr-font-body": "DejaVu Sans, Helvetica, Arial, sans-serif",
        # quotes would reach the stylesheet HTML-escaped (&#39;): unquoted family names are the same fonts
        "--ehr-font-heading": "Georgia, Times, Times New Roman, serif",
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("color_background", "url(javascript:alert(1))"),
        ("color_background", "url(https://evil.example/x.png)"),
        ("color_text", "expression(alert(1))"),
        ("color_text", "red;} body { background: url(https://evil.example/)"),
        ("color_text", "red; --x: 1"),
        ("font_family_body", "''"),
        ("color_success", "#336699 !important"),
        ("dim_font_size", "12px;}"),
        ("dim_font_size", "calc(100vw)"),
        ("dim_font_size", 12345),
        ("dim_font_size", True),
        ("dim_spacing_size", "12pt"),
        ("font_family_body", "Arial;} * { display: none"),
        ("font_family_body", "</style><script>alert(1)</script>"),
        ("font_family_body", "Arial\\3b"),
        ("font_family_body", 5),
        ("color_background", ["#fff"]),
    ],
)
def test_sanitize_style_drops_anything_but_plain_values(key: str, value: Any) -> None:
    assert sanitize_style({key: value}) == {}


STYLE_URL = "https://ehr.example/ehr/style.json"


def test_the_style_document_is_fetched_from_the_ehrs_origin_and_sanitized() -> None:
    ehr = json_answer({"color_highlight": "#5b2a86", "color_text": "url(javascript:x)"})
    assert run(ehr.oauth().style(STYLE_URL, ISS)) == {"--ehr-highlight": "#5b2a86"}
    assert [str(r.url) for r in ehr.requests] == [STYLE_URL]


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example/style.json",
        "https://ehr.example:8443/style.json",
        "http://ehr.example/style.json",
        "https://ehr.example.evil.example/style.json",
        "https://user@ehr.example/style.json",
    ],
)
def test_a_style_url_off_the_ehrs_origin_is_never_fetched(url: str) -> None:
    ehr = json_answer({"color_highlight": "#5b2a86"})
    assert run(ehr.oauth().style(url, ISS)) is None
    assert ehr.requests == []


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(404, json={"color_highlight": "#5b2a86"}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json=["#5b2a86"]),
        httpx.Response(200, json={"color_highlight": "#5b2a86", "pad": "x" * MAX_STYLE_BYTES}),
    ],
)
def test_an_unusable_style_document_is_ignored(answer: httpx.Response) -> None:
    assert run(Ehr(lambda _: answer).oauth().style(STYLE_URL, ISS)) is None
