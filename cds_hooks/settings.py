"""Service settings from the environment (``IMID_REMS_*``), built by `get_settings()` — no import-time
instance, so tests and commands build their own."""

from __future__ import annotations

import os
import re
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from rems.config import Config, default_config, load_config


def server_zone() -> tzinfo:
    """The server's IANA zone (DST-aware): $TZ, else the /etc/localtime link, else a fixed offset."""
    name = os.environ.get("TZ", "").lstrip(":")
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            return ZoneInfo(target.split("zoneinfo/", 1)[1])
    except (OSError, ZoneInfoNotFoundError, ValueError):
        pass
    return datetime.now().astimezone().tzinfo or ZoneInfo("UTC")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMID_REMS_", frozen=True)

    clinic_tz: str | None = None
    """IANA zone in which REMS calendar days are counted; default the server's zone."""
    config: Path | None = None
    """Institution override TOML for programs/protocol (merged over rems/data/*.toml)."""
    max_body_bytes: int = 2_000_000
    """Largest hook request accepted (a full prefetch is ~50 kB; 2 MB leaves room for long charts)."""
    database_url: str = "sqlite:///imid-rems.sqlite"
    """SQLAlchemy URL of the service's database (JWT replay cache, feedback, later refill drafts).
    Default: a SQLite file in the working directory; production: ``postgresql+psycopg://...``."""
    cds_clients: str = "[]"
    """JSON list of trusted CDS clients: ``[{"iss": "...", "jwks_url": "https://..."}]`` or
    ``{"iss": ..., "jwks_path": "/path/jwks.json"}``. Only these issuers are accepted."""
    cds_auth: Literal["on", "off"] = "on"
    """``off`` disables JWT checks on the CDS endpoints, for local development only (logged loudly)."""
    public_base_url: str | None = None
    """The service's external base URL (behind a proxy) used as the JWT ``aud`` and in links;
    default: the URL each request was made to."""
    fhir_timeout_s: float = 5.0
    """Timeout of each FHIR request made when prefetch data is missing."""
    smart_launch_url: str | None = None
    """The SMART app's launch URL, for ``smart`` links on cards (fixes done in the app: authorization
    number, risk category). None: cards carry no app links."""
    cors_origins: str = "*"
    """Comma-separated origins allowed to call from a browser (CDS clients running in a web page).
    ``*`` is safe here: calls carry a bearer JWT, never cookies, so CORS grants no ambient authority."""

    fhir_base_url: str | None = None
    """The EHR's FHIR R4 base for population work: the refill scan and approvals' write-back (SMART Backend
    Services). None: no scan, and the review API answers 503."""
    backend_client_id: str | None = None
    """Our client id at the EHR's authorization server (Backend Services, ``private_key_jwt``)."""
    backend_key_file: Path | None = None
    """PEM private key of that client: EC P-384 (signs ES384) or RSA (RS384); ``kid`` = RFC 7638 thumbprint."""
    backend_scope: str = (
        "system/Patient.rs system/MedicationRequest.rs system/MedicationDispense.rs system/Observation.rs "
        "system/Condition.rs system/Procedure.rs system/Appointment.rs system/Medication.rs "
        "system/PractitionerRole.rs system/MedicationRequest.c system/Provenance.c"
    )
    """What the scan reads and the approval writes; nothing more."""
    refill_horizon_days: int = Field(default=10, ge=1, le=28)
    """Draft the next prescription when this many days of supply or fewer are left (the pharmacy may dispense
    at 7)."""
    refill_scan_interval_s: float = Field(default=3600.0, ge=0)
    """Period of the scan inside ``imid-rems serve`` (0: no periodic scan). It runs only when
    ``fhir_base_url`` and the backend client are configured."""
    refill_scan_page_size: int = Field(default=500, ge=1, le=1000)
    refill_scan_batch_size: int = Field(default=50, ge=1, le=200)
    refill_scan_concurrency: int = Field(default=4, ge=1, le=32)
    authorization_pattern: str = r"[0-9]{6,12}"
    """What a REMS authorization number entered by a pharmacist must match (full match, after trimming)."""
    api_token_cache_s: float = Field(default=60.0, ge=0)
    """How long an introspected bearer token (and the user's pharmacist role) is trusted before asking again."""

    smart_client_id: str = "imid-rems-app"
    """The SMART app's client id at the EHR's authorization server (a public client: PKCE, no secret)."""
    smart_issuers: str = ""
    """Comma-separated FHIR base URLs the SMART app may be launched from (``iss``). A launch naming any other
    server is refused: the app would otherwise send the user's authorization request, and later the user's
    token, wherever a link told it to. Empty: the app refuses every launch (and says so)."""
    smart_scope: str = (
        "launch openid fhirUser offline_access "
        "patient/Patient.rs patient/MedicationRequest.rs patient/MedicationDispense.rs patient/Observation.rs "
        "patient/Condition.rs patient/Procedure.rs patient/Appointment.rs patient/Medication.rs "
        "user/MedicationRequest.crs user/Provenance.c"
    )
    """SMART v2 scopes the app asks for: the patient page's reads in the launch patient's compartment, and
    what an approval writes as the pharmacist (a MedicationRequest, looked up by its key first, and its
    Provenance). ``launch/patient`` is added for a standalone launch."""
    smart_frame_ancestors: str | None = None
    """CSP ``frame-ancestors`` of the app's pages (who may show them in a frame). Default: ``'self'`` and the
    origins of `smart_issuers` (the EHR)."""
    smart_session_lifetime_s: float = Field(default=12 * 3600.0, gt=0)
    """How long an app session lasts after launch (the EHR's refresh token may end it sooner)."""
    smart_refresh_margin_s: float = Field(default=120.0, ge=0)
    """Refresh the access token when it expires within this many seconds."""

    @field_validator("authorization_pattern")
    @classmethod
    def _pattern_compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return v

    @field_validator("clinic_tz")
    @classmethod
    def _zone_exists(cls, v: str | None) -> str | None:
        if v:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown IANA time zone {v!r}") from None
        return v

    def issuers(self) -> tuple[str, ...]:
        return tuple(i.strip().rstrip("/") for i in self.smart_issuers.split(",") if i.strip())

    def zone(self) -> tzinfo:
        return ZoneInfo(self.clinic_tz) if self.clinic_tz else server_zone()

    def rems_config(self) -> Config:
        if self.config is None:
            return default_config()
        return load_config(self.config.read_text(encoding="utf-8"))


def get_settings() -> Settings:
    return Settings()
