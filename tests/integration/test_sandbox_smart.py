"""The sandbox SMART authorization server and FHIR gateway, over real HTTP against the Medplum engine.

One app (the `SmartAuthServer` router + the gateway router) runs under uvicorn for the module, in front of its own
FHIR server loaded with two patients. Every SMART App Launch 2.2 step is driven the way a browser app or a backend
service would: EHR launch, standalone launch through the picker page, PKCE, token exchange, refresh, SMART Backend
Services assertions, and then FHIR calls through the gateway with the scopes granted. The clock is the config's:
tests move it to expire codes and tokens (an autouse fixture puts it back).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from fastapi import FastAPI

from sandbox import gateway
from sandbox.config import Launches, SandboxConfig, SmartClient, TokenAuth
from sandbox.fhir_engine import FHIR_JSON, post_bundle, start_fhir_server
from sandbox.smart_auth import JWT_BEARER, SmartAuthServer, TokenError
from tests.support.cds_server import Clock, free_port, serve_app
from tests.support.jwt_keys import SigningKey, ec_key, jwks, rsa_key, sign

REDIRECT = "https://app.example.org/after-auth"
OTHER_REDIRECT = "https://app.example.org/other-callback"
LAUNCH_URL = "https://app.example.org/launch"
PUBLIC = "public-app"
CONFIDENTIAL = "confidential-app"
ASYMMETRIC = "asymmetric-app"
BACKEND = "backend-service"
BACKEND_JKU = "backend-jku"
CDS = "imid-rems-cds"
WRITER = "ehr-writer"
SECRET = "the-confidential-app-secret"  # noqa: S105 (a test value)
APP_SCOPE = "launch launch/patient openid fhirUser offline_access online_access patient/*.rs user/*.rs"
TEST_CODE = "sandbox-smart-test"
BEARER = "Bearer"
PRIVATE_KEY_JWT: TokenAuth = "private_key_jwt"
CLIENT_SECRET_BASIC: TokenAuth = "client_secret_basic"  # noqa: S105 (a method name)


@dataclass
class Sandbox:
    base: str
    config: SandboxConfig
    auth: SmartAuthServer
    clock: Clock
    patient: str
    other_patient: str
    practitioner: str
    observations: list[str]
    other_observation: str
    medication_request: str
    backend_ec: SigningKey
    backend_rsa: SigningKey
    jku_key: SigningKey
    asymmetric_key: SigningKey

    @property
    def fhir_base(self) -> str:
        return self.config.fhir_base

    @property
    def token_url(self) -> str:
        return f"{self.base}/auth/token"

    @property
    def authorize_url(self) -> str:
        return f"{self.base}/auth/authorize"

    @property
    def introspect_url(self) -> str:
        return f"{self.base}/auth/introspect"


def _id_from_location(location: str) -> str:
    return location.split("/_history/")[0].rstrip("/").split("/")[-1]


def _load(base: str) -> dict[str, Any]:
    practitioner, patient, other = (f"urn:uuid:{uuid.uuid4()}" for _ in range(3))

    def observation(subject: str, day: int, performer: str | None = None) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "urn:test", "code": TEST_CODE}]},
            "subject": {"reference": subject},
            "effectiveDateTime": f"2026-03-{day:02d}T09:00:00Z",
            "valueString": "negative",
        }
        if performer:
            resource["performer"] = [{"reference": performer}]
        return resource

    resources: list[tuple[str, dict[str, Any]]] = [
        (practitioner, {"resourceType": "Practitioner", "name": [{"family": "Hematologist", "given": ["Hana"]}]}),
        (
            patient,
            {"resourceType": "Patient", "name": [{"family": "Own", "given": ["Olivia"]}], "birthDate": "1970-01-02"},
        ),
        (other, {"resourceType": "Patient", "name": [{"family": "Other", "given": ["Oscar"]}]}),
    ]
    resources += [(f"urn:uuid:{uuid.uuid4()}", observation(patient, day, practitioner)) for day in range(1, 6)]
    # an own Observation whose performer is the *other* patient: an _include must not leak that Patient
    resources[3][1]["performer"].append({"reference": other})
    resources.append((f"urn:uuid:{uuid.uuid4()}", observation(other, 7)))
    medication_request = {
        "resourceType": "MedicationRequest",
        "status": "active",
        "intent": "order",
        "medicationCodeableConcept": {"text": "lenalidomide 10 mg capsule"},
        "subject": {"reference": patient},
    }
    resources.append((f"urn:uuid:{uuid.uuid4()}", medication_request))
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"fullUrl": full_url, "resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
            for full_url, r in resources
        ],
    }
    ids = [_id_from_location(e["response"]["location"]) for e in post_bundle(base, bundle)["entry"]]
    return {
        "practitioner": f"Practitioner/{ids[0]}",
        "patient": ids[1],
        "other_patient": ids[2],
        "observations": ids[3:8],
        "other_observation": ids[8],
        "medication_request": ids[9],
    }


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    backend_ec, backend_rsa = ec_key("backend-ec"), rsa_key("backend-rsa")
    jku_key, asymmetric_key = ec_key("jku-1"), ec_key("asym-1")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    clients = (
        SmartClient(PUBLIC, (REDIRECT, OTHER_REDIRECT), launch_url=LAUNCH_URL, scope=APP_SCOPE, name="Public app"),
        SmartClient(
            CONFIDENTIAL,
            (REDIRECT,),
            token_endpoint_auth_method=CLIENT_SECRET_BASIC,
            client_secret=SECRET,
            scope="launch openid fhirUser patient/*.rs",
        ),
        SmartClient(
            ASYMMETRIC,
            (REDIRECT,),
            token_endpoint_auth_method=PRIVATE_KEY_JWT,
            jwks=jwks(asymmetric_key),
            scope="launch patient/*.rs system/*.rs",
        ),
        SmartClient(
            BACKEND,
            token_endpoint_auth_method=PRIVATE_KEY_JWT,
            jwks=jwks(backend_ec, backend_rsa),
            scope="system/*.rs system/MedicationRequest.c",
            backend=True,
        ),
        SmartClient(
            BACKEND_JKU,
            token_endpoint_auth_method=PRIVATE_KEY_JWT,
            jwks_url=f"{base}/test-client/jwks.json",
            scope="system/Patient.rs",
            backend=True,
        ),
        SmartClient(CDS, scope="patient/*.rs user/*.rs"),
        SmartClient(WRITER, scope="patient/*.cruds user/*.cruds"),
    )
    with start_fhir_server() as fhir:
        ids = _load(fhir.base)
        clock = Clock()
        config = SandboxConfig(
            base_url=base,
            fhir_upstream=fhir.base,
            clients=clients,
            now=clock,
            smart_style_url=f"{base}/ehr/smart-style.json",
        )
        auth = SmartAuthServer(config)
        app = FastAPI()
        app.include_router(auth.router())
        app.include_router(gateway.router(config, auth))

        @app.get("/test-client/jwks.json")
        def client_jwks() -> dict[str, Any]:
            return jwks(jku_key)

        with serve_app(app, port):
            yield Sandbox(
                base=base,
                config=config,
                auth=auth,
                clock=clock,
                backend_ec=backend_ec,
                backend_rsa=backend_rsa,
                jku_key=jku_key,
                asymmetric_key=asymmetric_key,
                **ids,
            )


@pytest.fixture(autouse=True)
def real_time(sandbox: Sandbox) -> Iterator[None]:
    sandbox.clock.now = datetime.now(UTC)
    yield
    sandbox.clock.now = datetime.now(UTC)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(follow_redirects=False, timeout=15.0, trust_env=False) as client:
        yield client


# --- helpers -----------------------------------------------------------------------------------------------------


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}


def auth_params(sb: Sandbox, challenge: str, **overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "response_type": "code",
        "client_id": PUBLIC,
        "redirect_uri": REDIRECT,
        "scope": "launch openid fhirUser patient/*.rs offline_access",
        "state": secrets.token_urlsafe(16),
        "aud": sb.fhir_base,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        **overrides,
    }
    return {k: v for k, v in params.items() if v is not None}


def launch(sb: Sandbox, client_id: str = PUBLIC, **context: Any) -> str:
    context.setdefault("patient", sb.patient)
    return sb.auth.create_launch(client_id=client_id, user=sb.practitioner, **context)


def ehr_code(sb: Sandbox, http: httpx.Client, **overrides: str | None) -> tuple[str, str]:
    """Run an EHR launch's authorization request; return (code, code_verifier)."""
    verifier, challenge = pkce()
    params = auth_params(sb, challenge, **overrides)
    params.setdefault("launch", launch(sb, params["client_id"]))
    response = http.get(sb.authorize_url, params=params)
    assert response.status_code == 302, response.text
    answer = query(response.headers["location"])
    assert answer["state"] == params["state"] and "error" not in answer
    return answer["code"], verifier


