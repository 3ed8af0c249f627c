"""Who is calling: the CDS Hooks 2.0 client JWT ("Trusting CDS Clients").

Every call from a CDS client carries ``Authorization: Bearer <JWT>`` signed with the client's private
key (https://cds-hooks.hl7.org/2.0/#trusting-cds-clients). `verify` accepts a token only when all of
this holds, and otherwise raises `AuthError` (HTTP 401) saying which check failed:

- header ``alg`` is ES384 or RS384 (the spec's recommendation) or ES256/RS256, decided from the header
  *before* any key is touched: ``none`` and every HMAC algorithm are refused outright (the spec forbids
  them; HS256 "signed" with the client's public key as the secret is the classic key-confusion attack);
  ``kid`` present; ``typ``, when present, is ``JWT``; no ``crit`` extensions;
- ``iss`` is a configured client (`CdsClient`); the token's ``jku``, if any, is exactly that client's
  configured ``jwks_url`` — a ``jku`` is never fetched (the spec says to allowlist it; fetching a URL
  named by an unauthenticated token would let anyone point us at their own keys);
- the key with that ``kid`` in the client's JWK Set fits ``alg`` (RSA ≥ 2048 bits for RS*, EC P-256 for
  ES256, P-384 for ES384) and the signature verifies (PyJWT, with ``algorithms=[alg]``);
- ``aud`` is exactly the URL being called (a string, or a list containing it); ``sub``, when the client
  is configured with one, matches;
- ``exp`` not past and ``iat`` not in the future, both with ``leeway_s`` (default 30 s) for clock skew
  between the EHR and us; the token is accepted up to and including ``exp + leeway``;
- ``exp`` at most ``max_lifetime_s`` (300 s) ahead. CDS Hooks 2.0 sets no maximum; earlier drafts of
  the spec and SMART Backend Services say "no more than five minutes in the future", and we follow
  that: a long-lived token is a long replay window and would keep its ``jti`` row for as long;
- ``jti`` present and not seen before for this ``iss`` while the earlier token could still be accepted
  (`ReplayCache`: in the database, so every replica and a restarted process see it).

Keys come from a JWK Set per client, read from a file or fetched from the configured URL (`JwksStore`):
cached for ``ttl_s`` (10 min), re-fetched early when a token names an unknown ``kid`` (key rotation)
but at most once per ``min_refetch_s`` (30 s) per client, whatever the outcome, so a stream of forged
tokens with random kids cannot turn us into a request amplifier against the EHR's JWKS host.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import types
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import httpx
import jwt
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from sqlalchemy import Engine

from cds_hooks import db

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS: Final = ("ES384", "RS384", "ES256", "RS256")
_KEY_FOR_ALG: Final[Mapping[str, tuple[str, str | None]]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
}
MIN_RSA_BITS: Final = 2048
DEFAULT_LEEWAY_S: Final = 30
MAX_LIFETIME_S: Final = 300
MAX_TOKEN_CHARS: Final = 16_384
MAX_JTI_CHARS: Final = 255  # cds_jti.jti
_LOCAL_HOSTS: Final = frozenset({"127.0.0.1", "localhost", "::1"})


class AuthError(Exception):
    """The request is not authenticated (HTTP 401). ``message`` says what was wrong, never with key
    material; it is safe to return to the client and to log."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JwksUnavailable(AuthError):
    """The client's JWK Set could not be read (network, HTTP status, size, not a JWK Set). Still an
    `AuthError` (we cannot authenticate the caller); the app may answer 503 instead of 401."""


class ClientConfigError(ValueError):
    """The trusted-client configuration (``IMID_REMS_CDS_CLIENTS``) or a JWKS file is wrong; the
    service must refuse to start. The message names the item and field."""


