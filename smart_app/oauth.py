"""The SMART App Launch 2.2 client side: discovery, the authorization request, the code exchange, refresh.

- **Discovery**: ``{iss}/.well-known/smart-configuration`` (cached per ``iss`` for `DISCOVERY_TTL_S`). It must
  name ``authorization_endpoint`` and ``token_endpoint`` and list ``S256`` in
  ``code_challenge_methods_supported`` (SMART 2.x requires PKCE S256; a server that does not list it is refused
  rather than sent a challenge it may ignore).
- **Authorization request** (`authorize_url`): ``response_type=code``, ``client_id``, ``redirect_uri``,
  ``launch`` (EHR launch), ``scope``, ``state``, ``aud`` = the ``iss`` (so a token meant for this FHIR server is
  never issued for another), ``code_challenge`` (S256 of a 86-character verifier) and ``nonce``.
- **Token answers** are checked field by field (`parse_token_answer`): a missing ``access_token``, a token type
  other than Bearer, an ``expires_in`` that is not a number of seconds up to a year (a larger one is no token
  lifetime, and may not even fit a date) or a ``patient`` that is not a FHIR id raise `OAuthFailure` naming the
  field. ``expires_in`` absent counts as 5 minutes (SMART only recommends it).
- **id_token**: received on the back channel straight from the token endpoint, so (OpenID Connect Core
  §3.1.3.7, item 6) its signature is not re-checked; its ``aud`` must be our client id and its ``nonce`` ours
  (present: we always send one, and item 11 then requires it).
  ``fhirUser`` is read from it.
- The tokens themselves never leave the server (`smart_app.sessions`).

Authlib's httpx integration is deprecated as of 1.9 (it warns at import); the two token calls are plain form
POSTs on the service's shared httpx client, and PKCE is RFC 7636 §4.2 in two lines (`s256`).
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

import httpx
import jwt
import orjson

from smart_app.sessions import AppSession, PendingLaunch, Tokens

DISCOVERY_TTL_S: Final = 300.0
MAX_ANSWER_BYTES: Final = 1_000_000
MAX_STYLE_BYTES: Final = 65_536
DEFAULT_EXPIRES_IN: Final = 300
MAX_EXPIRES_IN: Final = 366 * 24 * 3600
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_USER = re.compile(r"(?:.*/)?(Practitioner|PractitionerRole|Patient|RelatedPerson|Person)/[A-Za-z0-9\-.]{1,64}")


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(ASCII(code_verifier))), unpadded."""
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()


class OAuthFailure(Exception):
    """A step of the launch failed. ``title``: what failed, for the page heading; ``str()``: the detail (the
    server's error code and description, or the field that was wrong; never a token). ``status``: the HTTP
    status of the page (400 the request, 403 refused, 502 the EHR answered badly). ``refused``: the EHR said no
    (``invalid_grant`` ...), as opposed to being unreachable."""

    def __init__(self, title: str, detail: str, status: int = 502, *, refused: bool = False) -> None:
        super().__init__(detail)
        self.title, self.status, self.refused = title, status, refused


@dataclass(frozen=True, slots=True)
class SmartServer:
    iss: str
    authorization_endpoint: str
    token_endpoint: str


@dataclass(frozen=True, slots=True)
class Grant:
    tokens: Tokens
    patient: str | None
    encounter: str | None
    fhir_user: str | None
    need_patient_banner: bool
    smart_style_url: str | None
    app_context: str | None