def token(http: httpx.Client, sb: Sandbox, data: dict[str, str], **kwargs: Any) -> httpx.Response:
    return http.post(sb.token_url, data=data, **kwargs)


def exchange(
    http: httpx.Client, sb: Sandbox, code: str, verifier: str, *, client_id: str = PUBLIC, redirect_uri: str = REDIRECT
) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    data["client_id"] = client_id
    return token(http, sb, data)


def tokens(sb: Sandbox, http: httpx.Client, **overrides: str | None) -> dict[str, Any]:
    code, verifier = ehr_code(sb, http, **overrides)
    response = exchange(http, sb, code, verifier, client_id=overrides.get("client_id") or PUBLIC)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def fhir_get(http: httpx.Client, url: str, access_token: str | None, **params: str) -> httpx.Response:
    headers = {"Accept": FHIR_JSON}
    if access_token is not None:
        headers["Authorization"] = f"Bearer {access_token}"
    return http.get(url, params=params or None, headers=headers)


def oauth_error(response: httpx.Response, status: int, error: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["error"] == error, body
    assert "access_token" not in body
    description: str = body["error_description"]
    return description


def outcome_text(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    text: str = body["issue"][0]["diagnostics"]
    return text


def assertion(sb: Sandbox, key: SigningKey, client_id: str = BACKEND, **kwargs: Any) -> str:
    kwargs.setdefault("aud", sb.token_url)
    kwargs.setdefault("now", sb.clock.now)
    claims = {"sub": client_id, **kwargs.pop("claims", {})}
    return sign(key, iss=client_id, claims=claims, **kwargs)


def client_credentials(http: httpx.Client, sb: Sandbox, jwt_assertion: str, scope: str, **extra: str) -> httpx.Response:
    data = {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": jwt_assertion,
        **extra,
    }
    return token(http, sb, data)


def entry_resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def next_link(bundle: dict[str, Any]) -> str | None:
    return next((link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None)


def introspect(http: httpx.Client, sb: Sandbox, value: str, **kwargs: Any) -> httpx.Response:
    """POST /auth/introspect with ``token=value``; ``data`` in `kwargs` adds form fields, the rest go to httpx."""
    data = {"token": value, **kwargs.pop("data", {})}
    return http.post(sb.introspect_url, data=data, **kwargs)


def backend_form(sb: Sandbox, key: SigningKey | None = None, **assertion_kwargs: Any) -> dict[str, str]:
    """The form fields of a private_key_jwt caller: the backend service's assertion for the introspection endpoint."""
    assertion_kwargs.setdefault("aud", sb.introspect_url)
    signed = assertion(sb, key or sb.backend_ec, **assertion_kwargs)
    return {"client_assertion_type": JWT_BEARER, "client_assertion": signed}


def introspected(http: httpx.Client, sb: Sandbox, value: str, **data: str) -> dict[str, Any]:
    """What the backend service (private_key_jwt) learns about `value`; the call must succeed."""
    response = introspect(http, sb, value, data={**backend_form(sb), **data})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    return body


# --- discovery ---------------------------------------------------------------------------------------------------


def test_smart_configuration_is_served_under_the_fhir_base(sandbox: Sandbox, http: httpx.Client) -> None:
    response = http.get(f"{sandbox.fhir_base}/.well-known/smart-configuration", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    config = response.json()
    base = sandbox.base
    assert config["authorization_endpoint"] == f"{base}/auth/authorize"
    assert config["token_endpoint"] == f"{base}/auth/token"
    assert config["jwks_uri"] == f"{base}/auth/jwks"
    assert config["issuer"] == f"{base}/auth"
    assert config["introspection_endpoint"] == f"{base}/auth/introspect"
    assert set(config["introspection_endpoint_auth_methods_supported"]) == {
        "client_secret_basic",
        "private_key_jwt",
        "Bearer",
    }
    assert config["code_challenge_methods_supported"] == ["S256"]
    assert config["response_types_supported"] == ["code"]
    assert set(config["grant_types_supported"]) == {"authorization_code", "refresh_token", "client_credentials"}
    assert {"client_secret_basic", "private_key_jwt"} <= set(config["token_endpoint_auth_methods_supported"])
    assert {"RS384", "ES384"} <= set(config["token_endpoint_auth_signing_alg_values_supported"])
    assert {"launch", "launch/patient", "openid", "fhirUser", "offline_access", "patient/*.rs"} <= set(
        config["scopes_supported"]
    )
    expected = {
        "launch-ehr",
        "launch-standalone",
        "authorize-post",
        "client-public",
        "client-confidential-symmetric",
        "client-confidential-asymmetric",
        "sso-openid-connect",
        "context-banner",
        "context-style",  # smart_style_url is configured
        "context-ehr-patient",
        "context-ehr-encounter",
        "context-standalone-patient",
        "permission-offline",
        "permission-online",
        "permission-patient",
        "permission-user",
        "permission-v1",
        "permission-v2",
    }
    assert set(config["capabilities"]) == expected
    oidc = http.get(f"{config['issuer']}/.well-known/openid-configuration").json()
    assert oidc["issuer"] == config["issuer"] and oidc["jwks_uri"] == config["jwks_uri"]
    keys = http.get(config["jwks_uri"]).json()["keys"]
    assert [k["kty"] for k in keys] == ["RSA"] and "d" not in keys[0] and keys[0]["kid"]


# --- EHR launch --------------------------------------------------------------------------------------------------


def test_ehr_launch_end_to_end(sandbox: Sandbox, http: httpx.Client) -> None:
    launches: Launches = sandbox.auth  # what the EHR pages see, through the config's protocol
    launch_id = launches.create_launch(
        client_id=PUBLIC,
        user=sandbox.practitioner,
        patient=sandbox.patient,
        encounter="enc-1",
        app_context='{"order": "MedicationRequest/1"}',
    )
    assert sandbox.auth.launch_url(launch_id).startswith(LAUNCH_URL)
    launch_id = launch(
        sandbox,
        encounter="enc-1",
        app_context='{"order": "MedicationRequest/1"}',
        fhir_context=[f"MedicationRequest/{sandbox.medication_request}"],
    )
    expected_url = f"{LAUNCH_URL}?" + str(httpx.QueryParams({"iss": sandbox.fhir_base, "launch": launch_id}))
    assert sandbox.auth.launch_url(launch_id) == expected_url
    verifier, challenge = pkce()
    params = auth_params(sandbox, challenge, launch=launch_id, nonce="n-0S6_WzA2Mj")
    response = http.get(sandbox.authorize_url, params=params)
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    answer = query(location)
    assert answer["state"] == params["state"]

    response = exchange(http, sandbox, answer["code"], verifier)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store" and response.headers["pragma"] == "no-cache"
    body = response.json()
    assert body["token_type"] == BEARER
    assert body["expires_in"] == sandbox.config.access_token_lifetime_s
    assert set(body["scope"].split()) == {"launch", "openid", "fhirUser", "patient/*.rs", "offline_access"}
    assert body["patient"] == sandbox.patient
    assert body["encounter"] == "enc-1"
    assert body["fhirUser"] == sandbox.practitioner
    assert body["need_patient_banner"] is True
    assert body["smart_style_url"] == sandbox.config.smart_style_url
    assert body["fhirContext"] == [{"reference": f"MedicationRequest/{sandbox.medication_request}"}]
    assert body["appContext"] == '{"order": "MedicationRequest/1"}'
    assert body["refresh_token"] and body["refresh_token"] != body["access_token"]

    header = jwt.get_unverified_header(body["id_token"])
    keys = http.get(f"{sandbox.base}/auth/jwks").json()["keys"]
    (jwk,) = [k for k in keys if k["kid"] == header["kid"]]
    claims = jwt.decode(
        body["id_token"],
        jwt.PyJWK(jwk).key,
        algorithms=["RS256"],
        audience=PUBLIC,
        issuer=f"{sandbox.base}/auth",
    )
    assert claims["fhirUser"] == sandbox.practitioner and claims["sub"] == sandbox.practitioner
    assert claims["nonce"] == "n-0S6_WzA2Mj" and claims["exp"] > claims["iat"]

    read = fhir_get(http, f"{sandbox.fhir_base}/Patient/{sandbox.patient}", body["access_token"])
    assert read.status_code == 200, read.text
    assert read.headers["content-type"].startswith(FHIR_JSON)
    assert read.json()["id"] == sandbox.patient and read.json()["name"][0]["family"] == "Own"


def test_state_is_echoed_unchanged(sandbox: Sandbox, http: httpx.Client) -> None:
    state = "a b+c/d?e=f&g=h%20ü~" + secrets.token_urlsafe(8)
    code, verifier = ehr_code(sandbox, http, state=state)
    assert exchange(http, sandbox, code, verifier).status_code == 200


def test_authorization_request_may_be_posted(sandbox: Sandbox, http: httpx.Client) -> None:
    verifier, challenge = pkce()
    params = auth_params(sandbox, challenge, launch=launch(sandbox))
    response = http.post(sandbox.authorize_url, data=params)
    assert response.status_code == 303
    answer = query(response.headers["location"])
    assert answer["state"] == params["state"]
    assert exchange(http, sandbox, answer["code"], verifier).json()["patient"] == sandbox.patient


def test_wrong_code_verifier_is_invalid_grant_and_burns_the_code(sandbox: Sandbox, http: httpx.Client) -> None:
    code, verifier = ehr_code(sandbox, http)
    description = oauth_error(exchange(http, sandbox, code, pkce()[0]), 400, "invalid_grant")
    assert "code_verifier" in description
    oauth_error(exchange(http, sandbox, code, verifier), 400, "invalid_grant")


def test_wrong_aud_is_an_error_redirect_with_the_state(sandbox: Sandbox, http: httpx.Client) -> None:
    for aud in ("https://evil.example.org/fhir", f"{sandbox.base}/fhir/R4", None):
        _, challenge = pkce()
        params = auth_params(sandbox, challenge, aud=aud, launch=launch(sandbox))
        response = http.get(sandbox.authorize_url, params=params)
        assert response.status_code == 302
        answer = query(response.headers["location"])
        assert response.headers["location"].startswith(REDIRECT)
        assert answer["error"] == "invalid_request" and "aud" in answer["error_description"]
        assert answer["state"] == params["state"] and "code" not in answer


@pytest.mark.parametrize(
    "pkce_params",
    [
        {"code_challenge": None},
        {"code_challenge_method": None},
        {"code_challenge_method": "plain"},
        {"code_challenge": "too-short"},
    ],
    ids=["no-challenge", "no-method", "plain", "malformed"],
)
def test_pkce_with_s256_is_required(sandbox: Sandbox, http: httpx.Client, pkce_params: dict[str, str | None]) -> None:
    _, challenge = pkce()
    params = auth_params(sandbox, challenge, launch=launch(sandbox), **pkce_params)
    response = http.get(sandbox.authorize_url, params=params)
    assert response.status_code == 302
    answer = query(response.headers["location"])
    assert answer["error"] == "invalid_request" and "code" not in answer and answer["state"] == params["state"]


def test_launch_must_be_known_for_this_client_unused_and_fresh(sandbox: Sandbox, http: httpx.Client) -> None:
    def attempt(launch_id: str) -> dict[str, str]:
        _, challenge = pkce()
        response = http.get(sandbox.authorize_url, params=auth_params(sandbox, challenge, launch=launch_id))
        assert response.status_code == 302
        return query(response.headers["location"])

    assert attempt("no-such-launch")["error"] == "invalid_request"
    assert attempt(launch(sandbox, CONFIDENTIAL))["error"] == "invalid_request"  # made for another client
    once = launch(sandbox)
    assert "code" in attempt(once)
    assert attempt(once)["error"] == "invalid_request"  # single use
    stale = launch(sandbox)
    sandbox.clock.now += timedelta(minutes=11)
    assert "expired" in attempt(stale)["error_description"]
    with pytest.raises(ValueError, match="no SMART client"):
        sandbox.auth.create_launch(client_id="nobody", user=sandbox.practitioner, patient=sandbox.patient)


@pytest.mark.parametrize(
    "overrides",
    [
        {"client_id": "unknown-app"},
        {"client_id": None},
        {"redirect_uri": "https://evil.example.org/after-auth"},
        {"redirect_uri": REDIRECT + "/more"},
        {"redirect_uri": None},
    ],
    ids=["unknown-client", "no-client", "foreign-redirect", "prefix-redirect", "no-redirect"],
)
def test_bad_client_or_redirect_uri_never_redirects(
    sandbox: Sandbox, http: httpx.Client, overrides: dict[str, str | None]
) -> None:
    _, challenge = pkce()
    params = auth_params(sandbox, challenge, launch=launch(sandbox), **overrides)
    page = http.get(sandbox.authorize_url, params=params)
    assert page.status_code == 400 and "location" not in page.headers
    assert page.headers["content-type"].startswith("text/html")
    assert "invalid_request" in page.text
    as_json = http.get(sandbox.authorize_url, params=params, headers={"Accept": "application/json"})
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"


def test_redirect_uri_must_match_at_the_token_endpoint(sandbox: Sandbox, http: httpx.Client) -> None:
    code, verifier = ehr_code(sandbox, http)
    response = exchange(http, sandbox, code, verifier, redirect_uri=OTHER_REDIRECT)
    assert "redirect_uri" in oauth_error(response, 400, "invalid_grant")


def test_replayed_code_is_refused_and_revokes_the_tokens_issued_from_it(sandbox: Sandbox, http: httpx.Client) -> None:
    code, verifier = ehr_code(sandbox, http)
    first = exchange(http, sandbox, code, verifier).json()
    patient_url = f"{sandbox.fhir_base}/Patient/{sandbox.patient}"
    assert fhir_get(http, patient_url, first["access_token"]).status_code == 200
    description = oauth_error(exchange(http, sandbox, code, verifier), 400, "invalid_grant")
    assert "already used" in description
    revoked = fhir_get(http, patient_url, first["access_token"])
    assert revoked.status_code == 401 and "revoked" in outcome_text(revoked)
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": PUBLIC}
    oauth_error(token(http, sandbox, refresh), 400, "invalid_grant")


def test_code_expires(sandbox: Sandbox, http: httpx.Client) -> None:
    code, verifier = ehr_code(sandbox, http)
    sandbox.clock.now += timedelta(seconds=sandbox.config.code_lifetime_s + 1)
    assert "expired" in oauth_error(exchange(http, sandbox, code, verifier), 400, "invalid_grant")


def test_expired_access_token_is_401_at_the_gateway(sandbox: Sandbox, http: httpx.Client) -> None:
    body = tokens(sandbox, http)
    url = f"{sandbox.fhir_base}/Patient/{sandbox.patient}"
    assert fhir_get(http, url, body["access_token"]).status_code == 200
    sandbox.clock.now += timedelta(seconds=body["expires_in"] + 1)
    response = fhir_get(http, url, body["access_token"])
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert "expired" in outcome_text(response)
    with pytest.raises(TokenError, match="expired"):
        sandbox.auth.check_access_token(body["access_token"])


def test_gateway_needs_a_bearer_token_except_for_metadata(sandbox: Sandbox, http: httpx.Client) -> None:
    url = f"{sandbox.fhir_base}/Patient/{sandbox.patient}"
    missing = fhir_get(http, url, None)
    assert missing.status_code == 401 and missing.headers["www-authenticate"].startswith("Bearer")
    assert "Bearer" in outcome_text(missing)
    unknown = fhir_get(http, url, "not-a-token")
    assert unknown.status_code == 401 and "unknown" in outcome_text(unknown)
    basic = http.get(url, headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert basic.status_code == 401
    metadata = fhir_get(http, f"{sandbox.fhir_base}/metadata", None)
    assert metadata.status_code == 200 and metadata.json()["resourceType"] == "CapabilityStatement"
    with pytest.raises(TokenError, match="unknown"):
        sandbox.auth.check_access_token("not-a-token")


# --- standalone launch -------------------------------------------------------------------------------------------


def _picker(sandbox: Sandbox, http: httpx.Client, scope: str) -> tuple[httpx.Response, dict[str, str], str]:
    verifier, challenge = pkce()
    params = auth_params(sandbox, challenge, scope=scope)
    page = http.get(sandbox.authorize_url, params=params)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    txn = re.search(r'name="_txn" value="([^"]+)"', page.text)
    assert txn is not None
    return page, {**params, "_txn": txn.group(1)}, verifier


def test_standalone_launch_through_the_picker_page(sandbox: Sandbox, http: httpx.Client) -> None:
    page, params, verifier = _picker(sandbox, http, "launch/patient openid fhirUser patient/*.rs")
    assert f'value="{sandbox.practitioner}"' in page.text and "Hana Hematologist" in page.text
    assert f'value="{sandbox.patient}"' in page.text and "Olivia Own" in page.text
    form = {"_txn": params["_txn"], "user": sandbox.practitioner, "decision": "allow"}

    wrong = http.post(sandbox.authorize_url, data={**form, "patient": "no-such-patient"})
    assert wrong.status_code == 400 and "location" not in wrong.headers and 'role="alert"' in wrong.text

    response = http.post(sandbox.authorize_url, data={**form, "patient": sandbox.patient})
    assert response.status_code == 303
    answer = query(response.headers["location"])
    assert answer["state"] == params["state"]
    body = exchange(http, sandbox, answer["code"], verifier).json()
    assert body["patient"] == sandbox.patient
    assert body["fhirUser"] == sandbox.practitioner
    assert body["need_patient_banner"] is True
    assert set(body["scope"].split()) == {"launch/patient", "openid", "fhirUser", "patient/*.rs"}
    assert jwt.decode(body["id_token"], options={"verify_signature": False})["fhirUser"] == sandbox.practitioner
    assert fhir_get(http, f"{sandbox.fhir_base}/Patient/{sandbox.patient}", body["access_token"]).status_code == 200

    reused = http.post(sandbox.authorize_url, data={**form, "patient": sandbox.patient})
    assert reused.status_code == 400 and "location" not in reused.headers


def test_standalone_user_can_deny(sandbox: Sandbox, http: httpx.Client) -> None:
    _, params, _ = _picker(sandbox, http, "openid fhirUser user/*.rs")
    response = http.post(sandbox.authorize_url, data={"_txn": params["_txn"], "decision": "deny"})
    assert response.status_code == 303
    answer = query(response.headers["location"])
    assert answer["error"] == "access_denied" and answer["state"] == params["state"] and "code" not in answer


def test_standalone_provider_launch_without_patient(sandbox: Sandbox, http: httpx.Client) -> None:
    page, params, verifier = _picker(sandbox, http, "openid fhirUser user/*.rs")
    assert 'name="patient"' not in page.text
    form = {"_txn": params["_txn"], "user": sandbox.practitioner, "decision": "allow"}
    answer = query(http.post(sandbox.authorize_url, data=form).headers["location"])
    body = exchange(http, sandbox, answer["code"], verifier).json()
    assert "patient" not in body and body["fhirUser"] == sandbox.practitioner
    other = fhir_get(http, f"{sandbox.fhir_base}/Patient/{sandbox.other_patient}", body["access_token"])
    assert other.status_code == 200  # user/ scopes are not limited to one patient


# --- refresh and client authentication ---------------------------------------------------------------------------


def test_refresh_token_rotates_narrows_and_expires(sandbox: Sandbox, http: httpx.Client) -> None:
    first = tokens(sandbox, http)
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": PUBLIC}
    response = token(http, sandbox, refresh)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    second = response.json()
    assert second["access_token"] != first["access_token"]
    assert second["scope"] == first["scope"] and second["patient"] == sandbox.patient
    assert fhir_get(http, f"{sandbox.fhir_base}/Patient/{sandbox.patient}", second["access_token"]).status_code == 200
    assert "revoked" in oauth_error(token(http, sandbox, refresh), 400, "invalid_grant")  # rotated

    wider = {**refresh, "refresh_token": second["refresh_token"], "scope": "user/*.rs offline_access"}
    oauth_error(token(http, sandbox, wider), 400, "invalid_scope")
    other_client = {**refresh, "refresh_token": second["refresh_token"], "client_id": CDS}
    oauth_error(token(http, sandbox, other_client), 400, "invalid_grant")
    narrower = {**refresh, "refresh_token": second["refresh_token"], "scope": "patient/Observation.rs offline_access"}
    third = token(http, sandbox, narrower).json()
    assert third["scope"] == "patient/Observation.rs offline_access"
    patient = fhir_get(http, f"{sandbox.fhir_base}/Patient/{sandbox.patient}", third["access_token"])
    assert patient.status_code == 403

    sandbox.clock.now += timedelta(seconds=sandbox.config.refresh_token_lifetime_s + 1)
    expired = {**refresh, "refresh_token": third["refresh_token"]}
    assert "expired" in oauth_error(token(http, sandbox, expired), 400, "invalid_grant")


def test_no_refresh_or_id_token_unless_granted(sandbox: Sandbox, http: httpx.Client) -> None:
    body = tokens(sandbox, http, scope="launch patient/*.rs")
    assert "refresh_token" not in body and "id_token" not in body
    identity_only = tokens(sandbox, http, scope="launch openid")  # openid without fhirUser
    assert "id_token" not in identity_only and "fhirUser" in identity_only


def test_confidential_client_authenticates_with_its_secret(sandbox: Sandbox, http: httpx.Client) -> None:
    def attempt(**kwargs: Any) -> httpx.Response:
        code, verifier = ehr_code(sandbox, http, client_id=CONFIDENTIAL, scope="launch openid fhirUser patient/*.rs")
        data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
        return token(http, sandbox, data, **kwargs)

    wrong = attempt(auth=(CONFIDENTIAL, "wrong-secret"))
    oauth_error(wrong, 401, "invalid_client")
    assert wrong.headers["www-authenticate"].startswith("Basic")
    oauth_error(attempt(), 401, "invalid_client")  # no authentication at all
    good = attempt(auth=(CONFIDENTIAL, SECRET))
    assert good.status_code == 200, good.text
    body = good.json()
    assert body["patient"] == sandbox.patient and "id_token" in body and "refresh_token" not in body


def test_token_endpoint_refuses_malformed_requests(sandbox: Sandbox, http: httpx.Client) -> None:
    data = {"grant_type": "password", "username": "u", "password": "p", "client_id": PUBLIC}
    oauth_error(token(http, sandbox, data), 400, "unsupported_grant_type")
    as_json = http.post(sandbox.token_url, json={"grant_type": "authorization_code"})
    oauth_error(as_json, 400, "invalid_request")
    twice = http.post(
        sandbox.token_url,
        content="grant_type=authorization_code&code=a&code=b&client_id=public-app",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert "code" in oauth_error(twice, 400, "invalid_request")
    unknown = {"grant_type": "authorization_code", "code": "nope", "client_id": "nobody"}
    oauth_error(token(http, sandbox, unknown), 401, "invalid_client")


# --- SMART Backend Services --------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["backend_ec", "backend_rsa"])
def test_backend_service_gets_a_system_token_that_searches_across_patients(
    sandbox: Sandbox, http: httpx.Client, key_name: str
) -> None:
    key: SigningKey = getattr(sandbox, key_name)
    response = client_credentials(http, sandbox, assertion(sandbox, key), "system/Observation.rs system/Patient.rs")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == BEARER and 0 < body["expires_in"] <= 300
    assert body["scope"] == "system/Observation.rs system/Patient.rs"
    assert "refresh_token" not in body and "patient" not in body
    bundle = fhir_get(http, f"{sandbox.fhir_base}/Observation", body["access_token"], code=TEST_CODE, _count="50")
    assert bundle.status_code == 200
    subjects = {r["subject"]["reference"] for r in entry_resources(bundle.json())}
    assert subjects == {f"Patient/{sandbox.patient}", f"Patient/{sandbox.other_patient}"}
    medication = fhir_get(
        http, f"{sandbox.fhir_base}/MedicationRequest/{sandbox.medication_request}", body["access_token"]
    )
    assert medication.status_code == 403  # not requested, so not granted


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong-key", "signature"),
        ("wrong-aud", "aud"),
        ("expired", "expired"),
        ("exp-too-far", "5 minutes"),
        ("unknown-kid", "kid"),
        ("sub-not-iss", "sub"),
        ("alg-rs256", "alg"),
        ("wrong-assertion-type", "client_assertion_type"),
    ],
)
def test_bad_client_assertions_are_invalid_client(
    sandbox: Sandbox, http: httpx.Client, case: str, expected: str
) -> None:
    key = sandbox.backend_ec
    extra: dict[str, str] = {}
    if case == "wrong-key":
        signed = assertion(sandbox, ec_key(key.kid))
    elif case == "wrong-aud":
        signed = assertion(sandbox, key, aud=sandbox.fhir_base)
    elif case == "expired":
        signed = assertion(sandbox, key, now=sandbox.clock.now - timedelta(minutes=10), lifetime_s=60)
    elif case == "exp-too-far":
        signed = assertion(sandbox, key, lifetime_s=3600)
    elif case == "unknown-kid":
        signed = assertion(sandbox, ec_key("nobody-knows-me"))
    elif case == "sub-not-iss":
        signed = assertion(sandbox, key, claims={"sub": "someone-else"})
    elif case == "alg-rs256":
        signed = assertion(sandbox, rsa_key(sandbox.backend_rsa.kid, alg="RS256"))
    else:
        signed = assertion(sandbox, key)
        extra["client_assertion_type"] = "urn:ietf:params:oauth:client-assertion-type:saml2-bearer"
    response = client_credentials(http, sandbox, signed, "system/Observation.rs", **extra)
    assert expected in oauth_error(response, 401, "invalid_client")


def test_assertion_jti_cannot_be_reused(sandbox: Sandbox, http: httpx.Client) -> None:
    jti = str(uuid.uuid4())
    first = client_credentials(http, sandbox, assertion(sandbox, sandbox.backend_ec, jti=jti), "system/Patient.rs")
    assert first.status_code == 200
    again = client_credentials(http, sandbox, assertion(sandbox, sandbox.backend_ec, jti=jti), "system/Patient.rs")
    assert "already used" in oauth_error(again, 401, "invalid_client")


def test_backend_keys_from_the_registered_jwks_url(sandbox: Sandbox, http: httpx.Client) -> None:
    jku = f"{sandbox.base}/test-client/jwks.json"
    good = assertion(sandbox, sandbox.jku_key, BACKEND_JKU, headers={"jku": jku})
    response = client_credentials(http, sandbox, good, "system/Patient.rs")
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/Patient.rs"
    foreign = assertion(sandbox, sandbox.jku_key, BACKEND_JKU, headers={"jku": "https://evil.example.org/jwks"})
    assert "jku" in oauth_error(client_credentials(http, sandbox, foreign, "system/Patient.rs"), 401, "invalid_client")


def test_client_credentials_only_for_backend_clients_and_system_scopes(sandbox: Sandbox, http: httpx.Client) -> None:
    asymmetric = assertion(sandbox, sandbox.asymmetric_key, ASYMMETRIC)
    oauth_error(client_credentials(http, sandbox, asymmetric, "system/*.rs"), 400, "unauthorized_client")
    public = {"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": PUBLIC}
    oauth_error(token(http, sandbox, public), 400, "unauthorized_client")
    unauthenticated = {"grant_type": "client_credentials", "scope": "system/*.rs", "client_id": BACKEND}
    oauth_error(token(http, sandbox, unauthenticated), 401, "invalid_client")
    basic = {"grant_type": "client_credentials", "scope": "system/*.rs"}
    oauth_error(token(http, sandbox, basic, auth=(CONFIDENTIAL, SECRET)), 400, "unauthorized_client")
    user_scopes = client_credentials(http, sandbox, assertion(sandbox, sandbox.backend_ec), "patient/*.rs user/*.rs")
    oauth_error(user_scopes, 400, "invalid_scope")


# --- token introspection (RFC 7662, SMART App Launch 2.2 "Token Introspection") -----------------------------------


def test_advertised_introspection_endpoint_answers(sandbox: Sandbox, http: httpx.Client) -> None:
    config = http.get(f"{sandbox.fhir_base}/.well-known/smart-configuration").json()
    access = tokens(sandbox, http)["access_token"]
    form = {"token": access, **backend_form(sandbox)}
    response = http.post(config["introspection_endpoint"], data=form)
    assert response.status_code == 200, response.text
    assert response.json()["active"] is True
    oidc = http.get(f"{config['issuer']}/.well-known/openid-configuration").json()
    assert oidc["introspection_endpoint"] == config["introspection_endpoint"]


def test_introspection_of_an_ehr_launch_token(sandbox: Sandbox, http: httpx.Client) -> None:
    code, verifier = ehr_code(sandbox, http, launch=launch(sandbox, encounter="enc-1"))
    body = exchange(http, sandbox, code, verifier).json()
    now = sandbox.clock.now
    answer = introspected(http, sandbox, body["access_token"])
    assert answer == {
        "active": True,
        "scope": body["scope"],
        "client_id": PUBLIC,
        "exp": int((now + timedelta(seconds=body["expires_in"])).timestamp()),
        "iat": int(now.timestamp()),
        "token_type": BEARER,
        "iss": f"{sandbox.base}/auth",
        "sub": sandbox.practitioner,
        "aud": sandbox.fhir_base,
        "patient": sandbox.patient,
        "encounter": "enc-1",
        "fhirUser": sandbox.practitioner,
        "need_patient_banner": True,
        "smart_style_url": sandbox.config.smart_style_url,
    }
    assert set(answer["scope"].split()) == {"launch", "openid", "fhirUser", "patient/*.rs", "offline_access"}
    # SMART: an id_token was issued, so its iss and sub are the introspection's
    id_token = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert (answer["iss"], answer["sub"], answer["fhirUser"]) == (
        id_token["iss"],
        id_token["sub"],
        id_token["fhirUser"],
    )


def test_introspection_of_other_grants(sandbox: Sandbox, http: httpx.Client) -> None:
    first = tokens(sandbox, http)
    refresh = {"grant_type": "refresh_token", "refresh_token": first["refresh_token"], "client_id": PUBLIC}
    narrowed = token(http, sandbox, {**refresh, "scope": "patient/Observation.rs offline_access"}).json()
    answer = introspected(http, sandbox, narrowed["access_token"])
    assert answer["active"] is True and answer["scope"] == "patient/Observation.rs offline_access"
    assert (answer["client_id"], answer["patient"], answer["sub"]) == (PUBLIC, sandbox.patient, sandbox.practitioner)

    system = client_credentials(http, sandbox, assertion(sandbox, sandbox.backend_rsa), "system/Patient.rs").json()
    answer = introspected(http, sandbox, system["access_token"])
    assert (answer["active"], answer["client_id"], answer["sub"], answer["scope"]) == (
        True,
        BACKEND,
        BACKEND,
        "system/Patient.rs",
    )
    assert "patient" not in answer and "fhirUser" not in answer
    assert answer["exp"] == int((sandbox.clock.now + timedelta(seconds=system["expires_in"])).timestamp())

    cds = sandbox.auth.issue_token(CDS, "patient/Observation.rs", patient=sandbox.patient)
    answer = introspected(http, sandbox, cds["access_token"])
    assert (answer["client_id"], answer["sub"], answer["patient"]) == (CDS, CDS, sandbox.patient)


def test_introspection_of_an_expired_token_is_inactive(sandbox: Sandbox, http: httpx.Client) -> None:
    body = tokens(sandbox, http)
    assert introspected(http, sandbox, body["access_token"])["active"] is True
    sandbox.clock.now += timedelta(seconds=body["expires_in"] - 1)
    assert introspected(http, sandbox, body["access_token"])["active"] is True
    sandbox.clock.now += timedelta(seconds=2)
    assert introspected(http, sandbox, body["access_token"]) == {"active": False}


def test_introspection_of_revoked_tokens_is_inactive(sandbox: Sandbox, http: httpx.Client) -> None:
    code, verifier = ehr_code(sandbox, http)
    first = exchange(http, sandbox, code, verifier).json()
    assert introspected(http, sandbox, first["access_token"])["active"] is True
    oauth_error(exchange(http, sandbox, code, verifier), 400, "invalid_grant")  # the replay revokes what it issued
    assert introspected(http, sandbox, first["access_token"]) == {"active": False}

    other = tokens(sandbox, http)["access_token"]
    assert introspected(http, sandbox, other)["active"] is True
    sandbox.auth.revoke(other)
    assert introspected(http, sandbox, other) == {"active": False}


def test_introspection_of_unknown_and_refresh_tokens_is_inactive(sandbox: Sandbox, http: httpx.Client) -> None:
    body = tokens(sandbox, http)
    for value in ("not-a-token", secrets.token_urlsafe(32), body["access_token"] + "x"):
        assert introspected(http, sandbox, value) == {"active": False}
    # only access tokens are introspected: a live refresh token is inactive, whatever the hint says
    assert introspected(http, sandbox, body["refresh_token"]) == {"active": False}
    hinted = introspected(http, sandbox, body["refresh_token"], token_type_hint="refresh_token")  # noqa: S106 (a hint)
    assert hinted == {"active": False}
    refresh = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"], "client_id": PUBLIC}
    assert token(http, sandbox, refresh).status_code == 200  # it was live all along


def test_introspection_needs_an_authenticated_caller(sandbox: Sandbox, http: httpx.Client) -> None:
    access = tokens(sandbox, http)["access_token"]
    nobody = introspect(http, sandbox, access)
    assert "client" in oauth_error(nobody, 401, "invalid_client")
    assert "active" not in nobody.json()
    challenge = nobody.headers["www-authenticate"]
    assert challenge.startswith("Basic") and "Bearer" in challenge
    public = introspect(http, sandbox, access, data={"client_id": PUBLIC})
    assert "public client" in oauth_error(public, 401, "invalid_client")
    claimed = introspect(http, sandbox, access, data={"client_id": BACKEND})
    assert "must authenticate" in oauth_error(claimed, 401, "invalid_client")
    garbage = introspect(http, sandbox, "not-a-token")
    oauth_error(garbage, 401, "invalid_client")  # no answer about any token without authentication


def test_introspection_refuses_a_wrong_client_secret(sandbox: Sandbox, http: httpx.Client) -> None:
    access = tokens(sandbox, http)["access_token"]
    wrong = introspect(http, sandbox, access, auth=(CONFIDENTIAL, "wrong-secret"))
    oauth_error(wrong, 401, "invalid_client")
    assert "active" not in wrong.json()
    unregistered = introspect(http, sandbox, access, auth=("nobody", SECRET))
    oauth_error(unregistered, 401, "invalid_client")
    good = introspect(http, sandbox, access, auth=(CONFIDENTIAL, SECRET))
    assert good.status_code == 200, good.text
    assert good.json() == introspected(http, sandbox, access)  # the same answer, whoever asks


def test_introspection_by_private_key_jwt(sandbox: Sandbox, http: httpx.Client) -> None:
    access = tokens(sandbox, http)["access_token"]
    for form in (
        backend_form(sandbox),
        backend_form(sandbox, sandbox.backend_rsa),
        backend_form(sandbox, aud=sandbox.token_url),  # the token endpoint's audience is accepted too
        backend_form(
            sandbox, sandbox.asymmetric_key, client_id=ASYMMETRIC
        ),  # any confidential client, not only backend
    ):
        response = introspect(http, sandbox, access, data=form)
        assert response.status_code == 200, response.text
        assert response.json()["active"] is True and response.json()["client_id"] == PUBLIC

    bad = {
        "signature": backend_form(sandbox, ec_key(sandbox.backend_ec.kid)),
        "aud": backend_form(sandbox, aud=sandbox.fhir_base),
        "expired": backend_form(sandbox, now=sandbox.clock.now - timedelta(minutes=10)),
    }
    for expected, form in bad.items():
        assert expected in oauth_error(introspect(http, sandbox, access, data=form), 401, "invalid_client")
    replayed = backend_form(sandbox)
    assert introspect(http, sandbox, access, data=replayed).status_code == 200
    again = introspect(http, sandbox, access, data=replayed)
    assert "already used" in oauth_error(again, 401, "invalid_client")
    # the introspection endpoint's audience is only for introspection, never for getting a token
    for_introspection = assertion(sandbox, sandbox.backend_ec, aud=sandbox.introspect_url)
    refused = client_credentials(http, sandbox, for_introspection, "system/Patient.rs")
    assert "aud" in oauth_error(refused, 401, "invalid_client")


def test_introspection_by_bearer_token(sandbox: Sandbox, http: httpx.Client) -> None:
    access = tokens(sandbox, http)
    system = client_credentials(http, sandbox, assertion(sandbox, sandbox.backend_ec), "system/Patient.rs").json()

    def as_bearer(caller: str, **kwargs: Any) -> httpx.Response:
        return introspect(
            http, sandbox, access["access_token"], headers={"Authorization": f"Bearer {caller}"}, **kwargs
        )

    good = as_bearer(system["access_token"])
    assert good.status_code == 200, good.text
    assert good.json()["active"] is True and good.json()["fhirUser"] == sandbox.practitioner

    def refused(response: httpx.Response, reason: str) -> None:
        assert reason in oauth_error(response, 401, "invalid_token")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert 'error="invalid_token"' in response.headers["www-authenticate"]

    refused(as_bearer(access["access_token"]), "public client")  # the app's own token may not introspect
    refused(as_bearer("not-a-token"), "unknown")
    both = as_bearer(system["access_token"], data=backend_form(sandbox))
    oauth_error(both, 400, "invalid_request")
    sandbox.clock.now += timedelta(seconds=system["expires_in"] + 1)
    refused(as_bearer(system["access_token"]), "expired")


def test_introspection_refuses_malformed_requests(sandbox: Sandbox, http: httpx.Client) -> None:
    access = tokens(sandbox, http)["access_token"]
    as_json = http.post(sandbox.introspect_url, json={"token": access}, auth=(CONFIDENTIAL, SECRET))
    assert "x-www-form-urlencoded" in oauth_error(as_json, 400, "invalid_request")
    missing = http.post(sandbox.introspect_url, data={"token_type_hint": "access_token"}, auth=(CONFIDENTIAL, SECRET))
    assert "token" in oauth_error(missing, 400, "invalid_request")
    twice = http.post(
        sandbox.introspect_url,
        content=f"token={access}&token=not-a-token",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=(CONFIDENTIAL, SECRET),
    )
    assert "token" in oauth_error(twice, 400, "invalid_request")
    assert http.get(sandbox.introspect_url, params={"token": access}).status_code == 405


# --- scopes at the gateway ---------------------------------------------------------------------------------------


def test_issue_token_gives_a_cds_fhir_authorization(sandbox: Sandbox) -> None:
    answer = sandbox.auth.issue_token(CDS, "patient/Observation.rs patient/Patient.cruds", patient=sandbox.patient)
    assert answer["token_type"] == BEARER and answer["subject"] == CDS and answer["patient"] == sandbox.patient
    assert answer["scope"] == "patient/Observation.rs patient/Patient.rs"  # narrowed to the client's scope
    assert answer["expires_in"] == sandbox.config.access_token_lifetime_s
    grant = sandbox.auth.check_access_token(answer["access_token"])
    assert (grant.client_id, grant.patient, grant.user) == (CDS, sandbox.patient, None)
    with pytest.raises(ValueError, match="no SMART client"):
        sandbox.auth.issue_token("nobody", "patient/*.rs", patient=sandbox.patient)
    with pytest.raises(ValueError, match="nothing of"):
        sandbox.auth.issue_token(CDS, "patient/*.rs")  # patient/ scopes need a patient


def test_patient_observation_scope_is_enforced(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(CDS, "patient/Observation.rs", patient=sandbox.patient)["access_token"]
    fhir = sandbox.fhir_base

    own = fhir_get(http, f"{fhir}/Observation", access, patient=sandbox.patient, code=TEST_CODE)
    assert own.status_code == 200, own.text
    ids = {r["id"] for r in entry_resources(own.json())}
    assert ids == set(sandbox.observations)
    by_subject = fhir_get(http, f"{fhir}/Observation", access, subject=f"Patient/{sandbox.patient}", code=TEST_CODE)
    assert {r["id"] for r in entry_resources(by_subject.json())} == ids
    assert fhir_get(http, f"{fhir}/Observation/{sandbox.observations[0]}", access).status_code == 200

    unnamed = fhir_get(http, f"{fhir}/Observation", access, code=TEST_CODE)
    assert unnamed.status_code == 403 and "patient=" in outcome_text(unnamed)
    other = fhir_get(http, f"{fhir}/Observation", access, patient=sandbox.other_patient)
    assert other.status_code == 403
    both = fhir_get(http, f"{fhir}/Observation", access, patient=f"{sandbox.patient},{sandbox.other_patient}")
    assert both.status_code == 403
    others_observation = fhir_get(http, f"{fhir}/Observation/{sandbox.other_observation}", access)
    assert others_observation.status_code == 403 and f"Patient/{sandbox.patient}" in outcome_text(others_observation)

    medication = fhir_get(http, f"{fhir}/MedicationRequest/{sandbox.medication_request}", access)
    assert medication.status_code == 403
    assert "patient/MedicationRequest.r" in outcome_text(medication)
    assert 'error="insufficient_scope"' in medication.headers["www-authenticate"]
    assert fhir_get(http, f"{fhir}/MedicationRequest", access, patient=sandbox.patient).status_code == 403
    assert fhir_get(http, f"{fhir}/Patient/{sandbox.patient}", access).status_code == 403

    created = http.post(
        f"{fhir}/Observation",
        json={
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": f"Patient/{sandbox.patient}"},
        },
        headers={"Authorization": f"Bearer {access}", "Content-Type": FHIR_JSON},
    )
    assert created.status_code == 403 and "patient/Observation.c" in outcome_text(created)


def test_included_resources_are_filtered_to_the_scopes(sandbox: Sandbox, http: httpx.Client) -> None:
    url = f"{sandbox.fhir_base}/Observation"
    params = {"patient": sandbox.patient, "code": TEST_CODE, "_include": "Observation:performer"}

    def included(scope: str, patient: str | None) -> list[str]:
        access = sandbox.auth.issue_token(CDS, scope, patient=patient)["access_token"]
        response = fhir_get(http, url, access, **params)
        assert response.status_code == 200, response.text
        found = [f"{r['resourceType']}/{r['id']}" for r in entry_resources(response.json())]
        assert len([f for f in found if f.startswith("Observation/")]) == 5
        return [f for f in found if not f.startswith("Observation/")]

    other = f"Patient/{sandbox.other_patient}"
    assert included("patient/Observation.rs", sandbox.patient) == []  # no scope for Practitioner or Patient
    assert sorted(included("patient/*.rs", sandbox.patient)) == [sandbox.practitioner]  # shared, not the other
    assert sorted(included("user/*.rs", None)) == sorted([other, sandbox.practitioner])


def test_patient_scope_reads_shared_reference_data(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(CDS, "patient/*.rs", patient=sandbox.patient)["access_token"]
    practitioner = fhir_get(http, f"{sandbox.fhir_base}/{sandbox.practitioner}", access)
    assert practitioner.status_code == 200 and practitioner.json()["name"][0]["family"] == "Hematologist"
    assert fhir_get(http, f"{sandbox.fhir_base}/Practitioner", access, name="Hematologist").status_code == 200
    narrow = sandbox.auth.issue_token(CDS, "patient/Observation.rs", patient=sandbox.patient)["access_token"]
    assert fhir_get(http, f"{sandbox.fhir_base}/{sandbox.practitioner}", narrow).status_code == 403
    writer = sandbox.auth.issue_token(WRITER, "patient/*.cruds", patient=sandbox.patient)["access_token"]
    headers = {"Authorization": f"Bearer {writer}", "Content-Type": FHIR_JSON}
    made = http.post(f"{sandbox.fhir_base}/Practitioner", json={"resourceType": "Practitioner"}, headers=headers)
    assert made.status_code == 403


def test_user_scope_reaches_every_patient_but_only_reads(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(CDS, "user/*.rs")["access_token"]
    fhir = sandbox.fhir_base
    assert fhir_get(http, f"{fhir}/Observation/{sandbox.other_observation}", access).status_code == 200
    assert fhir_get(http, f"{fhir}/MedicationRequest/{sandbox.medication_request}", access).status_code == 200
    deleted = http.delete(
        f"{fhir}/Observation/{sandbox.other_observation}", headers={"Authorization": f"Bearer {access}"}
    )
    assert deleted.status_code == 403 and "user/Observation.d" in outcome_text(deleted)


def _observation(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "urn:test", "code": "written-through-gateway"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "valueString": "negative",
    }


def test_writes_pass_through_with_etag_location_and_preconditions(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(WRITER, "user/*.cruds")["access_token"]
    headers = {"Authorization": f"Bearer {access}", "Content-Type": FHIR_JSON, "Accept": FHIR_JSON}
    created = http.post(f"{sandbox.fhir_base}/Observation", json=_observation(sandbox.other_patient), headers=headers)
    assert created.status_code == 201, created.text
    location = created.headers["location"]
    assert location.startswith(f"{sandbox.fhir_base}/Observation/") and "/_history/" in location
    assert created.headers["etag"]
    resource = created.json()
    assert fhir_get(http, location, access).json()["id"] == resource["id"]

    url = f"{sandbox.fhir_base}/Observation/{resource['id']}"
    stale = http.put(url, json={**resource, "valueString": "positive"}, headers={**headers, "If-Match": 'W/"nope"'})
    assert stale.status_code == 412
    updated = http.put(
        url, json={**resource, "valueString": "positive"}, headers={**headers, "If-Match": created.headers["etag"]}
    )
    assert updated.status_code == 200 and updated.json()["valueString"] == "positive"

    conditional = http.post(
        f"{sandbox.fhir_base}/Observation",
        json=_observation(sandbox.other_patient),
        headers={**headers, "If-None-Exist": f"_id={resource['id']}"},
    )
    assert conditional.status_code == 200 and conditional.json()["id"] == resource["id"]  # If-None-Exist forwarded

    assert http.delete(url, headers=headers).status_code in (200, 204)
    assert fhir_get(http, url, access).status_code == 410


def test_patient_write_scope_stays_within_the_patient(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(WRITER, "patient/*.cruds", patient=sandbox.patient)["access_token"]
    headers = {"Authorization": f"Bearer {access}", "Content-Type": FHIR_JSON}
    fhir = sandbox.fhir_base
    foreign = http.post(f"{fhir}/Observation", json=_observation(sandbox.other_patient), headers=headers)
    assert foreign.status_code == 403
    own = http.post(f"{fhir}/Observation", json=_observation(sandbox.patient), headers=headers)
    assert own.status_code == 201
    own_id = own.json()["id"]
    moved = {**own.json(), "subject": {"reference": f"Patient/{sandbox.other_patient}"}}
    assert http.put(f"{fhir}/Observation/{own_id}", json=moved, headers=headers).status_code == 403
    other_url = f"{fhir}/Observation/{sandbox.other_observation}"
    hijack = {**_observation(sandbox.patient), "id": sandbox.other_observation}
    assert http.put(other_url, json=hijack, headers=headers).status_code == 403
    assert http.delete(other_url, headers=headers).status_code == 403
    conditional = http.delete(f"{fhir}/Observation?code=written-through-gateway", headers=headers)
    assert conditional.status_code == 403
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [{"request": {"method": "GET", "url": "Patient"}}]}
    assert http.post(fhir, json=batch, headers=headers).status_code == 403
    assert http.delete(f"{fhir}/Observation/{own_id}", headers=headers).status_code in (200, 204)


def test_batch_entries_are_each_checked(sandbox: Sandbox, http: httpx.Client) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{sandbox.patient}"}},
            {"resource": _observation(sandbox.patient), "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    reader = sandbox.auth.issue_token(CDS, "user/*.rs")["access_token"]
    refused = http.post(
        sandbox.fhir_base, json=bundle, headers={"Authorization": f"Bearer {reader}", "Content-Type": FHIR_JSON}
    )
    assert refused.status_code == 403 and "entry[1]" in outcome_text(refused)
    writer = sandbox.auth.issue_token(WRITER, "user/*.cruds")["access_token"]
    done = http.post(
        sandbox.fhir_base, json=bundle, headers={"Authorization": f"Bearer {writer}", "Content-Type": FHIR_JSON}
    )
    assert done.status_code == 200, done.text
    assert sandbox.config.fhir_upstream not in done.text
    created = done.json()["entry"][1]
    assert created["response"]["status"].startswith("201")
    assert created["fullUrl"].startswith(f"{sandbox.fhir_base}/Observation/")


# --- forwarding ---------------------------------------------------------------------------------------------------


def test_paging_links_point_at_the_gateway_and_work(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(CDS, "patient/Observation.rs", patient=sandbox.patient)["access_token"]
    url = f"{sandbox.fhir_base}/Observation"
    response = fhir_get(http, url, access, patient=sandbox.patient, code=TEST_CODE, _count="2")
    seen: list[str] = []
    pages = 0
    while True:
        assert response.status_code == 200, response.text
        assert sandbox.config.fhir_upstream not in response.text
        bundle = response.json()
        assert all(e["fullUrl"].startswith(f"{sandbox.fhir_base}/Observation/") for e in bundle["entry"])
        seen += [r["id"] for r in entry_resources(bundle)]
        pages += 1
        following = next_link(bundle)
        if following is None:
            break
        assert following.startswith(f"{sandbox.fhir_base}/Observation?")
        response = fhir_get(http, following, access)
    assert pages == 3 and sorted(seen) == sorted(sandbox.observations)


def test_unreachable_upstream_is_502(sandbox: Sandbox, http: httpx.Client) -> None:
    port = free_port()
    config = SandboxConfig(
        base_url=f"http://127.0.0.1:{port}",
        fhir_upstream=f"http://127.0.0.1:{free_port()}/fhir/R4",
        clients=(SmartClient(CDS, scope="user/*.rs"),),
    )
    auth = SmartAuthServer(config)
    app = FastAPI()
    app.include_router(gateway.router(config, auth))
    with serve_app(app, port):
        access = auth.issue_token(CDS, "user/*.rs")["access_token"]
        down = fhir_get(http, f"{config.fhir_base}/Patient/1", access)
        assert down.status_code == 502 and "unreachable" in outcome_text(down)
        assert fhir_get(http, f"{config.fhir_base}/metadata", None).status_code == 502


def test_cors_for_browser_apps(sandbox: Sandbox, http: httpx.Client) -> None:
    preflight_headers = {
        "Origin": "https://app.example.org",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    for url in (f"{sandbox.fhir_base}/Patient/{sandbox.patient}", sandbox.token_url):
        answer = http.options(url, headers=preflight_headers)
        assert answer.status_code in (200, 204)
        assert answer.headers["access-control-allow-origin"] == "*"
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
    access = sandbox.auth.issue_token(CDS, "user/*.rs")["access_token"]
    read = http.get(
        f"{sandbox.fhir_base}/Patient/{sandbox.patient}",
        headers={"Authorization": f"Bearer {access}", "Origin": "https://app.example.org"},
    )
    assert read.headers["access-control-allow-origin"] == "*"
    assert "etag" in read.headers["access-control-expose-headers"].lower()


def test_responses_carry_no_upstream_address(sandbox: Sandbox, http: httpx.Client) -> None:
    access = sandbox.auth.issue_token(CDS, "user/*.rs")["access_token"]
    response = fhir_get(http, f"{sandbox.fhir_base}/Patient", access, _id=sandbox.patient)
    assert response.status_code == 200
    text = json.dumps(response.json())
    assert sandbox.config.fhir_upstream not in text and f"{sandbox.fhir_base}/Patient/{sandbox.patient}" in text
