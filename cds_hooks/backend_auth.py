"""SMART Backend Services: the service's own access token for population work (the refill scan, approvals).

SMART App Launch 2.2, Backend Services: the client authenticates with a JWT assertion signed by its private
key (``private_key_jwt``, RFC 7523): ``iss`` = ``sub`` = client_id, ``aud`` = the token endpoint, ``exp`` at
most five minutes ahead, a fresh ``jti``, ``kid`` in the header; the token endpoint is read from
``{fhir_base}/.well-known/smart-configuration``. The token is cached until shortly before it expires and
fetched again (never refreshed: Backend Services issues no refresh tokens). Concurrent callers share one
fetch. Nothing here logs the assertion or the token.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ASSERTION_LIFETIME_S = 240
"""Under the five minutes SMART allows, with room for clock skew."""
EARLY_RENEWAL_S = 30
"""A cached token is replaced this long before it expires, so a request never carries an expiring one."""
ALGORITHMS = frozenset({"RS384", "ES384"})
"""What SMART Backend Services requires servers to support; we sign with one of them."""


class BackendAuthError(RuntimeError):
    """No token: the message names the step (discovery, token endpoint) and what the server said."""


@dataclass(frozen=True)
class BackendCredentials:
    client_id: str
    private_key: Any
    """A `cryptography` private key (EC P-384 for ES384, RSA for RS384)."""
    kid: str
    alg: str = "ES384"
    scope: str = "system/*.rs"

    def __post_init__(self) -> None:
        if self.alg not in ALGORITHMS:
            raise ValueError(f"alg must be one of {sorted(ALGORITHMS)}, got {self.alg!r}")


class BackendAuth:
    """Access tokens for `credentials` from the authorization server of `fhir_base`."""

    def __init__(
        self,
        fhir_base: str,
        credentials: BackendCredentials,
        http: httpx.AsyncClient,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`clock` times the cached token's life (monotonic); assertions carry wall-clock time."""
        self.fhir_base = fhir_base.rstrip("/")
        self.credentials = credentials
        self.http = http
        self.clock = clock
        self._token_endpoint: str | None = None
        self._token: tuple[str, float] | None = None
        self._lock = asyncio.Lock()

    async def token_endpoint(self) -> str:
        if self._token_endpoint is None:
            url = f"{self.fhir_base}/.well-known/smart-configuration"
            try:
                response = await self.http.get(url, headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                raise BackendAuthError(f"SMART discovery at {url}: {type(exc).__name__}") from None
            if response.status_code != 200:
                raise BackendAuthError(f"SMART discovery at {url} answered {response.status_code}")
            try:
                endpoint = response.json().get("token_endpoint")
            except ValueError:
                endpoint = None
            if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
                raise BackendAuthError(f"SMART discovery at {url} names no token_endpoint")
            self._token_endpoint = endpoint
        return self._token_endpoint

    def assertion(self, audience: str) -> str:
        """A fresh client assertion for `audience` (the token endpoint)."""
        c = self.credentials
        now = int(time.time())
        claims = {
            "iss": c.client_id,
            "sub": c.client_id,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
            "jti": str(uuid.uuid4()),
        }
        return jwt.encode(claims, c.private_key, algorithm=c.alg, headers={"kid": c.kid, "typ": "JWT"})

    async def token(self) -> str:
        """A valid access token (cached; one fetch at a time)."""
        async with self._lock:
            cached = self._token
            if cached is not None and self.clock() < cached[1] - EARLY_RENEWAL_S:
                return cached[0]
            endpoint = await self.token_endpoint()
            form = {
                "grant_type": "client_credentials",
                "scope": self.credentials.scope,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.assertion(endpoint),
            }
            try:
                response = await self.http.post(endpoint, data=form, headers={"Accept": "application/json"})
            except httpx.HTTPError as exc:
                raise BackendAuthError(f"token endpoint {endpoint}: {type(exc).__name__}") from None
            try:
                body = response.json()
            except ValueError:
                body = None
            if response.status_code != 200 or not isinstance(body, dict):
                error = body.get("error") if isinstance(body, dict) else None
                raise BackendAuthError(
                    f"token endpoint {endpoint} answered {response.status_code}"
                    + (f" ({error}: {str(body.get('error_description', ''))[:200]})" if error else "")
                )
            token, expires_in = body.get("access_token"), body.get("expires_in")
            if not isinstance(token, str) or not token:
                raise BackendAuthError(f"token endpoint {endpoint} answered no access_token")
            lifetime = expires_in if isinstance(expires_in, int) and expires_in > 0 else 300
            self._token = (token, self.clock() + lifetime)
            return token

    def forget(self) -> None:
        """Drop the cached token (after a 401 from the FHIR server, say)."""
        self._token = None


def _b64url_uint(n: int, size: int | None = None) -> str:
    raw = n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def credentials_from_pem(pem: bytes, *, client_id: str, scope: str) -> BackendCredentials:
    """Credentials from a PEM private key: EC P-384 signs ES384, RSA signs RS384. The ``kid`` is the key's
    RFC 7638 JWK thumbprint (what a JWKS published for it carries). Raises ValueError for other keys."""
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if not isinstance(key.curve, ec.SECP384R1):
            raise ValueError(f"the backend key must be EC P-384 (ES384) or RSA (RS384), not EC {key.curve.name}")
        nums = key.public_key().public_numbers()
        members = {"crv": "P-384", "kty": "EC", "x": _b64url_uint(nums.x, 48), "y": _b64url_uint(nums.y, 48)}
        alg = "ES384"
    elif isinstance(key, rsa.RSAPrivateKey):
        rnums = key.public_key().public_numbers()
        members = {"e": _b64url_uint(rnums.e), "kty": "RSA", "n": _b64url_uint(rnums.n)}
        alg = "RS384"
    else:
        raise ValueError(f"the backend key must be EC P-384 (ES384) or RSA (RS384), not {type(key).__name__}")
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode("ascii")
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode("ascii")
    return BackendCredentials(client_id=client_id, private_key=key, kid=kid, alg=alg, scope=scope)