class SmartOAuth:
    def __init__(self, http: httpx.AsyncClient, *, client_id: str, redirect_uri: str) -> None:
        self.http, self.client_id, self.redirect_uri = http, client_id, redirect_uri
        self._discovered: dict[str, tuple[float, SmartServer]] = {}

    async def discover(self, iss: str) -> SmartServer:
        cached = self._discovered.get(iss)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        url = f"{iss}/.well-known/smart-configuration"
        title = "The EHR's SMART configuration could not be read"
        body = await self._json("GET", url, title)
        endpoints = {}
        for key in ("authorization_endpoint", "token_endpoint"):
            value = body.get(key)
            if not isinstance(value, str) or urlsplit(value).scheme not in ("http", "https"):
                raise OAuthFailure(title, f"{url}: {key} is missing or not an http(s) URL")
            endpoints[key] = value
        methods = body.get("code_challenge_methods_supported")
        if not isinstance(methods, list) or "S256" not in methods:
            raise OAuthFailure(
                title, f"{url}: code_challenge_methods_supported does not list S256 (PKCE is required)", 502
            )
        server = SmartServer(iss, endpoints["authorization_endpoint"], endpoints["token_endpoint"])
        self._discovered[iss] = (time.monotonic() + DISCOVERY_TTL_S, server)
        return server

    def authorize_url(self, server: SmartServer, launch: PendingLaunch, *, state: str) -> str:
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "scope": launch.scope,
            "state": state,
            "aud": server.iss,
            "code_challenge": s256(launch.code_verifier),
            "code_challenge_method": "S256",
            "nonce": launch.nonce,
        }
        if launch.launch:
            params["launch"] = launch.launch
        separator = "&" if urlsplit(server.authorization_endpoint).query else "?"
        return f"{server.authorization_endpoint}{separator}{urlencode(params)}"

    async def exchange(self, launch: PendingLaunch, code: str, now: datetime) -> Grant:
        title = "The EHR did not hand over access"
        body = await self._json(
            "POST",
            launch.token_endpoint,
            title,
            form={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "client_id": self.client_id,
                "code_verifier": launch.code_verifier,
            },
        )
        tokens = parse_token_answer(body, now, title, previous_scope=None)
        patient = _optional_str(body, "patient", title)
        if patient is not None and not _FHIR_ID.fullmatch(patient):
            raise OAuthFailure(title, "the token answer's patient is not a FHIR id")
        banner = body.get("need_patient_banner", True)
        if not isinstance(banner, bool):
            raise OAuthFailure(title, "the token answer's need_patient_banner is not true or false")
        return Grant(
            tokens=tokens,
            patient=patient,
            encounter=_optional_str(body, "encounter", title),
            fhir_user=self._fhir_user(body, launch, title),
            need_patient_banner=banner,
            smart_style_url=_optional_str(body, "smart_style_url", title),
            app_context=_optional_str(body, "appContext", title),
        )

    async def refresh(self, session: AppSession, now: datetime) -> Tokens:
        if not session.tokens.refresh_token:
            raise OAuthFailure("Access could not be renewed", "the EHR gave no refresh token", 401, refused=True)
        title = "Access could not be renewed"
        body = await self._json(
            "POST",
            session.token_endpoint,
            title,
            form={
                "grant_type": "refresh_token",
                "refresh_token": session.tokens.refresh_token,
                "client_id": self.client_id,
            },
        )
        tokens = parse_token_answer(body, now, title, previous_scope=session.tokens.scope)
        if tokens.refresh_token is None:  # not rotated: the old one stays valid (RFC 6749 §6)
            tokens = Tokens(tokens.access_token, session.tokens.refresh_token, tokens.access_expires_at, tokens.scope)
        return tokens

    async def style(self, url: str, iss: str) -> dict[str, str] | None:
        """The EHR's ``smart_style_url`` document, sanitized (`sanitize_style`); None when it cannot be used.
        Only fetched from the EHR's own origin (the ``iss``'s scheme and host): the app never fetches an
        arbitrary URL handed to it."""
        a, b = urlsplit(url), urlsplit(iss)
        if (a.scheme, a.netloc) != (b.scheme, b.netloc):
            return None
        try:
            response = await self.http.get(url, headers={"Accept": "application/json"})
        except httpx.HTTPError:
            return None
        if response.status_code != 200 or len(response.content) > MAX_STYLE_BYTES:
            return None
        try:
            doc = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            return None
        return sanitize_style(doc) if isinstance(doc, dict) else None

    def _fhir_user(self, body: dict[str, Any], launch: PendingLaunch, title: str) -> str | None:
        id_token = body.get("id_token")
        if id_token is None:
            return None
        if not isinstance(id_token, str):
            raise OAuthFailure(title, "the token answer's id_token is not a string")
        try:
            claims = jwt.decode(id_token, options={"verify_signature": False, "verify_exp": False})
        except jwt.PyJWTError:
            raise OAuthFailure(title, "the token answer's id_token is not a JWT") from None
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.client_id not in audiences:
            raise OAuthFailure(title, "the id_token was issued to another client (aud)")
        if claims.get("nonce") != launch.nonce:
            raise OAuthFailure(title, "the id_token's nonce is not the one this launch sent")
        user = claims.get("fhirUser")
        if user is None:
            return None
        if not isinstance(user, str) or not _USER.fullmatch(user):
            raise OAuthFailure(title, "the id_token's fhirUser is not a Practitioner/PractitionerRole/... reference")
        match = _USER.fullmatch(user)
        return user[match.start(1) :] if match else user

    async def _json(self, method: str, url: str, title: str, form: dict[str, str] | None = None) -> dict[str, Any]:
        try:
            response = await self.http.request(
                method, url, data=form, headers={"Accept": "application/json"}, follow_redirects=False
            )
        except httpx.TimeoutException:
            raise OAuthFailure(title, f"{_where(url)} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise OAuthFailure(title, f"{_where(url)} could not be reached ({type(exc).__name__})") from None
        content = response.content[: MAX_ANSWER_BYTES + 1]
        try:
            body = orjson.loads(content) if len(content) <= MAX_ANSWER_BYTES else None
        except orjson.JSONDecodeError:
            body = None
        if response.status_code >= 400:
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                description = body.get("error_description")
                text = body["error"] + (f": {description}" if isinstance(description, str) else "")
                refused = response.status_code in (400, 401)
                raise OAuthFailure(title, f"{_where(url)} answered {text[:300]}", 502, refused=refused)
            raise OAuthFailure(title, f"{_where(url)} answered HTTP {response.status_code}")
        if not isinstance(body, dict):
            raise OAuthFailure(title, f"{_where(url)} did not answer with a JSON object")
        return body


def parse_token_answer(body: dict[str, Any], now: datetime, title: str, *, previous_scope: str | None) -> Tokens:
    access = body.get("access_token")
    if not isinstance(access, str) or not access:
        raise OAuthFailure(title, "the token answer has no access_token")
    if not isinstance(body.get("token_type"), str) or body["token_type"].lower() != "bearer":
        raise OAuthFailure(title, "the token answer's token_type is not Bearer")
    expires_in = body.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
        raise OAuthFailure(title, "the token answer's expires_in is not a positive number of seconds")
    if expires_in > MAX_EXPIRES_IN:
        raise OAuthFailure(title, "the token answer's expires_in is over a year")
    scope = body.get("scope", previous_scope)
    if not isinstance(scope, str):
        raise OAuthFailure(title, "the token answer has no scope")
    refresh = body.get("refresh_token")
    if refresh is not None and not isinstance(refresh, str):
        raise OAuthFailure(title, "the token answer's refresh_token is not a string")
    return Tokens(access, refresh or None, now + timedelta(seconds=float(expires_in)), scope)


def _optional_str(body: dict[str, Any], key: str, title: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise OAuthFailure(title, f"the token answer's {key} is not a string")
    return value


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


_COLOR = re.compile(r"#[0-9a-fA-F]{3,8}|rgba?\(\s*[0-9.%]+\s*(,\s*[0-9.%]+\s*){2,3}\)|[a-zA-Z]{3,20}")
_DIM = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3})?(px|rem|em|%)?")
_FONT = re.compile(r"[A-Za-z0-9 ,'\"-]{1,120}")
STYLE_KEYS: Final = {
    "color_background": ("--ehr-background", _COLOR),
    "color_error": ("--ehr-error", _COLOR),
    "color_highlight": ("--ehr-highlight", _COLOR),
    "color_modal_backdrop": ("--ehr-backdrop", _COLOR),
    "color_success": ("--ehr-success", _COLOR),
    "color_text": ("--ehr-text", _COLOR),
    "dim_border_radius": ("--ehr-radius", _DIM),
    "dim_font_size": ("--ehr-font-size", _DIM),
    "dim_spacing_size": ("--ehr-spacing", _DIM),
    "font_family_body": ("--ehr-font-body", _FONT),
    "font_family_heading": ("--ehr-font-heading", _FONT),
}


def sanitize_style(doc: dict[str, Any]) -> dict[str, str]:
    """The SMART style document's known keys whose values are plain colours, sizes or font names, as CSS custom
    properties (``--ehr-text`` ...). Anything else is dropped: the values end up in a stylesheet.

    Quotes are taken out of font lists (``'Times New Roman'`` → ``Times New Roman``, the same family for CSS): the
    page's template escapes them as HTML (``&#39;``), which a ``<style>`` element does not decode."""
    out: dict[str, str] = {}
    for key, (prop, pattern) in STYLE_KEYS.items():
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and pattern is _DIM:
            value = f"{value}px"
        if not isinstance(value, str) or not pattern.fullmatch(value.strip()):
            continue
        value = value.replace("'", "").replace('"', "").strip() if pattern is _FONT else value.strip()
        if value:
            out[prop] = value
    return out
