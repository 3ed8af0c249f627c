"""The service database on real SQLite and real PostgreSQL: migrations, the JWT replay cache shared by
replicas, and feedback storage.

Every test that takes ``database_url`` runs twice: on a SQLite file and on a fresh PostgreSQL
database (tests/support/postgres.py: skipped when no server is available, unless
IMID_REMS_REQUIRE_POSTGRES=1). "Replicas" are separate engines (separate connection pools) on the
same database, so every race below is decided by the database, as between processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, func, inspect, select, text
from sqlalchemy.exc import IntegrityError

from cds_hooks import db
from cds_hooks import refill_store as _refill_store  # noqa: F401  (its tables are part of db.metadata)
from cds_hooks.auth import ReplayCache
from cds_hooks.db import FeedbackItem
from smart_app import sessions as _sessions  # noqa: F401  (its tables are part of db.metadata)
from tests.support.threads import all_at_once

T = TypeVar("T")
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=ZoneInfo("America/New_York"))
ISS = "https://ehr.example.org/fhir"
HEAD = ScriptDirectory.from_config(db.alembic_config()).get_current_head()


def jti_rows(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(db.cds_jti)).scalar_one())


# --- migrations -------------------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_is_idempotent(engines: Callable[[], Engine]) -> None:
    engine = engines()
    assert db.current_revision(engine) is None
    db.migrate(engine)
    db.migrate(engine)
    assert db.current_revision(engine) == HEAD == "0004_smart_sessions"
    tables = set(inspect(engine).get_table_names())
    assert {"cds_jti", "cds_feedback", "smart_launch", "smart_session", "alembic_version"} <= tables
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


def test_migrated_schema_matches_the_tables_in_db_py(engine: Engine) -> None:
    """The migration and cds_hooks.db describe the same schema (autogenerate finds nothing to do)."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, db.metadata) == []
    unique = inspect(engine).get_unique_constraints("cds_jti")
    assert [(u["name"], u["column_names"]) for u in unique] == [("uq_cds_jti_iss_jti", ["iss", "jti"])]


def test_replicas_starting_together_migrate_once(engines: Callable[[], Engine]) -> None:
    replicas = [engines() for _ in range(4)]
    all_at_once(4, lambda i: db.migrate(replicas[i]))
    assert db.current_revision(replicas[0]) == HEAD
    with replicas[0].connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1


# --- replay cache ----------------------------------------------------------------------------------


def test_second_replica_refuses_a_jti_the_first_accepted(engine: Engine, engines: Callable[[], Engine]) -> None:
    first, second = ReplayCache(engine), ReplayCache(engines())
    until = NOW + timedelta(minutes=5)
    assert first.remember(ISS, "jti-1", until, now=NOW) is True
    assert second.remember(ISS, "jti-1", until, now=NOW) is False
    assert first.remember(ISS, "jti-1", until, now=NOW) is False
    assert second.remember(ISS, "jti-2", until, now=NOW) is True
    assert second.remember("https://other-ehr.example.org", "jti-1", until, now=NOW) is True  # per issuer


def test_a_race_between_replicas_has_exactly_one_winner(engine: Engine, engines: Callable[[], Engine]) -> None:
    n = 8
    caches = [ReplayCache(engines()) for _ in range(n)]
    until = NOW + timedelta(minutes=5)
    for round_ in range(5):
        outcomes = all_at_once(n, lambda i, r=round_: caches[i].remember(ISS, f"race-{r}", until, now=NOW))
        assert outcomes.count(True) == 1, f"round {round_}: {outcomes}"
    assert jti_rows(engine) == 5


def test_an_expired_jti_row_does_not_block_and_is_purged(engine: Engine) -> None:
    cache = ReplayCache(engine)
    assert cache.remember(ISS, "old", NOW + timedelta(seconds=90), now=NOW)
    assert cache.remember(ISS, "new", NOW + timedelta(seconds=300), now=NOW)
    later = NOW + timedelta(seconds=120)  # "old" has expired, "new" has not
    assert cache.remember(ISS, "new", later + timedelta(seconds=90), now=later) is False
    # an unpurged expired row is taken over rather than counted as a replay
    assert cache.remember(ISS, "old", later + timedelta(seconds=90), now=later) is True
    assert cache.remember(ISS, "old", later + timedelta(seconds=90), now=later) is False
    assert jti_rows(engine) == 2
    assert cache.purge(NOW + timedelta(seconds=209)) == 0  # "old" now lives to 210 s, "new" to 300 s
    assert cache.purge(NOW + timedelta(seconds=300)) == 2
    assert jti_rows(engine) == 0


def test_purge_deletes_exactly_the_expired_rows(engine: Engine) -> None:
    cache = ReplayCache(engine)
    for i in range(3):
        assert cache.remember(ISS, f"short-{i}", NOW + timedelta(seconds=60), now=NOW)
    assert cache.remember(ISS, "long", NOW + timedelta(seconds=600), now=NOW)
    assert cache.purge(NOW + timedelta(seconds=59)) == 0
    assert cache.purge(NOW + timedelta(seconds=60)) == 3
    assert jti_rows(engine) == 1
    assert cache.remember(ISS, "long", NOW + timedelta(seconds=600), now=NOW + timedelta(seconds=61)) is False


