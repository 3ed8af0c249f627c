"""The SMART app's server-side state, in the service's database (so any replica can answer any request).

- ``smart_launch``: one row per authorization request in flight, keyed by the SHA-256 of its ``state``: the
  PKCE ``code_verifier``, the ``iss`` it was sent to, and the hash of the browser cookie it was started from.
  `take_launch` deletes the row as it reads it (single use) and only for the same browser.
- ``smart_session``: one row per authorized launch: the access and refresh tokens, their expiry, the launch
  context (patient, encounter, ``fhirUser``, ``need_patient_banner``, the EHR's sanitized style,
  ``appContext``), the CSRF token of its forms and a ``version`` that every token refresh bumps.

**Browser binding.** The browser holds one random cookie (``imid_rems_browser``, HttpOnly); the database holds
only its hash. A session is addressed by its id in the URL (``/smart/s/{id}/...``) *and* that cookie: the id
alone (from a log or a shared link) opens nothing in another browser, and one browser may hold several
launches at once (two EHR tabs on two patients each keep their own session, instead of the newer launch
silently replacing the patient of the older tab).

**Refresh across replicas.** `claim_refresh` is a compare-and-set lease on the row (``refreshing_until``): of
replicas that find the token about to expire at the same moment exactly one calls the token endpoint (a
refresh token is single use at most EHRs: two concurrent refreshes would revoke each other); the others
keep using the still-valid token or wait for the new one.

Tokens are stored as the EHR issued them: whoever can read this database can act with them until they
expire. Protect the database like the EHR's own credentials (encryption at rest, network isolation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Engine,
    Index,
    Integer,
    String,
    Table,
    Text,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql

from cds_hooks.db import UtcDateTime, metadata

LAUNCH_LIFETIME_S: Final = 600
"""How long a user may take between the launch and the callback (the EHR's login page included)."""

smart_launch = Table(
    "smart_launch",
    metadata,
    Column("state_hash", String(64), primary_key=True),
    Column("browser_hash", String(64), nullable=False),
    Column("iss", String(500), nullable=False),
    Column("launch", Text(), nullable=True),
    Column("code_verifier", String(128), nullable=False),
    Column("nonce", String(64), nullable=False),
    Column("token_endpoint", String(500), nullable=False),
    Column("scope", Text(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Index(None, "expires_at"),
)

smart_session = Table(
    "smart_session",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("browser_hash", String(64), nullable=False),
    Column("iss", String(500), nullable=False),
    Column("token_endpoint", String(500), nullable=False),
    Column("access_token", Text(), nullable=False),
    Column("refresh_token", Text(), nullable=True),
    Column("access_expires_at", UtcDateTime(), nullable=False),
    Column("scope", Text(), nullable=False),
    Column("patient", String(255), nullable=True),
    Column("encounter", String(255), nullable=True),
    Column("fhir_user", String(300), nullable=True),
    Column("need_patient_banner", Boolean(), nullable=False),
    Column("style", JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True),
    Column("app_context", Text(), nullable=True),
    Column("csrf", String(64), nullable=False),
    Column("version", Integer(), nullable=False),
    Column("refreshing_until", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("ended_at", UtcDateTime(), nullable=True),
    Column("end_reason", Text(), nullable=True),
    Index(None, "expires_at"),
)


def digest(secret: str) -> str:
    """SHA-256 hex of a secret (state, browser cookie): what the database keeps instead of the secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


class SessionError(Exception):
    """The session cannot be used; ``str()`` says why in words a user can act on (never a token)."""


@dataclasses.dataclass(frozen=True, slots=True)
class PendingLaunch:
    iss: str
    launch: str | None
    code_verifier: str
    nonce: str
    token_endpoint: str
    scope: str


@dataclasses.dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str | None
    access_expires_at: datetime
    scope: str


@dataclasses.dataclass(frozen=True, slots=True)
class AppSession:
    id: str
    iss: str
    token_endpoint: str
    tokens: Tokens
    patient: str | None
    encounter: str | None
    fhir_user: str | None
    need_patient_banner: bool
    style: dict[str, Any] | None
    app_context: str | None
    csrf: str
    version: int
    expires_at: datetime

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


def save_launch(engine: Engine, state: str, browser: str, launch: PendingLaunch, now: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(delete(smart_launch).where(smart_launch.c.expires_at < now))
        conn.execute(
            insert(smart_launch).values(
                state_hash=digest(state),
                browser_hash=digest(browser),
                created_at=now,
                expires_at=now + timedelta(seconds=LAUNCH_LIFETIME_S),
                **dataclasses.asdict(launch),
            )
        )


def take_launch(engine: Engine, state: str, browser: str | None, now: datetime) -> PendingLaunch:
    """The launch `state` was issued for, removed (single use). Raises `SessionError` when the state is unknown,
    used already, expired, or was issued to another browser (the cookie does not match)."""
    if not browser:
        raise SessionError(
            "this browser did not start the launch (its imid-rems cookie is missing): cookies may be blocked "
            "in the EHR's frame, or the sign-in link was opened elsewhere"
        )
    with engine.begin() as conn:
        row = (
            conn.execute(
                delete(smart_launch)
                .where(smart_launch.c.state_hash == digest(state), smart_launch.c.browser_hash == digest(browser))
                .returning(*[c for c in smart_launch.c if c.name not in ("state_hash", "browser_hash")])
            )
            .mappings()
            .first()
        )
    if row is None:
        raise SessionError(
            "the sign-in answer does not match a launch started in this browser (unknown, altered or already "
            "used state)"
        )
    if row["expires_at"] <= now:
        raise SessionError(f"the sign-in took longer than {LAUNCH_LIFETIME_S // 60} minutes")
    return PendingLaunch(**{f.name: row[f.name] for f in dataclasses.fields(PendingLaunch)})


def create_session(
    engine: Engine,
    *,
    browser: str,
    launch: PendingLaunch,
    tokens: Tokens,
    context: dict[str, Any],
    now: datetime,
    lifetime_s: float,
) -> str:
    """Store an authorized session; returns its id (for the URL). `context`: patient, encounter, fhir_user,
    need_patient_banner, style, app_context."""
    sid = secrets.token_urlsafe(18)
    with engine.begin() as conn:
        conn.execute(delete(smart_session).where(smart_session.c.expires_at < now))
        conn.execute(
            insert(smart_session).values(
                id=sid,
                browser_hash=digest(browser),
                iss=launch.iss,
                token_endpoint=launch.token_endpoint,
                access_token=tokens.access_token,
                refresh_token=tokens.refresh_token,
                access_expires_at=tokens.access_expires_at,
                scope=tokens.scope,
                patient=context.get("patient"),
                encounter=context.get("encounter"),
                fhir_user=context.get("fhir_user"),
                need_patient_banner=bool(context.get("need_patient_banner", True)),
                style=context.get("style"),
                app_context=context.get("app_context"),
                csrf=new_secret(),
                version=1,
                created_at=now,
                expires_at=now + timedelta(seconds=lifetime_s),
            )
        )
    return sid


def load_session(engine: Engine, sid: str, browser: str | None, now: datetime) -> AppSession:
    """The session `sid` for this browser. Raises `SessionError` (unknown, another browser's, ended, expired)."""
    with engine.connect() as conn:
        row = conn.execute(select(smart_session).where(smart_session.c.id == sid)).mappings().first()
    if row is None or not browser or not hmac.compare_digest(row["browser_hash"], digest(browser)):
        raise SessionError("no imid-rems session here for this browser: launch the app again from the EHR")
    if row["ended_at"] is not None:
        raise SessionError(f"this session has ended ({row['end_reason'] or 'signed out'}): launch the app again")
    if row["expires_at"] <= now:
        raise SessionError("this session has expired: launch the app again from the EHR")
    return _session(row)


def _session(row: Any) -> AppSession:
    return AppSession(
        id=row["id"],
        iss=row["iss"],
        token_endpoint=row["token_endpoint"],
        tokens=Tokens(row["access_token"], row["refresh_token"], row["access_expires_at"], row["scope"]),
        patient=row["patient"],
        encounter=row["encounter"],
        fhir_user=row["fhir_user"],
        need_patient_banner=row["need_patient_banner"],
        style=row["style"],
        app_context=row["app_context"],
        csrf=row["csrf"],
        version=row["version"],
        expires_at=row["expires_at"],
    )


def claim_refresh(engine: Engine, session: AppSession, now: datetime, lease_s: float) -> bool:
    """Take the right to refresh `session`'s token (True) unless another replica holds it or already refreshed."""
    with engine.begin() as conn:
        result = conn.execute(
            update(smart_session)
            .where(
                smart_session.c.id == session.id,
                smart_session.c.version == session.version,
                smart_session.c.ended_at.is_(None),
                or_(smart_session.c.refreshing_until.is_(None), smart_session.c.refreshing_until < now),
            )
            .values(refreshing_until=now + timedelta(seconds=lease_s))
        )
    return result.rowcount == 1


def store_tokens(engine: Engine, session: AppSession, tokens: Tokens) -> None:
    """Record a refreshed token (the caller holds the refresh lease) and release the lease."""
    with engine.begin() as conn:
        conn.execute(
            update(smart_session)
            .where(smart_session.c.id == session.id)
            .values(
                access_token=tokens.access_token,
                refresh_token=tokens.refresh_token,
                access_expires_at=tokens.access_expires_at,
                scope=tokens.scope,
                version=smart_session.c.version + 1,
                refreshing_until=None,
            )
        )


def release_refresh(engine: Engine, session: AppSession) -> None:
    with engine.begin() as conn:
        conn.execute(update(smart_session).where(smart_session.c.id == session.id).values(refreshing_until=None))


def end_session(engine: Engine, sid: str, reason: str, now: datetime) -> None:
    """End a session for good (its tokens are dropped): sign-out, or a refresh the EHR refused."""
    with engine.begin() as conn:
        conn.execute(
            update(smart_session)
            .where(smart_session.c.id == sid)
            .values(ended_at=now, end_reason=reason[:500], access_token="", refresh_token=None)
        )


def reload(engine: Engine, sid: str) -> AppSession | None:
    with engine.connect() as conn:
        row = conn.execute(select(smart_session).where(smart_session.c.id == sid)).mappings().first()
    return None if row is None or row["ended_at"] is not None else _session(row)