def _quote(value: object, limit: int = 120) -> str:
    """repr() of attacker-controlled text, cut short so a huge claim cannot flood a log line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# ---------------------------------------------------------------------------------------------------
# Trusted clients


@dataclass(frozen=True, slots=True)
class CdsClient:
    """A CDS client (EHR) we trust: its JWT ``iss``, where its public keys are (exactly one of
    ``jwks_url`` — https, or http on 127.0.0.1/localhost for tests — and ``jwks_path``), and optionally
    the ``sub`` (client_id) its tokens must carry."""

    iss: str
    jwks_url: str | None = None
    jwks_path: Path | None = None
    sub: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.iss, str) or not self.iss.strip():
            raise ValueError("iss: must be a non-empty string")
        if (self.jwks_url is None) == (self.jwks_path is None):
            raise ValueError("give exactly one of jwks_url and jwks_path")
        if self.jwks_url is not None:
            _check_jwks_url(self.jwks_url)
        if self.sub is not None and (not isinstance(self.sub, str) or not self.sub):
            raise ValueError("sub: must be a non-empty string when given")

    @property
    def jwks_source(self) -> str:
        return self.jwks_url if self.jwks_url is not None else str(self.jwks_path)


def _check_jwks_url(url: object) -> None:
    if not isinstance(url, str):
        raise ValueError(f"jwks_url: must be a string, got {type(url).__name__}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS:
        return
    raise ValueError(f"jwks_url: {url!r} must be an https:// URL (http:// only for 127.0.0.1 or localhost)")


_CLIENT_FIELDS: Final = ("iss", "jwks_url", "jwks_path", "sub")


def load_clients(json_text: str) -> tuple[CdsClient, ...]:
    """Parse ``IMID_REMS_CDS_CLIENTS``: a JSON list of ``{"iss", "jwks_url" | "jwks_path", "sub"?}``.

    Raises `ClientConfigError` naming the item and field (``cds_clients[1].jwks_url: ...``) for bad
    JSON, a missing or misspelt field, a non-https URL, or an ``iss`` listed twice."""
    try:
        raw = json.loads(json_text)
    except json.JSONDecodeError as exc:
        raise ClientConfigError(f"cds_clients: not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ClientConfigError(f"cds_clients: expected a JSON list of clients, got {type(raw).__name__}")
    clients: list[CdsClient] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        where = f"cds_clients[{i}]"
        if not isinstance(item, dict):
            raise ClientConfigError(f"{where}: expected an object, got {type(item).__name__}")
        unknown = sorted(set(item) - set(_CLIENT_FIELDS))
        if unknown:
            raise ClientConfigError(f"{where}.{unknown[0]}: unknown field; expected {', '.join(_CLIENT_FIELDS)}")
        for name in _CLIENT_FIELDS:
            if name in item and not isinstance(item[name], str):
                raise ClientConfigError(f"{where}.{name}: must be a string, got {type(item[name]).__name__}")
        if "iss" not in item:
            raise ClientConfigError(f"{where}.iss: missing")
        if ("jwks_url" in item) == ("jwks_path" in item):
            raise ClientConfigError(f"{where}: give exactly one of jwks_url and jwks_path")
        if "jwks_path" in item and not item["jwks_path"].strip():
            raise ClientConfigError(f"{where}.jwks_path: must not be empty")
        try:
            client = CdsClient(
                iss=item["iss"],
                jwks_url=item.get("jwks_url"),
                jwks_path=Path(item["jwks_path"]) if "jwks_path" in item else None,
                sub=item.get("sub"),
            )
        except ValueError as exc:
            message = str(exc)
            raise ClientConfigError(
                f"{where}.{message}" if message.split(":")[0] in _CLIENT_FIELDS else f"{where}: {message}"
            ) from None
        if client.iss in seen:
            raise ClientConfigError(f"{where}.iss: {client.iss!r} is already cds_clients[{seen[client.iss]}]")
        seen[client.iss] = i
        clients.append(client)
    return tuple(clients)


# ---------------------------------------------------------------------------------------------------
# JWK Sets


class JwksError(Exception):
    """A JWK Set could not be read or parsed (message without key material)."""


def parse_jwks(raw: bytes | str) -> dict[str, list[dict[str, Any]]]:
    """The usable public verification keys of a JWK Set, by ``kid``.

    Ignored: keys without a ``kid`` (a CDS Hooks token always names its key), of a type we never verify
    with (``oct`` — a shared secret has no place in a public JWK Set — ``OKP``, ...), with ``use`` other
    than ``sig``, EC curves other than P-256/P-384, RSA keys under 2048 bits, and keys that do not
    load. Private members (``d``, ``p``, ...) are dropped. Raises `JwksError` if nothing usable is left."""
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise JwksError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksError("not a JWK Set: no 'keys' list")
    usable: dict[str, list[dict[str, Any]]] = {}
    for i, jwk in enumerate(doc["keys"]):
        reason = _unusable(jwk)
        if reason:
            log.info("JWK Set key %d ignored: %s", i, reason)
            continue
        public = {name: jwk[name] for name in ("kty", "kid", "alg", "use", "crv", "x", "y", "n", "e") if name in jwk}
        usable.setdefault(jwk["kid"], []).append(public)
    if not usable:
        raise JwksError("no usable key (RSA of 2048+ bits or EC P-256/P-384, with a kid, for signatures)")
    return usable


def _unusable(jwk: Any) -> str | None:
    if not isinstance(jwk, dict):
        return "not an object"
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        return "no kid"
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC"):
        return f"kty {_quote(kty)} is not used for CDS Hooks signatures"
    if jwk.get("use", "sig") != "sig":
        return f"use {_quote(jwk.get('use'))}"
    alg = jwk.get("alg")
    if alg is not None and alg not in ALLOWED_ALGORITHMS:
        return f"alg {_quote(alg)} is not accepted"
    try:
        if kty == "RSA":
            if RSAAlgorithm.from_jwk({k: jwk[k] for k in ("kty", "n", "e") if k in jwk}).key_size < MIN_RSA_BITS:
                return f"RSA key shorter than {MIN_RSA_BITS} bits"
        else:
            if jwk.get("crv") not in ("P-256", "P-384"):
                return f"EC curve {_quote(jwk.get('crv'))} is not accepted"
            ECAlgorithm.from_jwk({k: jwk[k] for k in ("kty", "crv", "x", "y") if k in jwk})
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        return f"does not load: {exc}"
    return None


def _fits(jwk: Mapping[str, Any], alg: str) -> bool:
    kty, crv = _KEY_FOR_ALG[alg]
    return jwk["kty"] == kty and (crv is None or jwk.get("crv") == crv) and jwk.get("alg", alg) == alg


def _describe(jwk: Mapping[str, Any]) -> str:
    kind = f"{jwk['kty']} {jwk['crv']}" if "crv" in jwk else str(jwk["kty"])
    return f"{kind} (alg {jwk['alg']})" if "alg" in jwk else kind


@dataclass
class _KeySet:
    keys: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fetched_at: float | None = None  # last success (clock seconds)
    attempted_at: float | None = None  # last attempt, successful or not
    error: str | None = None  # why the last attempt failed
    prepared: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JwksStore:
    """The trusted clients' public keys, cached (see the module docstring for the policy).

    ``jwks_path`` files are read when the store is built — a missing or unusable file raises
    `ClientConfigError`, so a bad configuration stops the service at start — and re-read on the same
    schedule as URLs (so a rotated file is picked up). URLs are fetched on first use with ``http``
    (an ``httpx.AsyncClient``; by default one of our own, no redirects), each fetch limited to
    ``timeout_s`` and ``max_bytes``. When a refresh fails the previous keys stay in use for up to
    ``max_stale_s`` (availability over freshness: an EHR's JWKS host hiccup must not stop order-time
    checks); after that, or when no fetch ever succeeded, `key` raises `JwksUnavailable`."""

    def __init__(
        self,
        clients: Iterable[CdsClient],
        *,
        http: httpx.AsyncClient | None = None,
        ttl_s: float = 600.0,
        min_refetch_s: float = 30.0,
        max_stale_s: float = 86_400.0,
        timeout_s: float = 5.0,
        max_bytes: int = 256 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl_s = ttl_s
        self._min_refetch_s = min_refetch_s
        self._max_stale_s = max_stale_s
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._http = http
        self._owns_http = http is None
        self._sets: dict[str, _KeySet] = {}
        self.fetch_count = 0
        """Reads/fetches attempted so far (for tests and metrics)."""
        for client in clients:
            key_set = self._sets[client.iss] = _KeySet()
            if client.jwks_path is not None:
                try:
                    key_set.keys = parse_jwks(self._read_file(client.jwks_path))
                except JwksError as exc:
                    raise ClientConfigError(f"JWKS file {str(client.jwks_path)!r} of {client.iss!r}: {exc}") from None
                key_set.fetched_at = key_set.attempted_at = self._clock()

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def key(self, client: CdsClient, kid: str, alg: str) -> jwt.PyJWK:
        """The key of ``client`` named ``kid`` that can verify ``alg``. Raises `AuthError` for an
        unknown kid or a key of the wrong type, `JwksUnavailable` if the keys cannot be had."""
        key_set = self._sets.get(client.iss)
        if key_set is None:
            key_set = self._sets[client.iss] = _KeySet()
        if key_set.fetched_at is None or self._clock() - key_set.fetched_at >= self._ttl_s:
            await self._refresh(client, key_set)
        if kid not in key_set.keys:
            await self._refresh(client, key_set)  # rotation: maybe a new key (rate-limited)
        if key_set.fetched_at is None:
            raise JwksUnavailable(f"cannot retrieve the JWK Set of issuer {_quote(client.iss)}: {key_set.error}")
        if self._clock() - key_set.fetched_at >= self._max_stale_s:
            raise JwksUnavailable(
                f"the JWK Set of issuer {_quote(client.iss)} could not be refreshed for too long: {key_set.error}"
            )
        candidates = key_set.keys.get(kid)
        if not candidates:
            raise AuthError(f"unknown kid {_quote(kid)} for issuer {_quote(client.iss)}")
        prepared = key_set.prepared.get((kid, alg))
        if prepared is not None:
            return prepared
        for jwk in candidates:
            if _fits(jwk, alg):
                prepared = key_set.prepared[(kid, alg)] = jwt.PyJWK(jwk, algorithm=alg)
                return prepared
        raise AuthError(
            f"key {_quote(kid)} of issuer {_quote(client.iss)} is {_describe(candidates[0])}, which cannot verify {alg}"
        )

    async def _refresh(self, client: CdsClient, key_set: _KeySet) -> None:
        async with key_set.lock:  # concurrent requests wait for one fetch instead of each fetching
            now = self._clock()
            if key_set.attempted_at is not None and now - key_set.attempted_at < self._min_refetch_s:
                return
            key_set.attempted_at = now
            self.fetch_count += 1
            try:
                raw = await self._fetch(client)
                keys = parse_jwks(raw)
            except JwksError as exc:
                key_set.error = str(exc)
                log.warning("JWK Set of %r from %s: %s", client.iss, client.jwks_source, exc)
                return
            key_set.keys, key_set.prepared = keys, {}
            key_set.fetched_at, key_set.error = self._clock(), None

    async def _fetch(self, client: CdsClient) -> bytes:
        if client.jwks_path is not None:
            return self._read_file(client.jwks_path)
        assert client.jwks_url is not None  # noqa: S101 - CdsClient guarantees one of the two
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False, trust_env=True)
        try:
            async with self._http.stream(
                "GET",
                client.jwks_url,
                headers={"Accept": "application/jwk-set+json, application/json"},
                timeout=self._timeout_s,
            ) as response:
                if response.status_code != 200:
                    raise JwksError(f"HTTP {response.status_code} from {client.jwks_url}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self._max_bytes:
                    raise JwksError(f"larger than {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise JwksError(f"larger than {self._max_bytes} bytes")
                return bytes(body)
        except httpx.TimeoutException:
            raise JwksError(f"timed out after {self._timeout_s} s fetching {client.jwks_url}") from None
        except httpx.HTTPError as exc:
            raise JwksError(f"cannot fetch {client.jwks_url}: {type(exc).__name__}") from None

    def _read_file(self, path: Path) -> bytes:
        try:
            if path.stat().st_size > self._max_bytes:
                raise JwksError(f"larger than {self._max_bytes} bytes")
            return path.read_bytes()
        except OSError as exc:
            raise JwksError(f"cannot read: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------------
# Replay cache


class ReplayCache:
    """Remembers each accepted (iss, jti) in the database until the token could no longer be accepted.

    Why the database and not memory: the service may run as several replicas behind a load balancer,
    and restarts; an in-memory set would let a captured token be replayed against another replica or
    after a restart. Why an INSERT on a unique key: two replicas receiving the same token at the same
    instant both "see nothing" in a read-then-write; the unique constraint makes the database pick
    exactly one winner.

    `remember` is synchronous: on SQLite (a local file, ~0.05 ms) call it inline; for a networked
    database (``blocking`` is True) `verify` runs it in a worker thread. Expired rows are purged at
    most once per ``purge_every_s`` by whichever call comes due, in its own short transaction."""

    def __init__(self, engine: Engine, *, purge_every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self._ledger = db.JtiLedger(engine)
        self._purge_every_s = purge_every_s
        self._clock = clock
        self._next_purge = clock()
        self.blocking = engine.dialect.name != "sqlite"

    def remember(self, iss: str, jti: str, expires_at: datetime, *, now: datetime | None = None) -> bool:
        """Record (iss, jti) until ``expires_at``. False if it is already recorded and still live: a
        replay. (A leftover row whose ``expires_at`` has passed is taken over, not counted.)"""
        now = now or datetime.now(UTC)
        fresh = self._ledger.claim(iss, jti, expires_at, now)
        if self._clock() >= self._next_purge:
            self._next_purge = self._clock() + self._purge_every_s
            self.purge(now)
        return fresh

    def purge(self, now: datetime | None = None) -> int:
        """Delete every row expired at ``now``; returns how many."""
        return self._ledger.purge(now or datetime.now(UTC))


# ---------------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True, slots=True)
class Claims:
    """What an accepted token says: who called (``iss``, ``sub``, ``tenant``), for which endpoint
    (``aud``), and the token's identity and lifetime. ``payload`` has every claim as sent."""

    iss: str
    sub: str | None
    aud: str
    jti: str
    issued_at: datetime
    expires_at: datetime
    tenant: str | None
    kid: str
    alg: str
    payload: Mapping[str, Any]


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value; `AuthError` otherwise."""
    if not authorization or not authorization.strip():
        raise AuthError("no Authorization header: send 'Authorization: Bearer <JWT>'")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be 'Bearer <JWT>'")
    return token.strip()


_JWT_ERRORS: Final[Sequence[tuple[type[jwt.PyJWTError], str]]] = (
    (jwt.InvalidSignatureError, "JWT signature does not verify with key {kid} of issuer {iss}"),
    (jwt.InvalidAudienceError, "JWT aud {aud} is not this endpoint {audience}"),
    (jwt.InvalidIssuerError, "JWT iss is not {iss}"),
    (jwt.exceptions.InvalidSubjectError, "JWT sub {sub} is not the client_id configured for issuer {iss}"),
    (jwt.exceptions.InvalidJTIError, "JWT jti must be a string"),
    (jwt.InvalidAlgorithmError, "JWT alg does not match key {kid}"),
)


async def verify(
    token: str,
    *,
    audience: str,
    clients: Sequence[CdsClient],
    keys: JwksStore,
    replay: ReplayCache,
    now: datetime | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
    max_lifetime_s: int = MAX_LIFETIME_S,
) -> Claims:
    """Check a CDS client's JWT for a call to ``audience`` (the full URL of the endpoint called, e.g.
    ``https://cds.example.org/cds-services/imid-rems-order-select``) and record its ``jti``.

    Returns the `Claims`; raises `AuthError` (401) naming the first check that failed, or
    `JwksUnavailable` (a subclass) when the client's keys cannot be retrieved."""
    now = now or datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be tz-aware")
    if not isinstance(token, str) or not token.strip():
        raise AuthError("no bearer token")
    token = token.strip()
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthError(f"JWT longer than {MAX_TOKEN_CHARS} characters")
    if token.count(".") != 2:
        raise AuthError("malformed JWT: expected three base64url parts separated by dots")
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise AuthError(f"malformed JWT: {exc}") from None

    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AuthError(f"JWT alg {_quote(alg)} is not accepted; sign with one of {', '.join(ALLOWED_ALGORITHMS)}")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise AuthError(f"JWT typ {_quote(typ)} is not 'JWT'")
    if "crit" in header:
        raise AuthError("JWT header 'crit' extensions are not supported")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError("JWT header has no kid")

    iss = unverified.get("iss")
    if not isinstance(iss, str) or not iss:
        raise AuthError("JWT has no iss claim")
    client = next((c for c in clients if c.iss == iss), None)
    if client is None:
        raise AuthError(f"unknown issuer {_quote(iss)}: not a trusted CDS client")
    jku = header.get("jku")
    if jku is not None and jku != client.jwks_url:
        raise AuthError(f"JWT jku {_quote(jku)} is not the JWK Set URL configured for issuer {_quote(iss)}")

    key = await keys.key(client, kid, alg)
    try:
        payload = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=audience,
            issuer=client.iss,
            subject=client.sub,
            options={
                "require": ["iss", "aud", "exp", "iat", "jti"],
                "verify_exp": False,  # time is checked below against `now`
                "verify_iat": False,
                "verify_nbf": False,
                "strict_aud": False,
                "enforce_minimum_key_length": True,
            },
        )
    except jwt.MissingRequiredClaimError as exc:
        raise AuthError(f"JWT has no {exc.claim} claim") from None
    except jwt.PyJWTError as exc:
        for kind, template in _JWT_ERRORS:
            if isinstance(exc, kind):
                raise AuthError(
                    template.format(
                        kid=_quote(kid),
                        iss=_quote(iss),
                        aud=_quote(unverified.get("aud")),
                        audience=_quote(audience),
                        sub=_quote(unverified.get("sub")),
                    )
                ) from None
        raise AuthError(f"invalid JWT: {exc}") from None

    exp = _seconds(payload, "exp")
    iat = _seconds(payload, "iat")
    now_s = now.timestamp()
    if now_s > exp + leeway_s:
        raise AuthError(f"JWT expired at {_iso(exp)} (now {_iso(now_s)}, leeway {leeway_s} s)")
    if exp > now_s + max_lifetime_s + leeway_s:
        raise AuthError(
            f"JWT exp {_iso(exp)} is more than {max_lifetime_s} s ahead (now {_iso(now_s)}): tokens must be short-lived"
        )
    if iat > now_s + leeway_s:
        raise AuthError(f"JWT iat {_iso(iat)} is in the future (now {_iso(now_s)}, leeway {leeway_s} s)")
    if "nbf" in payload and _seconds(payload, "nbf") > now_s + leeway_s:
        raise AuthError(f"JWT not valid before {_iso(_seconds(payload, 'nbf'))} (now {_iso(now_s)})")

    jti = payload["jti"]
    if not jti:
        raise AuthError("JWT has no jti claim")
    if len(jti) > MAX_JTI_CHARS:
        raise AuthError(f"JWT jti longer than {MAX_JTI_CHARS} characters")
    tenant = payload.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise AuthError("JWT tenant must be a string")

    expires_at = datetime.fromtimestamp(exp + leeway_s, UTC)  # the last instant this token is accepted
    if replay.blocking:
        fresh = await asyncio.to_thread(replay.remember, iss, jti, expires_at, now=now)
    else:
        fresh = replay.remember(iss, jti, expires_at, now=now)
    if not fresh:
        raise AuthError(f"JWT jti {_quote(jti)} of issuer {_quote(iss)} was already used: replay refused")

    sub = payload.get("sub")
    return Claims(
        iss=iss,
        sub=sub if isinstance(sub, str) else None,
        aud=audience,
        jti=jti,
        issued_at=datetime.fromtimestamp(iat, UTC),
        expires_at=datetime.fromtimestamp(exp, UTC),
        tenant=tenant,
        kid=kid,
        alg=alg,
        payload=types.MappingProxyType(dict(payload)),
    )


def _seconds(payload: Mapping[str, Any], claim: str) -> float:
    value = payload.get(claim)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthError(f"JWT {claim} must be a number of seconds since 1970-01-01T00:00:00Z")
    if abs(value) > 253_402_300_799:  # beyond year 9999: datetime cannot represent it
        raise AuthError(f"JWT {claim} is out of range")
    return float(value)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")