def test_remember_purges_opportunistically_once_a_minute(engine: Engine) -> None:
    clock = [0.0]
    cache = ReplayCache(engine, purge_every_s=60, clock=lambda: clock[0])
    assert cache.remember(ISS, "a", NOW + timedelta(seconds=30), now=NOW)  # first call purges (nothing yet)
    assert cache.remember(ISS, "b", NOW + timedelta(seconds=30), now=NOW + timedelta(seconds=40))
    assert jti_rows(engine) == 2  # "a" expired at 30 s but no purge is due yet
    clock[0] = 60.0
    assert cache.remember(ISS, "c", NOW + timedelta(seconds=200), now=NOW + timedelta(seconds=100))
    assert jti_rows(engine) == 1  # the due purge removed "a" and "b"


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="naive datetime 2026-11-21T10:05:00 refused"):
        ReplayCache(engine).remember(ISS, "n", datetime(2026, 11, 21, 10, 5), now=NOW)


# --- feedback ---------------------------------------------------------------------------------------


def overridden(card: str, rule: str | None, when: datetime = NOW) -> FeedbackItem:
    return FeedbackItem(
        service_id="imid-rems-order-select",
        card_uuid=card,
        outcome="overridden",
        outcome_timestamp=when,
        rule_code=rule,
        override_reason_system="https://imid-rems.github.io/fhir/CodeSystem/override-reason",
        override_reason_code="patient-aware",
        override_reason_display="Patient is aware; test scheduled",
        user_comment="Test booked for Monday",
        client_iss=ISS,
    )


def accepted(card: str, rule: str | None, suggestions: tuple[str, ...] = ()) -> FeedbackItem:
    return FeedbackItem(
        service_id="imid-rems-order-select",
        card_uuid=card,
        outcome="accepted",
        outcome_timestamp=NOW,
        rule_code=rule,
        accepted_suggestions=suggestions,
    )


def test_feedback_round_trip_keeps_every_field_and_the_instant(engine: Engine) -> None:
    tokyo = datetime(2026, 11, 22, 0, 30, 15, 123456, tzinfo=ZoneInfo("Asia/Tokyo"))
    items = [
        overridden("card-1", "pregnancy-test-stale", when=tokyo),
        accepted("card-2", None, ("sugg-a", "sugg-b")),
    ]
    received = datetime(2026, 11, 21, 15, 1, tzinfo=UTC)
    assert db.record_feedback(engine, items, now=received) == 2
    back = db.read_feedback(engine)
    assert [b.card_uuid for b in back] == ["card-1", "card-2"]
    assert back[0] == dataclasses.replace(items[0], received_at=received)
    assert back[0].outcome_timestamp == tokyo and back[0].outcome_timestamp.utcoffset() == timedelta(0)
    assert back[1].accepted_suggestions == ("sugg-a", "sugg-b") and back[1].rule_code is None
    assert back[1].received_at == received and back[1].received_at.tzinfo is not None


def test_feedback_is_written_all_or_nothing(engine: Engine) -> None:
    broken = accepted("card-x", "cbc-overdue")
    object.__setattr__(broken, "service_id", None)  # NOT NULL: the database refuses this row
    with pytest.raises(IntegrityError):
        db.record_feedback(engine, [accepted("card-ok", "cbc-overdue"), broken])
    assert db.read_feedback(engine) == []


def test_feedback_refuses_bad_values_before_the_database() -> None:
    with pytest.raises(ValueError, match="outcome must be 'accepted' or 'overridden'"):
        FeedbackItem("s", "c", "ignored", NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outcome_timestamp must be tz-aware"):
        FeedbackItem("s", "c", "accepted", datetime(2026, 11, 21, 10, 0))


def test_override_counts_reports_per_rule_and_outcome(engine: Engine) -> None:
    db.record_feedback(
        engine,
        [
            overridden("c1", "pregnancy-test-stale"),
            overridden("c2", "pregnancy-test-stale"),
            overridden("c3", "pregnancy-test-stale"),
            accepted("c4", "pregnancy-test-stale"),
            overridden("c5", "cbc-overdue"),
            overridden("c6", None),
            accepted("c7", "cbc-overdue"),
        ],
    )
    assert db.override_counts(engine) == [
        ("pregnancy-test-stale", "overridden", 3),
        ("cbc-overdue", "accepted", 1),
        ("cbc-overdue", "overridden", 1),
        ("pregnancy-test-stale", "accepted", 1),
        (None, "overridden", 1),
    ]
    assert db.override_counts(engine, since=NOW + timedelta(seconds=1)) == []


def test_datetimes_come_back_in_utc_whatever_the_session_zone(database_url: str) -> None:
    """PostgreSQL returns timestamptz in the session's TimeZone; we hand back UTC either way."""
    kwargs = {"connect_args": {"options": "-c timezone=America/New_York"}} if "postgresql" in database_url else {}
    engine = db.make_engine(database_url, **kwargs)
    try:
        db.migrate(engine)
        db.record_feedback(engine, [accepted("c", "r")], now=NOW)
        (item,) = db.read_feedback(engine)
        assert item.received_at == NOW and item.received_at.tzinfo is UTC
        assert item.outcome_timestamp.tzinfo is UTC
    finally:
        engine.dispose()


# --- engine -----------------------------------------------------------------------------------------


def test_sqlite_engine_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = db.make_engine("sqlite:///relative.sqlite")
    try:
        db.migrate(engine)
        with engine.connect() as connection:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar_one()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
            }
        assert pragmas == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 5000, "foreign_keys": 1}
        assert (tmp_path / "relative.sqlite").exists()
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("postgresql://u:p@db.example.org/rems", "postgresql+psycopg"),
        ("postgres://u:p@db.example.org/rems", "postgresql+psycopg"),
        ("postgresql+psycopg://u:p@db.example.org/rems", "postgresql+psycopg"),
        ("sqlite:///imid-rems.sqlite", "sqlite"),
    ],
)
def test_database_urls_map_to_the_installed_drivers(url: str, driver: str) -> None:
    assert db.normalize_url(url).drivername == driver


def test_unsupported_database_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported database URL scheme 'mysql'"):
        db.make_engine("mysql://u@h/db")
