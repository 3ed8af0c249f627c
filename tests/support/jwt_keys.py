"""Test keys and CDS Hooks client JWTs, for the auth unit tests and the HTTP tests.

    key = ec_key("ehr-1")                              # ES384 on P-384 (rsa_key() for RS384)
    path = write_jwks(tmp_path / "jwks.json", key)     # the JWK Set the service trusts
    clients = client_config(ISS, jwks_path=path)       # IMID_REMS_CDS_CLIENTS JSON text
    token = sign(key, aud="https://cds.example.org/cds-services/x")  # fresh jti, iat now, exp now + 60 s

RSA generation takes tens of milliseconds, so `default_keys` returns one EC and one RSA key made once
per test process; ask `ec_key`/`rsa_key` for a fresh one when a test needs a different key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISS = "https://ehr.example.org/fhir"
"""Default issuer of test tokens."""
AUD = "https://cds.example.org/cds-services/imid-rems"
"""Default audience of test tokens."""


@dataclass(frozen=True)
class SigningKey:
    """A CDS client's key pair: ``kid``, the ``alg`` it signs with, and the private key."""

    kid: str
    alg: str
    private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

    def public_jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK (``kid``, ``alg``, ``use: sig``), as it goes into a JWK Set."""
        public = self.private_key.public_key()
        encoded = (
            ECAlgorithm.to_jwk(public, as_dict=True)
            if isinstance(public, ec.EllipticCurvePublicKey)
            else RSAAlgorithm.to_jwk(public, as_dict=True)
        )
        return {**encoded, "kid": self.kid, "alg": self.alg, "use": "sig", **extra}

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def ec_key(kid: str = "ec-1", alg: str = "ES384") -> SigningKey:
    """A fresh EC key: P-384 for ES384, P-256 for ES256."""
    curve: ec.EllipticCurve = ec.SECP384R1() if alg == "ES384" else ec.SECP256R1()
    return SigningKey(kid, alg, ec.generate_private_key(curve))


def rsa_key(kid: str = "rsa-1", alg: str = "RS384", bits: int = 2048) -> SigningKey:
    """A fresh RSA key (2048 bits unless told)."""
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=bits))


@functools.cache
def default_keys() -> tuple[SigningKey, SigningKey]:
    """(ES384 key "ec-1", RS384 key "rsa-1"), made once per test process."""
    return ec_key(), rsa_key()


def jwks(*keys: SigningKey, extra: Iterable[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A JWK Set of the keys' public halves, plus any ``extra`` raw JWKs (e.g. an ``oct`` key)."""
    return {"keys": [k.public_jwk() for k in keys] + [dict(e) for e in extra]}


def write_jwks(path: Path, *keys: SigningKey, extra: Iterable[Mapping[str, Any]] = ()) -> Path:
    path.write_text(json.dumps(jwks(*keys, extra=extra)), encoding="utf-8")
    return path


def client_config(iss: str = ISS, *, jwks_path: Path | None = None, jwks_url: str | None = None) -> str:
    """``IMID_REMS_CDS_CLIENTS`` JSON for one client."""
    item: dict[str, str] = {"iss": iss}
    if jwks_path is not None:
        item["jwks_path"] = str(jwks_path)
    if jwks_url is not None:
        item["jwks_url"] = jwks_url
    return json.dumps([item])


def sign(
    key: SigningKey,
    *,
    aud: str | list[str] = AUD,
    iss: str = ISS,
    now: datetime | None = None,
    lifetime_s: int = 60,
    jti: Any = None,
    claims: Mapping[str, Any] | None = None,
    omit: Iterable[str] = (),
    headers: Mapping[str, Any] | None = None,
) -> str:
    """A CDS Hooks client JWT signed by ``key``: ``iss``, ``aud``, ``iat`` = ``now`` (default: the
    current time), ``exp`` = ``iat + lifetime_s``, a fresh random ``jti``, header ``kid``/``typ: JWT``.
    ``claims`` adds or overrides claims, ``omit`` drops claims, ``headers`` adds or overrides header
    fields (``{"jku": ...}``)."""
    issued = int((now or datetime.now(UTC)).timestamp())
    payload: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "iat": issued,
        "exp": issued + lifetime_s,
        "jti": jti if jti is not None else str(uuid.uuid4()),
        **(claims or {}),
    }
    for name in omit:
        payload.pop(name, None)
    header = {"kid": key.kid, "typ": "JWT", **(headers or {})}
    return jwt.encode(payload, key.private_key, algorithm=key.alg, headers=header)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unsigned_token(payload: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
    """A hand-built ``alg: none`` token (empty signature), as an attacker would send it."""
    head = {"alg": "none", "typ": "JWT", **(header or {})}
    return ".".join([b64url(json.dumps(head).encode()), b64url(json.dumps(dict(payload)).encode()), ""])


def hmac_token(secret: bytes, payload: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """A token "signed" with HMAC-SHA256 under ``secret`` (the key-confusion attack: the secret is the
    client's public key PEM, which anyone can download). Built by hand because PyJWT rightly refuses
    to use a PEM as an HMAC secret."""
    head = {"alg": "HS256", "typ": "JWT", **header}
    signing_input = b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(dict(payload)).encode())
    signature = hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)
