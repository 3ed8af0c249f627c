"""The service's database: engine, tables, migrations, and the few queries the service runs.

One SQLAlchemy 2 Core schema serves SQLite (the default, one process or a few on one host) and
PostgreSQL via psycopg 3 (several replicas). What lives here:

- ``cds_jti``: JWT ids already accepted, per issuer, until the token expires (the replay cache; see
  `cds_hooks.auth.ReplayCache`). It is in the database, not in memory, because a replayed token may
  reach another replica or a restarted process; the unique key (iss, jti) lets the database, not a
  read-then-write in Python, decide a race between two replicas.
- ``cds_feedback``: CDS Hooks 2.0 feedback (a card accepted or overridden, with the reason), so we can
  report which rules prescribers override.

Decisions:

- The schema is created and changed only by Alembic migrations (``cds_hooks/migrations``), applied at
  service start by `migrate` (``upgrade head``). On PostgreSQL the upgrade runs inside one transaction
  holding ``pg_advisory_xact_lock``, so replicas starting together take turns and the later ones find
  the schema current; on SQLite every transaction is ``BEGIN IMMEDIATE`` (below), which serialises
  them the same way.
- Every datetime is stored in UTC and read back tz-aware (`UtcDateTime`): SQLite has no time zone
  type, and a naive value is refused on the way in rather than guessed.
- SQLite runs in WAL mode with ``synchronous=NORMAL`` (a commit costs no fsync; a power cut may lose
  the last commits but never corrupts the file — acceptable for a replay cache and feedback),
  a 5 s ``busy_timeout`` (writers wait instead of failing), and foreign keys on. The sqlite3 driver's
  own transaction handling is switched off and SQLAlchemy emits ``BEGIN IMMEDIATE`` itself: the
  driver's legacy mode would autocommit DDL (a half-applied migration) and a deferred transaction that
  reads then writes can fail at once with "database is locked" instead of waiting.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Dialect,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import DateTime, TypeDecorator

MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS: Final = 5000
MIGRATION_LOCK_KEY: Final = 0x494D4944_52454D53 & 0x7FFF_FFFF_FFFF_FFFF
"""``pg_advisory_xact_lock`` key taken around ``upgrade head`` ("IMIDREMS" in ASCII, as a bigint)."""

Outcome = Literal["accepted", "overridden"]
OUTCOMES: Final[frozenset[str]] = frozenset({"accepted", "overridden"})


class UtcDateTime(TypeDecorator[datetime]):
    """A tz-aware datetime stored in UTC: ``timestamptz`` on PostgreSQL, UTC text on SQLite.

    Binding a naive datetime raises ``ValueError`` (we would have to guess its zone); every value read
    back is tz-aware in UTC on both databases."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: give it a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)
"""All tables. Constraint names follow the convention so later migrations can refer to them."""

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a bigint identity.
_BigId = BigInteger().with_variant(Integer(), "sqlite")

