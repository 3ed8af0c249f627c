"""What the sandbox EHR's parts share: its URLs, the registered SMART clients, its clock.

One sandbox app (`sandbox.app`, one port) plays the EHR around imid-rems:

- ``{base_url}/fhir`` — the FHIR base apps see: a gateway that checks the access token (issued by the
  sandbox authorization server) and its SMART v2 scopes, then forwards to the Medplum engine
  (`fhir_upstream`, an internal port). ``{base_url}/fhir/.well-known/smart-configuration`` is SMART
  discovery.
- ``{base_url}/auth/authorize``, ``/auth/token`` — the SMART authorization server (EHR launch,
  standalone launch, refresh tokens, SMART Backend Services).
- ``{base_url}/`` and ``{base_url}/ehr/...`` — the EHR pages: the launcher and the page that fires the
  CDS hooks at `cds_services_url` and renders the cards.
- ``{base_url}/.well-known/jwks.json`` — the public key the sandbox signs its CDS Hooks JWTs with (the
  imid-rems service is configured to trust it).

Everything here is a development tool: tokens, codes and launches live in the sandbox process's memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

TokenAuth = Literal["none", "client_secret_basic", "private_key_jwt"]


@dataclass(frozen=True)
class SmartClient:
    """A client registered with the sandbox authorization server.

    - ``token_endpoint_auth_method``: ``none`` (public client: PKCE alone), ``client_secret_basic``
      (confidential, `client_secret`), ``private_key_jwt`` (asymmetric: a JWT assertion signed with a key
      of `jwks` / `jwks_url`; the only method SMART Backend Services allows).
    - ``redirect_uris``: exact-match list; ``launch_url``: where an EHR launch sends the browser
      (``?iss=...&launch=...``); ``scope``: the most this client may ever be granted (space-separated
      SMART v2 scopes; a request for more is narrowed to this).
    - ``backend``: may use ``grant_type=client_credentials`` (SMART Backend Services).
    """

    client_id: str
    redirect_uris: tuple[str, ...] = ()
    launch_url: str | None = None
    token_endpoint_auth_method: TokenAuth = "none"  # noqa: S105 (a method name, not a secret)
    client_secret: str | None = None
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    scope: str = ""
    backend: bool = False
    name: str = ""


@dataclass
class SandboxConfig:
    """The sandbox's URLs (no trailing slashes), clients and clock.

    `now` is the clock every part reads (tests move it to expire codes and tokens)."""

    base_url: str
    fhir_upstream: str
    cds_services_url: str | None = None
    clients: tuple[SmartClient, ...] = ()
    state_dir: Path | None = None
    now: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    access_token_lifetime_s: int = 3600
    refresh_token_lifetime_s: int = 7 * 24 * 3600
    code_lifetime_s: int = 60
    smart_style_url: str | None = None

    @property
    def fhir_base(self) -> str:
        """The FHIR base URL apps are given (``iss``, ``aud``, ``fhirServer``)."""
        return f"{self.base_url}/fhir"

    def client(self, client_id: str) -> SmartClient | None:
        return next((c for c in self.clients if c.client_id == client_id), None)


class Launches(Protocol):
    """Where the EHR pages register an EHR launch (the authorization server implements it): the returned
    opaque ``launch`` id goes to the app as ``?iss={fhir_base}&launch={id}`` and binds this context to the
    authorization that follows. `user` is the ``fhirUser`` (``Practitioner/x``); `patient` a Patient id or
    None for a user-level launch (the pharmacist's worklist)."""

    def create_launch(
        self,
        *,
        client_id: str,
        user: str,
        patient: str | None,
        encounter: str | None = None,
        need_patient_banner: bool = True,
        app_context: str | None = None,
    ) -> str: ...
