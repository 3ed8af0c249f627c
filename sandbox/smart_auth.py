"""The sandbox EHR's SMART authorization server (SMART App Launch 2.2; a development tool, not product code).

What it serves (`SmartAuthServer.router()`; URLs from `SandboxConfig`, never from the caller's Host header):

- ``GET {fhir_base}/.well-known/smart-configuration`` — discovery: endpoints, grant types, client
  authentication methods and signing algorithms, scopes, ``code_challenge_methods_supported: ["S256"]`` and the
  capabilities below.
- ``GET|POST /auth/authorize`` — authorization code flow with PKCE (S256 only; ``plain`` or no challenge is
  refused), ``state`` required and echoed unchanged, ``aud`` must be ``config.fhir_base``.

  * EHR launch: ``launch`` must be an id `create_launch` made for this client, unexpired and unused; it binds
    the user, patient, encounter, ``need_patient_banner``, ``smart_style_url``, ``fhirContext`` and
    ``appContext``. The code comes back at once.
  * Standalone launch (no ``launch``): a small page asks who the user is (the Practitioners on the FHIR
    server) and, when ``launch/patient`` or a ``patient/`` scope is requested, which patient; its form posts
    back here and the browser is redirected with the code (or ``error=access_denied``).
  * An unknown ``client_id`` or a ``redirect_uri`` not registered for it (exact match) gets an error page,
    never a redirect; every other error is redirected to the app with ``error`` and the same ``state``.

- ``POST /auth/token`` — ``authorization_code`` (single use; a replayed code is refused and revokes every
  token issued from it, RFC 6749 §4.1.2), ``refresh_token`` (rotated on use; ``scope`` may only narrow) and
  ``client_credentials`` (SMART Backend Services: backend clients, ``private_key_jwt`` only, ``system/``
  scopes only, tokens of at most 5 minutes). Client authentication is the client's registered method:
  ``none`` (``client_id`` in the form), ``client_secret_basic`` or ``private_key_jwt`` (RFC 7523 assertion,
  RS384 or ES384, ``kid`` from the client's ``jwks`` or ``jwks_url``, ``aud`` = the token endpoint, ``exp`` at
  most 5 minutes ahead, ``jti`` never seen before). Errors are RFC 6749 JSON; every answer is
  ``Cache-Control: no-store``.
- ``POST /auth/introspect`` — OAuth 2.0 Token Introspection (RFC 7662, as SMART App Launch 2.2's "Token
  Introspection" page profiles it); see `SmartAuthServer.introspect` for the answer and
  `SmartAuthServer._introspection_caller` for who may ask. Advertised as ``introspection_endpoint``.
- ``GET /auth/jwks`` — the public key that signs ``id_token`` s (RS256, as OpenID Connect and SMART's
  ``sso-openid-connect`` require); ``GET /auth/.well-known/openid-configuration`` — OIDC discovery for that
  ``issuer`` (``{base_url}/auth``).

Granted scope = requested ∩ the client's registered `SmartClient.scope` (`sandbox.scopes.narrow`); ``launch``,
``openid``, ``fhirUser``, ``offline_access`` ... are granted only when the client's scope lists them too. A
refresh token comes with ``offline_access`` or ``online_access``; an ``id_token`` with ``openid`` + ``fhirUser``.

State — launches, codes, access and refresh tokens, seen assertion ``jti`` s — lives in this process's memory:
the sandbox is one process, and a restart forgets every grant. Tokens are ``secrets.token_urlsafe(32)``,
opaque to everyone but this object; the gateway asks `check_access_token`. The id_token signing key is
generated at start, or kept in ``config.state_dir`` when that is set. Nothing here logs tokens or patient data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, unquote_plus, urlencode, urlsplit, urlunsplit

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment
from jwt.algorithms import RSAAlgorithm

from sandbox.config import SandboxConfig, SmartClient
from sandbox.cors import cors_headers, preflight
from sandbox.scopes import Scopes, narrow, within

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS: Final = ("RS384", "ES384")
ASSERTION_MAX_LIFETIME_S: Final = 300
CLOCK_SKEW_S: Final = 10
BACKEND_TOKEN_MAX_S: Final = 300
LAUNCH_LIFETIME_S: Final = 600
PICKER_LIFETIME_S: Final = 600
KEY_FILE: Final = "smart-auth-signing-key.pem"
ID_TOKEN_ALGORITHM: Final = "RS256"  # noqa: S105 (an algorithm name)
NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
REFRESH_SCOPES: Final = ("offline_access", "online_access")
# RFC 8414 §2: client authentication methods, or access token types (a bearer access token of a confidential client)
INTROSPECTION_AUTH_METHODS: Final = ("client_secret_basic", "private_key_jwt", "Bearer")
INTROSPECTION_CHALLENGE: Final = 'Basic realm="sandbox-introspection", Bearer realm="sandbox-introspection"'

_PKCE_CHALLENGE = re.compile(r"[A-Za-z0-9_-]{43}")
_PKCE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_FHIR_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")
_USER_REF = re.compile(r"(Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/[A-Za-z0-9.-]{1,64}")

CAPABILITIES: Final = (
    "launch-ehr",
    "launch-standalone",
    "authorize-post",
    "client-public",
    "client-confidential-symmetric",
    "client-confidential-asymmetric",
    "sso-openid-connect",
    "context-banner",
    "context-ehr-patient",
    "context-ehr-encounter",
    "context-standalone-patient",
    "permission-offline",
    "permission-online",
    "permission-patient",
    "permission-user",
    "permission-v1",
    "permission-v2",
)
SCOPES_SUPPORTED: Final = (
    "openid",
    "fhirUser",
    "launch",
    "launch/patient",
    "offline_access",
    "online_access",
    "patient/*.cruds",
    "patient/*.rs",
    "patient/*.read",
    "user/*.cruds",
    "user/*.rs",
    "user/*.read",
    "system/*.cruds",
    "system/*.rs",
    "system/*.read",
)


class TokenError(Exception):
    """`check_access_token` refused a token; ``str()`` says why (never the token itself)."""


class OAuthError(Exception):
    """An RFC 6749 error answer: ``error`` code, human ``description``, HTTP status (401 for ``invalid_client``)."""

    def __init__(self, error: str, description: str, status: int = 400, challenge: str | None = None) -> None:
        super().__init__(description)
        self.error = error
        self.description = description
        self.status = status
        self.challenge = challenge

    def response(self) -> JSONResponse:
        headers = {**NO_STORE, **cors_headers()}
        if self.status == 401:
            headers["WWW-Authenticate"] = self.challenge or 'Basic realm="sandbox-token-endpoint"'
        return JSONResponse(
            {"error": self.error, "error_description": self.description}, status_code=self.status, headers=headers
        )


def _auth_method(client: SmartClient) -> str:
    return client.token_endpoint_auth_method


def _invalid_client(description: str) -> OAuthError:
    return OAuthError("invalid_client", description, 401)


def _invalid_token(description: str) -> OAuthError:
    challenge = f'Bearer realm="sandbox-introspection", error="invalid_token", error_description="{description}"'
    return OAuthError("invalid_token", description, 401, challenge)


def _may_introspect(client: SmartClient) -> bool:
    """Confidential clients (a secret or a key) may introspect; public clients, who prove nothing, may not."""
    return _auth_method(client) in ("client_secret_basic", "private_key_jwt")


@dataclass(frozen=True)
class Grant:
    """What a valid access token allows: the client, its granted scopes, and the patient / user in context."""

    client_id: str
    scopes: Scopes
    patient: str | None
    user: str | None
    expires_at: datetime
    encounter: str | None = None

    @property
    def scope(self) -> str:
        return self.scopes.text


@dataclass(frozen=True)
class _Context:
    """Launch context bound to a code and to the tokens issued from it."""

    user: str | None = None
    patient: str | None = None
    encounter: str | None = None
    need_patient_banner: bool | None = None
    smart_style_url: str | None = None
    app_context: str | None = None
    fhir_context: tuple[str, ...] = ()


@dataclass
class _Launch:
    client_id: str
    context: _Context
    expires_at: datetime
    used: bool = False


@dataclass(frozen=True)
class _AuthRequest:
    client: SmartClient
    redirect_uri: str
    state: str
    granted: Scopes
    code_challenge: str
    nonce: str | None
    response_status: int


@dataclass
class _Pending:
    request: _AuthRequest
    need_patient: bool
    expires_at: datetime


@dataclass
class _Code:
    client_id: str
    redirect_uri: str
    code_challenge: str
    scopes: Scopes
    context: _Context
    nonce: str | None
    expires_at: datetime
    family: str
    used: bool = False


@dataclass
class _Token:
    kind: Literal["access", "refresh"]
    client_id: str
    scopes: Scopes
    context: _Context
    issued_at: datetime
    expires_at: datetime
    family: str | None
    revoked: bool = False


@dataclass
class _State:
    launches: dict[str, _Launch] = field(default_factory=dict)
    pending: dict[str, _Pending] = field(default_factory=dict)
    codes: dict[str, _Code] = field(default_factory=dict)
    tokens: dict[str, _Token] = field(default_factory=dict)
    families: dict[str, set[str]] = field(default_factory=dict)
    jtis: dict[tuple[str, str], float] = field(default_factory=dict)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def s256(verifier: str) -> str:
    """The PKCE S256 code challenge of `verifier` (RFC 7636 §4.2)."""
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _load_or_create_key(state_dir: Path | None) -> rsa.RSAPrivateKey:
    path = state_dir / KEY_FILE if state_dir is not None else None
    if path is not None and path.is_file():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey):
            return key
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.touch(mode=0o600, exist_ok=True)
        path.write_bytes(pem)
    return key


_TEMPLATES = Environment(autoescape=True)
_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:40rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "label{display:block;margin:1rem 0}select,input{display:block;margin-top:.3rem;min-width:20rem;padding:.3rem}"
    "button{margin-right:.5rem;padding:.4rem 1rem}.error{color:#9e2d2d}code{word-break:break-all}"
)
_ERROR_PAGE = _TEMPLATES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Authorization error</title><style>{{ style }}</style></head>
<body><h1>Authorization error</h1>
<p class="error"><strong>{{ error }}</strong>: {{ description }}</p>
<p>The sandbox EHR did not send you back to the app: it cannot trust where this request asked to go.</p>
</body></html>"""
)
_PICKER_PAGE = _TEMPLATES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sandbox EHR sign-in</title><style>{{ style }}</style></head>
<body><h1>Sandbox EHR sign-in</h1>
<p><strong>{{ client_name }}</strong> asks for <code>{{ scope }}</code>.</p>
{% if error %}<p class="error" role="alert">{{ error }}</p>{% endif %}
<form method="post" action="{{ action }}">
<input type="hidden" name="_txn" value="{{ txn }}">
<label>Signed-in user
{% if users %}<select name="user" required>{% for value, label in users %}
<option value="{{ value }}">{{ label }}</option>{% endfor %}
</select>{% else %}<input name="user" placeholder="Practitioner/123" required>{% endif %}
</label>
{% if need_patient %}<label>Patient
{% if patients %}<select name="patient" required>{% for value, label in patients %}
<option value="{{ value }}">{{ label }}</option>{% endfor %}
</select>{% else %}<input name="patient" placeholder="patient id" required>{% endif %}
</label>{% endif %}
<button type="submit" name="decision" value="allow">Authorize</button>
<button type="submit" name="decision" value="deny" formnovalidate>Deny</button>
</form></body></html>"""
)


def _human_name(resource: dict[str, Any]) -> str:
    names = resource.get("name")
    if isinstance(names, list) and names and isinstance(names[0], dict):
        name = names[0]
        if isinstance(name.get("text"), str):
            return str(name["text"])
        given: list[Any] = name["given"] if isinstance(name.get("given"), list) else []
        parts = [str(g) for g in given] + ([str(name["family"])] if isinstance(name.get("family"), str) else [])
        if parts:
            return " ".join(parts)
    return "(no name)"


def _form_pairs(body: bytes) -> list[tuple[str, str]]:
    return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def _single_values(pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """The parameters as a dict, and the names sent more than once (OAuth parameters must not repeat)."""
    values: dict[str, str] = {}
    repeated: list[str] = []
    for name, value in pairs:
        if name in values and name not in repeated:
            repeated.append(name)
        values[name] = value
    return values, repeated


class SmartAuthServer:
    """The sandbox's SMART authorization server; implements `sandbox.config.Launches`.

    One instance per sandbox process (its grants live in memory). Mount `router()`; hand it to
    `sandbox.gateway.router` so the FHIR gateway can `check_access_token`."""

    def __init__(self, config: SandboxConfig) -> None:
        self._config = config
        self._lock = threading.RLock()
        self._state = _State()
        self._key = _load_or_create_key(config.state_dir)
        public = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        thumbprint = json.dumps({k: public[k] for k in ("e", "kty", "n")}, separators=(",", ":"), sort_keys=True)
        self.kid = _b64url(hashlib.sha256(thumbprint.encode()).digest())
        self._public_jwk = {**public, "kid": self.kid, "alg": ID_TOKEN_ALGORITHM, "use": "sig"}
        self._prefix = urlsplit(config.base_url).path.rstrip("/")
        self._fhir_path = urlsplit(config.fhir_base).path.rstrip("/")

    # --- URLs ---------------------------------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        return f"{self._config.base_url}/auth"

    @property
    def authorization_endpoint(self) -> str:
        return f"{self._config.base_url}/auth/authorize"

    @property
    def token_endpoint(self) -> str:
        """The token endpoint's URL: also the ``aud`` a client assertion carries (the introspection endpoint also
        accepts its own URL)."""
        return f"{self._config.base_url}/auth/token"

    @property
    def introspection_endpoint(self) -> str:
        """The token introspection endpoint's URL (RFC 7662)."""
        return f"{self._config.base_url}/auth/introspect"

    @property
    def jwks_uri(self) -> str:
        return f"{self._config.base_url}/auth/jwks"

    def _now(self) -> datetime:
        return self._config.now()

    # --- what the EHR pages call ---------------------------------------------------------------------------------

    def create_launch(
        self,
        *,
        client_id: str,
        user: str,
        patient: str | None,
        encounter: str | None = None,
        need_patient_banner: bool = True,
        app_context: str | None = None,
        fhir_context: Sequence[str] = (),
    ) -> str:
        """Register an EHR launch for `client_id` and return its opaque ``launch`` id (single use, valid
        `LAUNCH_LIFETIME_S`). `user` is the ``fhirUser`` (``Practitioner/123``), `patient` a Patient id or None,
        `fhir_context` relative references (``MedicationRequest/9``) returned as SMART 2.2 ``fhirContext``."""
        if self._config.client(client_id) is None:
            raise ValueError(f"create_launch: no SMART client {client_id!r} is registered")
        if not _USER_REF.fullmatch(user):
            raise ValueError(f"create_launch: user must be a reference like Practitioner/123, not {user!r}")
        if patient is not None and not _FHIR_ID.fullmatch(patient):
            raise ValueError("create_launch: patient must be a FHIR id (not a reference)")
        context = _Context(
            user=user,
            patient=patient,
            encounter=encounter,
            need_patient_banner=need_patient_banner,
            smart_style_url=self._config.smart_style_url,
            app_context=app_context,
            fhir_context=tuple(fhir_context),
        )
        launch_id = secrets.token_urlsafe(24)
        with self._lock:
            self._purge()
            expires = self._now() + timedelta(seconds=LAUNCH_LIFETIME_S)
            self._state.launches[launch_id] = _Launch(client_id, context, expires)
        return launch_id

    def launch_url(self, launch_id: str) -> str:
        """Where the EHR sends the browser for launch `launch_id`: the client's ``launch_url`` with ``iss`` and
        ``launch``. Raises ValueError for an unknown launch or a client without a launch URL."""
        with self._lock:
            launch = self._state.launches.get(launch_id)
        client = self._config.client(launch.client_id) if launch else None
        if launch is None or client is None:
            raise ValueError("launch_url: unknown launch id")
        if not client.launch_url:
            raise ValueError(f"launch_url: client {client.client_id!r} has no launch_url")
        return _with_query(client.launch_url, {"iss": self._config.fhir_base, "launch": launch_id})

    def issue_token(
        self, client_id: str, scope: str, *, patient: str | None = None, user: str | None = None
    ) -> dict[str, Any]:
        """An access token for a CDS service, as CDS Hooks ``fhirAuthorization``: ``access_token``,
        ``token_type``, ``expires_in``, ``scope`` (requested ∩ the client's registered scope; ``patient/`` scopes
        only with a `patient`), ``subject`` (= `client_id`) and ``patient`` when given. Raises ValueError for an
        unregistered client or when nothing of `scope` can be granted."""
        client = self._config.client(client_id)
        if client is None:
            raise ValueError(f"issue_token: no SMART client {client_id!r} is registered")
        granted = narrow(Scopes.parse(scope).only_resource(), Scopes.parse(client.scope))
        if patient is None:
            granted = granted.without_context("patient")
        elif not _FHIR_ID.fullmatch(patient):
            raise ValueError("issue_token: patient must be a FHIR id (not a reference)")
        if not granted.resource:
            raise ValueError(f"issue_token: nothing of {scope!r} is allowed for client {client_id!r}")
        lifetime = self._config.access_token_lifetime_s
        token = self._store_token("access", client_id, granted, _Context(user=user, patient=patient), lifetime, None)
        answer: dict[str, Any] = {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": granted.text,
            "subject": client_id,
        }
        if patient is not None:
            answer["patient"] = patient
        return answer

    def check_access_token(self, token: str) -> Grant:
        """The grant behind a bearer access token, valid at ``config.now()``. Raises `TokenError` saying whether
        it is unknown (or not an access token), revoked or expired."""
        with self._lock:
            record = self._state.tokens.get(token)
        if record is None or record.kind != "access":
            raise TokenError("unknown access token")
        if record.revoked:
            raise TokenError("access token revoked")
        if self._now() >= record.expires_at:
            raise TokenError("access token expired")
        return Grant(
            client_id=record.client_id,
            scopes=record.scopes,
            patient=record.context.patient,
            user=record.context.user,
            expires_at=record.expires_at,
            encounter=record.context.encounter,
        )

    def introspect(self, token: str) -> dict[str, Any]:
        """The RFC 7662 §2.2 introspection answer for `token`, at ``config.now()``.

        An access token that is known, unrevoked and unexpired is ``active``, with SMART's required fields
        ``scope`` (as granted: narrowed by a refresh if it was), ``client_id`` (the client it was issued to) and
        ``exp`` (epoch seconds, = issue time + ``expires_in``); ``iat``, ``token_type`` (``Bearer``), ``iss`` (this
        server's issuer, the ``iss`` of its id_tokens), ``sub`` (the ``fhirUser`` when the grant has a user — the
        id_token's ``sub`` when one was issued — else the ``client_id``) and ``aud`` (the FHIR base); and the launch
        context the token response carried: ``patient``, ``encounter``, ``fhirUser``, ``need_patient_banner``,
        ``smart_style_url``, ``fhirContext``, ``appContext`` when present.

        Everything else — unknown, expired or revoked tokens, and refresh tokens (only access tokens are
        introspected here; RFC 7662 lets a server decline the rest) — is ``{"active": false}`` and nothing more,
        so an answer never says which of these it was."""
        with self._lock:
            record = self._state.tokens.get(token)
            usable = record is not None and record.kind == "access" and not record.revoked
        if record is None or not usable or self._now() >= record.expires_at:
            return {"active": False}
        body: dict[str, Any] = {
            "active": True,
            "scope": record.scopes.text,
            "client_id": record.client_id,
            "exp": int(record.expires_at.timestamp()),
            "iat": int(record.issued_at.timestamp()),
            "token_type": "Bearer",
            "iss": self.issuer,
            "sub": record.context.user or record.client_id,
            "aud": self._config.fhir_base,
        }
        return {**body, **_context_fields(record.context)}

    def revoke(self, token: str) -> None:
        """Revoke an access or refresh token (unknown tokens are ignored)."""
        with self._lock:
            record = self._state.tokens.get(token)
            if record is not None:
                record.revoked = True

    # --- discovery ----------------------------------------------------------------------------------------------

    def smart_configuration(self) -> dict[str, Any]:
        """The ``.well-known/smart-configuration`` document (SMART App Launch 2.2 §Conformance)."""
        capabilities = list(CAPABILITIES)
        if self._config.smart_style_url:
            capabilities.insert(capabilities.index("context-banner") + 1, "context-style")
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
            "introspection_endpoint": self.introspection_endpoint,
            "introspection_endpoint_auth_methods_supported": list(INTROSPECTION_AUTH_METHODS),
            "introspection_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGORITHMS),
            "scopes_supported": list(SCOPES_SUPPORTED),
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "capabilities": capabilities,
        }

    def smart_configuration_response(self) -> JSONResponse:
        return JSONResponse(self.smart_configuration(), headers=cors_headers())

    def openid_configuration(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "introspection_endpoint": self.introspection_endpoint,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [ID_TOKEN_ALGORITHM],
            "scopes_supported": ["openid", "fhirUser"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "nonce", "fhirUser"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt", "none"],
            "code_challenge_methods_supported": ["S256"],
        }

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set that verifies this server's id_tokens."""
        return {"keys": [dict(self._public_jwk)]}

    # --- HTTP ---------------------------------------------------------------------------------------------------

    def router(self) -> APIRouter:
        """The routes: discovery under the FHIR base, ``/auth/authorize``, ``/auth/token``, ``/auth/introspect``,
        ``/auth/jwks`` and OIDC discovery (paths carry the base URL's path, if it has one)."""
        router = APIRouter()
        smart_config = f"{self._fhir_path}/.well-known/smart-configuration"
        auth = f"{self._prefix}/auth"

        async def smart_configuration() -> JSONResponse:
            return self.smart_configuration_response()

        async def openid_configuration() -> JSONResponse:
            return JSONResponse(self.openid_configuration(), headers=cors_headers())

        async def jwks() -> JSONResponse:
            return JSONResponse(self.jwks(), headers=cors_headers())

        async def options() -> Response:
            return preflight()

        router.add_api_route(smart_config, smart_configuration, methods=["GET"], include_in_schema=False)
        router.add_api_route(f"{auth}/.well-known/openid-configuration", openid_configuration, methods=["GET"])
        router.add_api_route(f"{auth}/jwks", jwks, methods=["GET"])
        router.add_api_route(f"{auth}/authorize", self._authorize_endpoint, methods=["GET", "POST"])
        router.add_api_route(f"{auth}/token", self._token_endpoint, methods=["POST"])
        router.add_api_route(f"{auth}/introspect", self._introspection_endpoint, methods=["POST"])
        for path in (smart_config, f"{auth}/token", f"{auth}/jwks", f"{auth}/.well-known/openid-configuration"):
            router.add_api_route(path, options, methods=["OPTIONS"], include_in_schema=False)
        return router

    # --- /auth/authorize ----------------------------------------------------------------------------------------

    async def _authorize_endpoint(self, request: Request) -> Response:
        if request.method == "POST":
            if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                return self._error_page(request, "invalid_request", "POST must be application/x-www-form-urlencoded")
            pairs = _form_pairs(await request.body())
            if any(name == "_txn" for name, _ in pairs):
                return await self._picker_submit(request, dict(pairs))
            return await self._authorize(request, pairs, status=303)
        return await self._authorize(request, list(request.query_params.multi_items()), status=302)

    async def _authorize(self, request: Request, pairs: list[tuple[str, str]], *, status: int) -> Response:
        params, repeated = _single_values(pairs)
        client = self._config.client(params.get("client_id", ""))
        if "client_id" in repeated or client is None:
            return self._error_page(request, "invalid_request", "unknown or missing client_id")
        redirect_uri = params.get("redirect_uri", "")
        if "redirect_uri" in repeated or redirect_uri not in client.redirect_uris:
            return self._error_page(
                request, "invalid_request", f"redirect_uri is missing or not registered for client {client.client_id}"
            )
        state = params.get("state", "")

        def fail(error: str, description: str) -> Response:
            answer = {"error": error, "error_description": description}
            return _redirect(redirect_uri, {**answer, "state": state} if state else answer, status)

        if repeated:
            return fail("invalid_request", f"parameters sent more than once: {', '.join(repeated)}")
        if params.get("response_type") != "code":
            return fail("unsupported_response_type", "response_type must be code")
        if not state:
            return fail("invalid_request", "state is required")
        aud = params.get("aud", params.get("resource", ""))
        if aud.rstrip("/") != self._config.fhir_base:
            return fail("invalid_request", f"aud must be this EHR's FHIR base URL {self._config.fhir_base}")
        if params.get("code_challenge_method") != "S256":
            return fail("invalid_request", "PKCE is required with code_challenge_method=S256 (plain is refused)")
        challenge = params.get("code_challenge", "")
        if not _PKCE_CHALLENGE.fullmatch(challenge):
            return fail("invalid_request", "code_challenge must be the base64url SHA-256 of the code_verifier")
        if not params.get("scope", "").strip():
            return fail("invalid_scope", "scope is required")
        requested = Scopes.parse(params["scope"])
        # system/ scopes belong to SMART Backend Services, never to a user's authorization.
        granted = narrow(requested.without_context("system"), Scopes.parse(client.scope))
        nonce = params.get("nonce") or None
        launch_id = params.get("launch")
        if launch_id is not None:
            with self._lock:
                launch = self._state.launches.get(launch_id)
                if launch is None or launch.client_id != client.client_id or launch.used:
                    return fail("invalid_request", "launch is unknown, already used, or for another client")
                if self._now() >= launch.expires_at:
                    return fail("invalid_request", "launch has expired; launch the app from the EHR again")
                launch.used = True
            if launch.context.patient is None:
                granted = granted.without_context("patient")
            if not granted.text:
                return fail("invalid_scope", "none of the requested scopes is allowed for this client and launch")
            auth = _AuthRequest(client, redirect_uri, state, granted, challenge, nonce, status)
            return self._code_redirect(auth, launch.context)
        need_patient = "launch/patient" in requested.other or "patient" in granted.contexts()
        if not granted.text:
            return fail("invalid_scope", "none of the requested scopes is allowed for this client")
        auth = _AuthRequest(client, redirect_uri, state, granted, challenge, nonce, 303)
        txn = secrets.token_urlsafe(24)
        pending = _Pending(auth, need_patient, self._now() + timedelta(seconds=PICKER_LIFETIME_S))
        with self._lock:
            self._purge()
            self._state.pending[txn] = pending
        return await self._picker_page(txn, pending, error=None)

    async def _picker_page(self, txn: str, pending: _Pending, *, error: str | None) -> HTMLResponse:
        users = await self._choices("Practitioner")
        patients = await self._choices("Patient") if pending.need_patient else []
        client = pending.request.client
        page = _PICKER_PAGE.render(
            style=_STYLE,
            client_name=client.name or client.client_id,
            scope=pending.request.granted.text,
            action=self.authorization_endpoint,
            txn=txn,
            users=users,
            need_patient=pending.need_patient,
            patients=patients,
            error=error,
        )
        return HTMLResponse(page, status_code=400 if error else 200, headers=NO_STORE)

    async def _choices(self, resource_type: str) -> list[tuple[str, str]]:
        """(value, label) options for the picker, read from the FHIR server; empty when it cannot be read."""
        try:
            async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
                response = await client.get(
                    f"{self._config.fhir_upstream}/{resource_type}",
                    params={"_count": "200"},
                    headers={"Accept": "application/fhir+json"},
                )
            bundle = response.json() if response.status_code == 200 else {}
        except (httpx.HTTPError, ValueError):
            return []
        options = []
        for entry in bundle.get("entry", []) if isinstance(bundle, dict) else []:
            resource = entry.get("resource") if isinstance(entry, dict) else None
            if not isinstance(resource, dict) or not isinstance(resource.get("id"), str):
                continue
            rid = resource["id"]
            if resource_type == "Patient":
                born = resource.get("birthDate")
                label = f"{_human_name(resource)}" + (f", born {born}" if isinstance(born, str) else "") + f" ({rid})"
                options.append((rid, label))
            else:
                options.append((f"{resource_type}/{rid}", f"{_human_name(resource)} ({resource_type}/{rid})"))
        return sorted(options, key=lambda option: option[1].lower())

    async def _exists(self, reference: str) -> bool:
        try:
            async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
                response = await client.get(
                    f"{self._config.fhir_upstream}/{reference}", headers={"Accept": "application/fhir+json"}
                )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _picker_submit(self, request: Request, form: dict[str, str]) -> Response:
        txn = form.get("_txn", "")
        with self._lock:
            pending = self._state.pending.get(txn)
        if pending is None or self._now() >= pending.expires_at:
            expired = "this sign-in page has expired; start again from the app"
            return self._error_page(request, "invalid_request", expired)
        auth = pending.request
        if form.get("decision") == "deny":
            with self._lock:
                self._state.pending.pop(txn, None)
            denied = {"error": "access_denied", "error_description": "the user denied access", "state": auth.state}
            return _redirect(auth.redirect_uri, denied, 303)
        user = form.get("user", "").strip()
        patient = form.get("patient", "").strip() or None
        problem = None
        if not _USER_REF.fullmatch(user) or not await self._exists(user):
            problem = "Choose a user that exists on the FHIR server (e.g. Practitioner/123)."
        elif pending.need_patient and (
            patient is None or not _FHIR_ID.fullmatch(patient) or not await self._exists(f"Patient/{patient}")
        ):
            problem = "Choose a patient that exists on the FHIR server."
        if problem is not None:
            return await self._picker_page(txn, pending, error=problem)
        with self._lock:
            if self._state.pending.pop(txn, None) is None:
                return self._error_page(request, "invalid_request", "this sign-in page was already used")
        granted = auth.granted if pending.need_patient else auth.granted.without_context("patient")
        context = _Context(user=user, patient=patient if pending.need_patient else None, need_patient_banner=True)
        return self._code_redirect(replace(auth, granted=granted), context)

    def _code_redirect(self, auth: _AuthRequest, context: _Context) -> Response:
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._purge()
            self._state.codes[code] = _Code(
                client_id=auth.client.client_id,
                redirect_uri=auth.redirect_uri,
                code_challenge=auth.code_challenge,
                scopes=auth.granted,
                context=context,
                nonce=auth.nonce,
                expires_at=self._now() + timedelta(seconds=self._config.code_lifetime_s),
                family=secrets.token_urlsafe(16),
            )
        return _redirect(auth.redirect_uri, {"code": code, "state": auth.state}, auth.response_status)

    def _error_page(self, request: Request, error: str, description: str) -> Response:
        accept = request.headers.get("accept", "")
        if "application/json" in accept and "text/html" not in accept:
            return JSONResponse({"error": error, "error_description": description}, status_code=400, headers=NO_STORE)
        page = _ERROR_PAGE.render(style=_STYLE, error=error, description=description)
        return HTMLResponse(page, status_code=400, headers=NO_STORE)

    # --- /auth/token --------------------------------------------------------------------------------------------

    async def _token_endpoint(self, request: Request) -> Response:
        try:
            if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                raise OAuthError("invalid_request", "the token request must be application/x-www-form-urlencoded")
            form, repeated = _single_values(_form_pairs(await request.body()))
            if repeated:
                raise OAuthError("invalid_request", f"parameters sent more than once: {', '.join(repeated)}")
            grant_type = form.get("grant_type")
            if grant_type not in ("authorization_code", "refresh_token", "client_credentials"):
                raise OAuthError("unsupported_grant_type", f"grant_type {grant_type!r} is not supported")
            client, method = await self._authenticate(request, form)
            if grant_type == "authorization_code":
                body = self._exchange_code(client, form)
            elif grant_type == "refresh_token":
                body = self._refresh(client, form)
            else:
                body = self._client_credentials(client, method, form)
        except OAuthError as error:
            return error.response()
        return JSONResponse(body, headers={**NO_STORE, **cors_headers()})

    # --- /auth/introspect ---------------------------------------------------------------------------------------

    async def _introspection_endpoint(self, request: Request) -> Response:
        """``POST /auth/introspect``: form ``token=...`` (``token_type_hint`` is accepted and ignored), from a
        caller `_introspection_caller` accepts. 200 with `introspect`'s answer; 400 ``invalid_request`` for a body
        that is not a form, repeated parameters or no ``token``; 401 ``invalid_client`` / ``invalid_token`` for a
        caller who may not ask. Every answer is ``Cache-Control: no-store``; no CORS (servers call this)."""
        try:
            if not request.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
                raise OAuthError(
                    "invalid_request", "the introspection request must be application/x-www-form-urlencoded"
                )
            form, repeated = _single_values(_form_pairs(await request.body()))
            if repeated:
                raise OAuthError("invalid_request", f"parameters sent more than once: {', '.join(repeated)}")
            await self._introspection_caller(request, form)
            value = form.get("token", "")
            if not value:
                raise OAuthError("invalid_request", "token is required")
        except OAuthError as error:
            if error.error == "invalid_client":
                error.challenge = INTROSPECTION_CHALLENGE
            return error.response()
        return JSONResponse(self.introspect(value), headers=NO_STORE)

    async def _introspection_caller(self, request: Request, form: dict[str, str]) -> SmartClient:
        """Who may introspect: a confidential client (its tokens can be any client's; SMART's "Authorization to
        perform Token Introspection"). It proves itself in one of two ways:

        - client authentication, as at the token endpoint: ``client_secret_basic``, or ``private_key_jwt``
          (``client_assertion_type`` + ``client_assertion``, whose ``aud`` may be the token endpoint or the
          introspection endpoint; a fresh ``jti`` each call). A public client (method ``none``), no credentials
          or bad ones: 401 ``invalid_client``.
        - ``Authorization: Bearer <access token>``, which SMART requires an introspection endpoint with access
          control to accept: an active access token issued to a confidential client (SMART names no scope for
          introspection, so "appropriately scoped" is read as "issued to a client allowed to introspect"). An
          unknown, expired or revoked token, or one of a public client: 401 ``invalid_token``
          (``WWW-Authenticate: Bearer``, RFC 7662 §2.3 / RFC 6750 §3). Bearer with a client assertion is 400."""
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            if "client_assertion" in form or "client_assertion_type" in form:
                raise OAuthError("invalid_request", "authenticate with a bearer token or a client_assertion, not both")
            try:
                grant = self.check_access_token(bearer.strip())
            except TokenError as exc:
                raise _invalid_token(str(exc)) from exc
            client = self._config.client(grant.client_id)
            if client is None or not _may_introspect(client):
                raise _invalid_token(f"tokens of public client {grant.client_id} may not introspect")
            return client
        client, _ = await self._authenticate(request, form, audiences=(self.introspection_endpoint,))
        if not _may_introspect(client):
            raise _invalid_client(f"public client {client.client_id} may not introspect tokens")
        return client

    async def _authenticate(
        self, request: Request, form: dict[str, str], *, audiences: Sequence[str] = ()
    ) -> tuple[SmartClient, str]:
        """The client this request comes from, authenticated by its registered method, and that method. A client
        assertion's ``aud`` must be the token endpoint or one of `audiences`."""
        authorization = request.headers.get("authorization", "")
        if authorization[:6].lower() == "basic ":
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError) as exc:
                raise _invalid_client("malformed Basic authorization header") from exc
            raw_id, colon, raw_secret = decoded.partition(":")
            client_id, secret = unquote_plus(raw_id), unquote_plus(raw_secret)
            client = self._config.client(client_id) if colon else None
            registered = client.client_secret if client is not None else None
            if client is None or _auth_method(client) != "client_secret_basic" or not registered:
                raise _invalid_client("client authentication failed")
            if not hmac.compare_digest(secret.encode(), registered.encode()):
                raise _invalid_client("client authentication failed")
            method = "client_secret_basic"
        elif "client_assertion" in form or "client_assertion_type" in form:
            if form.get("client_assertion_type") != JWT_BEARER:
                raise _invalid_client(f"client_assertion_type must be {JWT_BEARER}")
            client = await self._verify_assertion(form.get("client_assertion", ""), audiences)
            method = "private_key_jwt"
        else:
            found = self._config.client(form.get("client_id", ""))
            if found is None:
                raise _invalid_client("unknown or missing client_id")
            if _auth_method(found) != "none":
                raise _invalid_client(f"client {found.client_id} must authenticate ({_auth_method(found)})")
            client, method = found, "none"
        if "client_id" in form and form["client_id"] != client.client_id:
            raise _invalid_client("client_id does not match the authenticated client")
        return client, method

    async def _verify_assertion(self, assertion: str, audiences: Sequence[str] = ()) -> SmartClient:
        """RFC 7523 §3 and SMART's client-confidential-asymmetric rules; every failure is ``invalid_client``. The
        ``aud`` must be the token endpoint (or one of `audiences`, the URL of the endpoint being called)."""
        accepted = [self.token_endpoint, *audiences]
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise _invalid_client("client_assertion is not a JWT") from exc
        iss = unverified.get("iss")
        client = self._config.client(iss) if isinstance(iss, str) else None
        if client is None:
            raise _invalid_client("client_assertion iss is not a registered client_id")
        if _auth_method(client) != "private_key_jwt":
            raise _invalid_client(f"client {client.client_id} is not registered for private_key_jwt")
        if unverified.get("sub") != iss:
            raise _invalid_client("client_assertion sub must equal iss (the client_id)")
        alg, kid, typ = header.get("alg"), header.get("kid"), header.get("typ")
        if alg not in ASSERTION_ALGORITHMS:
            raise _invalid_client(f"client_assertion alg must be one of {', '.join(ASSERTION_ALGORITHMS)}")
        if not isinstance(kid, str) or not kid:
            raise _invalid_client("client_assertion header has no kid")
        if typ is not None and str(typ).upper() != "JWT":
            raise _invalid_client("client_assertion typ must be JWT")
        jku = header.get("jku")
        if jku is not None and jku != client.jwks_url:
            raise _invalid_client("client_assertion jku is not the JWKS URL registered for this client")
        kty = "RSA" if alg.startswith("RS") else "EC"
        candidates = [k for k in await self._client_keys(client) if k.get("kid") == kid and k.get("kty") == kty]
        if len(candidates) != 1:
            raise _invalid_client(f"no single {kty} key with kid {kid} is registered for client {client.client_id}")
        try:
            key = jwt.PyJWK(candidates[0], algorithm=alg)
            claims = jwt.decode(
                assertion,
                key.key,
                algorithms=[alg],
                audience=accepted,
                issuer=client.client_id,
                options={
                    "require": ["iss", "sub", "aud", "exp", "jti"],
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidAudienceError as exc:
            raise _invalid_client(f"client_assertion aud must be one of {', '.join(accepted)}") from exc
        except jwt.InvalidSignatureError as exc:
            raise _invalid_client(f"client_assertion signature does not verify with key {kid}") from exc
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise _invalid_client(f"client_assertion rejected: {exc}") from exc
        now = self._now().timestamp()
        exp = claims["exp"]
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise _invalid_client("client_assertion exp must be a number")
        if exp <= now - CLOCK_SKEW_S:
            raise _invalid_client("client_assertion has expired")
        if exp > now + ASSERTION_MAX_LIFETIME_S + CLOCK_SKEW_S:
            raise _invalid_client("client_assertion exp must be at most 5 minutes ahead")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > now + CLOCK_SKEW_S:
            raise _invalid_client("client_assertion is not valid yet (nbf)")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise _invalid_client("client_assertion jti must be a non-empty string")
        with self._lock:
            seen = self._state.jtis
            for old in [k for k, until in seen.items() if until + CLOCK_SKEW_S < now]:
                del seen[old]
            if (client.client_id, jti) in seen:
                raise _invalid_client("client_assertion jti was already used")
            seen[(client.client_id, jti)] = float(exp)
        return client

    async def _client_keys(self, client: SmartClient) -> list[dict[str, Any]]:
        if client.jwks is not None:
            keys = client.jwks.get("keys")
        elif client.jwks_url:
            try:
                async with httpx.AsyncClient(timeout=5.0) as http:
                    response = await http.get(client.jwks_url, headers={"Accept": "application/json"})
                response.raise_for_status()
                keys = response.json().get("keys")
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                raise _invalid_client(f"cannot read the JWK Set of client {client.client_id}") from exc
        else:
            raise _invalid_client(f"client {client.client_id} has no registered keys")
        return [k for k in keys if isinstance(k, dict)] if isinstance(keys, list) else []

    def _exchange_code(self, client: SmartClient, form: dict[str, str]) -> dict[str, Any]:
        value = form.get("code", "")
        with self._lock:
            code = self._state.codes.get(value)
            if code is None or code.client_id != client.client_id:
                raise OAuthError("invalid_grant", "unknown authorization code")
            if code.used:
                self._revoke_family(code.family)
                replayed = "authorization code already used; the tokens issued from it are revoked"
                raise OAuthError("invalid_grant", replayed)
            code.used = True
        if self._now() >= code.expires_at:
            raise OAuthError("invalid_grant", "authorization code expired")
        if form.get("redirect_uri") != code.redirect_uri:
            raise OAuthError("invalid_grant", "redirect_uri does not match the authorization request")
        verifier = form.get("code_verifier", "")
        if not _PKCE_VERIFIER.fullmatch(verifier) or not hmac.compare_digest(s256(verifier), code.code_challenge):
            raise OAuthError("invalid_grant", "code_verifier does not match the code_challenge")
        refresh_until = self._now() + timedelta(seconds=self._config.refresh_token_lifetime_s)
        return self._token_body(client.client_id, code.scopes, code.context, code.family, refresh_until, code.nonce)

    def _refresh(self, client: SmartClient, form: dict[str, str]) -> dict[str, Any]:
        value = form.get("refresh_token", "")
        if not value:
            raise OAuthError("invalid_request", "refresh_token is required")
        with self._lock:
            record = self._state.tokens.get(value)
            if record is None or record.kind != "refresh" or record.client_id != client.client_id:
                raise OAuthError("invalid_grant", "unknown refresh token")
            if record.revoked:
                raise OAuthError("invalid_grant", "refresh token revoked")
            if self._now() >= record.expires_at:
                raise OAuthError("invalid_grant", "refresh token expired")
            scopes = record.scopes
            if form.get("scope", "").strip():
                asked = Scopes.parse(form["scope"])
                if not within(asked, record.scopes):
                    raise OAuthError("invalid_scope", "a refresh may only keep or narrow the scope originally granted")
                scopes = asked
            record.revoked = True  # rotated: the new refresh token replaces this one
        return self._token_body(client.client_id, scopes, record.context, record.family, record.expires_at, None)

    def _client_credentials(self, client: SmartClient, method: str, form: dict[str, str]) -> dict[str, Any]:
        if not client.backend:
            raise OAuthError(
                "unauthorized_client", f"client {client.client_id} is not registered for SMART Backend Services"
            )
        if method != "private_key_jwt":
            raise _invalid_client("SMART Backend Services clients authenticate with private_key_jwt only")
        if not form.get("scope", "").strip():
            raise OAuthError("invalid_request", "scope is required")
        system_only = Scopes.parse(form["scope"]).only_contexts(["system"]).only_resource()
        granted = narrow(system_only, Scopes.parse(client.scope).only_contexts(["system"]))
        if not granted.resource:
            raise OAuthError("invalid_scope", "none of the requested system/ scopes is allowed for this client")
        lifetime = min(self._config.access_token_lifetime_s, BACKEND_TOKEN_MAX_S)
        token = self._store_token("access", client.client_id, granted, _Context(), lifetime, None)
        return {"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "scope": granted.text}

    # --- tokens -------------------------------------------------------------------------------------------------

    def _token_body(
        self,
        client_id: str,
        scopes: Scopes,
        context: _Context,
        family: str | None,
        refresh_until: datetime,
        nonce: str | None,
    ) -> dict[str, Any]:
        lifetime = self._config.access_token_lifetime_s
        body: dict[str, Any] = {
            "access_token": self._store_token("access", client_id, scopes, context, lifetime, family),
            "token_type": "Bearer",
            "expires_in": lifetime,
            "scope": scopes.text,
        }
        if any(scopes.has(word) for word in REFRESH_SCOPES):
            refresh_s = max(0, int((refresh_until - self._now()).total_seconds()))
            body["refresh_token"] = self._store_token("refresh", client_id, scopes, context, refresh_s, family)
        if scopes.has("openid") and scopes.has("fhirUser") and context.user:
            body["id_token"] = self._id_token(client_id, context.user, lifetime, nonce)
        return {**body, **_context_fields(context)}

    def _id_token(self, client_id: str, user: str, lifetime: int, nonce: str | None) -> str:
        now = int(self._now().timestamp())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user,
            "aud": client_id,
            "iat": now,
            "exp": now + lifetime,
            "fhirUser": user,
        }
        if nonce is not None:
            claims["nonce"] = nonce
        return jwt.encode(claims, self._key, algorithm=ID_TOKEN_ALGORITHM, headers={"kid": self.kid, "typ": "JWT"})

    def _store_token(
        self,
        kind: Literal["access", "refresh"],
        client_id: str,
        scopes: Scopes,
        context: _Context,
        lifetime_s: int,
        family: str | None,
    ) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._purge()
            now = self._now()
            expires = now + timedelta(seconds=lifetime_s)
            self._state.tokens[token] = _Token(kind, client_id, scopes, context, now, expires, family)
            if family is not None:
                self._state.families.setdefault(family, set()).add(token)
        return token

    def _revoke_family(self, family: str) -> None:
        with self._lock:
            for token in self._state.families.get(family, ()):
                record = self._state.tokens.get(token)
                if record is not None:
                    record.revoked = True

    def _purge(self) -> None:
        """Forget what expired long ago (a day past its expiry: replayed codes must still be recognised)."""
        horizon = self._now() - timedelta(days=1)
        state = self._state
        for table in (state.launches, state.pending, state.codes, state.tokens):
            for key in [k for k, v in table.items() if v.expires_at < horizon]:
                del table[key]
        for family, tokens in list(state.families.items()):
            alive = {token for token in tokens if token in state.tokens}
            if alive:
                state.families[family] = alive
            else:
                del state.families[family]


def _context_fields(context: _Context) -> dict[str, Any]:
    """The launch context as the token response carries it (and so, SMART says, the introspection response)."""
    fields: dict[str, Any] = {}
    if context.patient is not None:
        fields["patient"] = context.patient
    if context.encounter is not None:
        fields["encounter"] = context.encounter
    if context.user is not None:
        fields["fhirUser"] = context.user
    if context.need_patient_banner is not None:
        fields["need_patient_banner"] = context.need_patient_banner
    if context.smart_style_url is not None:
        fields["smart_style_url"] = context.smart_style_url
    if context.fhir_context:
        fields["fhirContext"] = [{"reference": reference} for reference in context.fhir_context]
    if context.app_context is not None:
        fields["appContext"] = context.app_context
    return fields


def _with_query(url: str, params: dict[str, str]) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _redirect(url: str, params: dict[str, str], status: int) -> RedirectResponse:
    return RedirectResponse(_with_query(url, params), status_code=status, headers=NO_STORE)