cds_jti = Table(
    "cds_jti",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("iss", String(255), nullable=False),
    Column("jti", String(255), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    UniqueConstraint("iss", "jti"),
    Index(None, "expires_at"),
)
"""JWT ids accepted per issuer; a row may be purged once ``expires_at`` (token exp + leeway) is past."""

cds_feedback = Table(
    "cds_feedback",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("service_id", String(200), nullable=False),
    Column("card_uuid", String(64), nullable=False),
    Column("rule_code", String(100), nullable=True),
    Column("outcome", String(16), nullable=False),
    Column("override_reason_system", String(500), nullable=True),
    Column("override_reason_code", String(200), nullable=True),
    Column("override_reason_display", Text(), nullable=True),
    Column("user_comment", Text(), nullable=True),
    Column("accepted_suggestions", JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
    Column("outcome_timestamp", UtcDateTime(), nullable=False),
    Column("received_at", UtcDateTime(), nullable=False),
    Column("client_iss", String(255), nullable=True),
    CheckConstraint("outcome IN ('accepted', 'overridden')", name="outcome"),
    Index(None, "rule_code", "outcome"),
    Index(None, "card_uuid"),
)
"""One row per CDS Hooks feedback item (``POST {service}/feedback``)."""


# ---------------------------------------------------------------------------------------------------
# Engine


def normalize_url(url: str | URL) -> URL:
    """``postgresql://`` and ``postgres://`` mean psycopg 3 (``postgresql+psycopg://``); SQLAlchemy would
    otherwise pick psycopg2, which is not installed."""
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """An engine for ``url`` set up as the module docstring says.

    SQLite: ``sqlite:///relative/path.sqlite`` (relative to the working directory),
    ``sqlite:////abs/path.sqlite``, or ``sqlite://`` (in memory, one shared connection: tests only).
    PostgreSQL: ``postgresql+psycopg://user:pw@host/db`` (``postgresql://`` is mapped to psycopg).
    Extra keyword arguments go to `sqlalchemy.create_engine`."""
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if is_memory_sqlite(parsed):
            kwargs.setdefault("poolclass", StaticPool)
            kwargs.setdefault("connect_args", {"check_same_thread": False})
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, **kwargs)
    raise ValueError(f"unsupported database URL scheme {parsed.drivername!r}: use sqlite:/// or postgresql://")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (see _sqlite_on_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        if str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower() not in ("wal", "memory"):
            _switch_to_wal(cursor)
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode = WAL`` (persistent: once per database file). It needs an exclusive lock and
    SQLite answers "database is locked" at once, without the busy handler, while another connection
    (a second replica creating the same new file) holds one, so retry until the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _sqlite_on_begin(connection: Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# ---------------------------------------------------------------------------------------------------
# Migrations


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic configuration built in code (no alembic.ini): the scripts in ``cds_hooks/migrations``,
    run on ``connection`` (env.py refuses to run without one)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (``alembic upgrade head``). Idempotent; safe when
    several replicas start at once (PostgreSQL: advisory lock; SQLite: ``BEGIN IMMEDIATE``), because
    the whole upgrade, including reading ``alembic_version``, is one locked transaction."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        command.upgrade(alembic_config(connection), "head")


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at (None before the first `migrate`)."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


# ---------------------------------------------------------------------------------------------------
# Replay cache primitives (policy lives in cds_hooks.auth.ReplayCache)


def _jti_insert(dialect: Literal["sqlite", "postgresql"]) -> Any:
    """``INSERT .. ON CONFLICT (iss, jti) DO UPDATE SET expires_at = .. WHERE cds_jti.expires_at <= :now
    RETURNING id``: inserts a new id, or takes over a row whose token has expired but was not purged
    yet, and returns no row while the id is live. One statement on a unique key, so when two replicas
    race the database decides: the loser's INSERT waits for the winner's commit, then sees the row.
    (RETURNING rather than rowcount, which psycopg reports as -1 for an INSERT with RETURNING.)"""
    stmt = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(cds_jti)
    return stmt.on_conflict_do_update(
        index_elements=[cds_jti.c.iss, cds_jti.c.jti],
        set_={"expires_at": stmt.excluded.expires_at},
        where=cds_jti.c.expires_at <= bindparam("now", type_=UtcDateTime()),
    ).returning(cds_jti.c.id)


class JtiLedger:
    """The ``cds_jti`` operations of one engine, prepared once.

    `claim` runs on the DBAPI connection with the statement compiled in advance: the replay check is on
    every CDS Hooks call, and SQLAlchemy's per-execute machinery costs several times the statement
    itself (measured on SQLite WAL: ~0.05 ms per claim this way, ~0.2 ms through a `Connection`).
    On SQLite the driver is in autocommit mode (see `make_engine`), so the single INSERT is its own
    atomic transaction; on PostgreSQL it is committed explicitly."""

    def __init__(self, engine: Engine) -> None:
        dialect = engine.dialect
        if dialect.name != "sqlite" and dialect.name != "postgresql":
            raise ValueError(f"unsupported database {dialect.name!r}")
        stmt = _jti_insert("postgresql" if dialect.name == "postgresql" else "sqlite")
        compiled = stmt.compile(dialect=dialect, column_keys=["iss", "jti", "expires_at"])
        self._engine = engine
        self._sql = str(compiled)
        self._positions: Sequence[str] | None = compiled.positiontup
        processor = UtcDateTime().bind_processor(dialect)
        self._to_db: Callable[[Any], Any] = processor if processor is not None else (lambda value: value)

    def claim(self, iss: str, jti: str, expires_at: datetime, now: datetime) -> bool:
        """Record (iss, jti) until ``expires_at`` and commit; False when it is already recorded and
        not expired at ``now``. Naive datetimes raise ``ValueError``."""
        params = {"iss": iss, "jti": jti, "expires_at": self._to_db(expires_at), "now": self._to_db(now)}
        args: Any = tuple(params[name] for name in self._positions) if self._positions else params
        connection = self._engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self._sql, args)
                rows = cursor.fetchall()
            finally:
                cursor.close()
            connection.commit()
        finally:
            connection.close()  # back to the pool (rolled back if anything failed)
        return bool(rows)

    def purge(self, now: datetime) -> int:
        """Delete the ids whose tokens have expired at ``now``; returns how many."""
        with self._engine.begin() as connection:
            return int(connection.execute(delete(cds_jti).where(cds_jti.c.expires_at <= now)).rowcount)


# ---------------------------------------------------------------------------------------------------
# Feedback


@dataclasses.dataclass(frozen=True, slots=True)
class FeedbackItem:
    """One CDS Hooks 2.0 feedback item, as stored.

    ``card_uuid`` is the card's ``uuid``; ``rule_code`` its ``source.topic.code`` when the service
    knows it; ``override_reason_*`` the ``overrideReason.reason`` Coding and ``user_comment`` its
    ``userComment``; ``accepted_suggestions`` the ``acceptedSuggestions[].id`` values;
    ``outcome_timestamp`` when the user acted (tz-aware); ``received_at`` when the service got it
    (default: when `record_feedback` runs); ``client_iss`` the authenticated CDS client (JWT ``iss``)."""

    service_id: str
    card_uuid: str
    outcome: Outcome
    outcome_timestamp: datetime
    rule_code: str | None = None
    override_reason_system: str | None = None
    override_reason_code: str | None = None
    override_reason_display: str | None = None
    user_comment: str | None = None
    accepted_suggestions: tuple[str, ...] = ()
    client_iss: str | None = None
    received_at: datetime | None = None

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be 'accepted' or 'overridden', got {self.outcome!r}")
        for name in ("outcome_timestamp", "received_at"):
            value = getattr(self, name)
            if value is not None and (value.tzinfo is None or value.utcoffset() is None):
                raise ValueError(f"{name} must be tz-aware, got {value.isoformat()}")


def record_feedback(engine: Engine, items: Sequence[FeedbackItem], *, now: datetime | None = None) -> int:
    """Store ``items`` in one transaction (all or none); returns how many rows were written."""
    if not items:
        return 0
    received = now or datetime.now(UTC)
    rows = [
        {
            "service_id": item.service_id,
            "card_uuid": item.card_uuid,
            "rule_code": item.rule_code,
            "outcome": item.outcome,
            "override_reason_system": item.override_reason_system,
            "override_reason_code": item.override_reason_code,
            "override_reason_display": item.override_reason_display,
            "user_comment": item.user_comment,
            "accepted_suggestions": list(item.accepted_suggestions),
            "outcome_timestamp": item.outcome_timestamp,
            "received_at": item.received_at or received,
            "client_iss": item.client_iss,
        }
        for item in items
    ]
    with engine.begin() as connection:
        connection.execute(cds_feedback.insert(), rows)
    return len(rows)


def read_feedback(engine: Engine, *, card_uuid: str | None = None) -> list[FeedbackItem]:
    """Stored feedback (optionally for one card), oldest first."""
    query = select(cds_feedback).order_by(cds_feedback.c.id)
    if card_uuid is not None:
        query = query.where(cds_feedback.c.card_uuid == card_uuid)
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [
        FeedbackItem(
            service_id=row["service_id"],
            card_uuid=row["card_uuid"],
            outcome=row["outcome"],
            outcome_timestamp=row["outcome_timestamp"],
            rule_code=row["rule_code"],
            override_reason_system=row["override_reason_system"],
            override_reason_code=row["override_reason_code"],
            override_reason_display=row["override_reason_display"],
            user_comment=row["user_comment"],
            accepted_suggestions=tuple(row["accepted_suggestions"]),
            client_iss=row["client_iss"],
            received_at=row["received_at"],
        )
        for row in rows
    ]


def override_counts(engine: Engine, *, since: datetime | None = None) -> list[tuple[str | None, str, int]]:
    """(rule_code, outcome, count) over all feedback (or feedback with ``outcome_timestamp >= since``),
    most frequent first, then by rule code (unknown rule last) and outcome: which rules prescribers
    override, and how often compared with accepting them."""
    count = func.count().label("n")
    query = select(cds_feedback.c.rule_code, cds_feedback.c.outcome, count).group_by(
        cds_feedback.c.rule_code, cds_feedback.c.outcome
    )
    if since is not None:
        query = query.where(cds_feedback.c.outcome_timestamp >= since)
    query = query.order_by(count.desc(), cds_feedback.c.rule_code.asc().nulls_last(), cds_feedback.c.outcome)
    with engine.connect() as connection:
        return [(row[0], row[1], int(row[2])) for row in connection.execute(query)]
