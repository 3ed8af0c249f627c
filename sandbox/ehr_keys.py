"""The sandbox EHR's CDS client key: the EC P-384 key it signs its CDS Hooks JWTs with (ES384).

    key = load_or_create_key(state_dir)     # or generate_key() for a key that lives in memory only
    key.public_jwks()                       # {"keys": [...]}: served at {base_url}/.well-known/jwks.json

The ``kid`` is the key's RFC 7638 JWK thumbprint, so a key loaded from disk keeps its ``kid`` without a
second file. The private key is stored as unencrypted PKCS#8 PEM, readable by its owner only: this is a
development tool, and the key only lets its holder call the local imid-rems service.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALG: Final = "ES384"
KEY_FILE: Final = "cds-client-key.pem"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class EhrKey:
    """An EC P-384 private key and its ``kid``."""

    private_key: ec.EllipticCurvePrivateKey
    alg: str = ALG

    def __post_init__(self) -> None:
        if not isinstance(self.private_key.curve, ec.SECP384R1):
            raise ValueError(f"the CDS client key must be on P-384 for ES384, not {self.private_key.curve.name}")

    def _public_members(self) -> dict[str, str]:
        numbers = self.private_key.public_key().public_numbers()
        size = 48  # P-384 coordinates are 48 bytes
        return {
            "crv": "P-384",
            "kty": "EC",
            "x": _b64url(numbers.x.to_bytes(size, "big")),
            "y": _b64url(numbers.y.to_bytes(size, "big")),
        }

    @property
    def kid(self) -> str:
        """RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order, no whitespace."""
        canonical = json.dumps(self._public_members(), separators=(",", ":"), sort_keys=True)
        return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())

    def public_jwk(self) -> dict[str, Any]:
        return {**self._public_members(), "kid": self.kid, "alg": self.alg, "use": "sig"}

    def public_jwks(self) -> dict[str, Any]:
        """The JWK Set the CDS service trusts (public half only)."""
        return {"keys": [self.public_jwk()]}

    def private_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def generate_key() -> EhrKey:
    return EhrKey(ec.generate_private_key(ec.SECP384R1()))


def load_key(path: Path) -> EhrKey:
    """Read a PEM private key; refuse anything that is not an EC P-384 key."""
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} does not hold an EC private key")
    return EhrKey(loaded)


def save_key(key: EhrKey, path: Path) -> None:
    """Write the key atomically, mode 0600 (never world- or group-readable, even for an instant)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".cds-client-key-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.private_pem())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_create_key(directory: Path) -> EhrKey:
    """The key in ``directory/cds-client-key.pem``, created there on first use."""
    path = directory / KEY_FILE
    if path.exists():
        return load_key(path)
    key = generate_key()
    save_key(key, path)
    return key
