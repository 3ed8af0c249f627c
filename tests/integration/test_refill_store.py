"""The refill drafts' store (cds_hooks.refill_store) on real SQLite and real PostgreSQL: its migration,
re-scans and concurrent scans that never duplicate a draft, optimistic concurrency for edits and
decisions, row claims for re-checking, the write outcome, and the append-only audit trail.

Every test that takes ``database_url`` runs twice: on a SQLite file and on a fresh PostgreSQL database
(tests/support/postgres.py: skipped when no server is available, unless IMID_REMS_REQUIRE_POSTGRES=1).
"Replicas" are separate engines (separate connection pools), so every race is decided by the database.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, func, insert, inspect, select, text
from sqlalchemy.exc import DBAPIError

from cds_hooks import db
from cds_hooks import refill_store as store
from cds_hooks.refill_store import Blocked, Check, Conflict, Draft, NewDraft
from smart_app import sessions as _sessions  # noqa: F401  (its tables are part of db.metadata)
from tests.support.threads import all_at_once

T = TypeVar("T")
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=ZoneInfo("America/New_York"))
PHARMACIST_A = "PractitionerRole/pharm-a"
PHARMACIST_B = "PractitionerRole/pharm-b"


def outcome(call: Callable[[], Draft]) -> Draft | Conflict:
    try:
        return call()
    except Conflict as exc:
        return exc


def medication_request(patient: str, days: int = 28, text: str = "lenalidomide 10 mg daily") -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest",
        "status": "draft",
        "intent": "order",
        "subject": {"reference": f"Patient/{patient}"},
        "dosageInstruction": [{"text": text}],
        "dispenseRequest": {"numberOfRepeatsAllowed": 0, "expectedSupplyDuration": {"value": days, "unit": "d"}},
    }


def new_draft(patient: str = "p1", prior: str = "MedicationRequest/100", days_left: int = 6, **kw: Any) -> NewDraft:
    values: dict[str, Any] = {
        "patient_id": patient,
        "prior_order": prior,
        "drug": "lenalidomide",
        "medication_request": medication_request(patient),
        "days_left": days_left,
        "runs_out": date(2026, 11, 21) + timedelta(days=days_left),
        "earliest_dispense": date(2026, 11, 21) + timedelta(days=max(days_left - 7, 0)),
        "next_test_due": date(2026, 11, 24),
    }
    return NewDraft(**(values | kw))


AUTH_MISSING = Check("authorization-missing", "critical", True, "No REMS authorization number", "Enter it.")
CBC = Check("cbc-overdue", "info", False, "No CBC in 28 days")
STALE = Check("pregnancy-test-stale", "critical", True, "Pregnancy test will be 9 days old")


def approvable(engine: Engine, patient: str = "p1") -> Draft:
    draft, _ = store.upsert_draft(engine, new_draft(patient), [CBC], now=NOW)
    return draft


def drafts_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(store.refill_draft)).scalar_one())


# --- migration --------------------------------------------------------------------------------------


def test_migration_applies_from_empty_and_matches_the_tables(engines: Callable[[], Engine]) -> None:
    engine = engines()
    db.migrate(engine)
    assert db.current_revision(engine) == "0004_smart_sessions"
    assert {"refill_draft", "refill_check", "refill_audit"} <= set(inspect(engine).get_table_names())
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, db.metadata) == []
    unique = {u["name"]: u["column_names"] for u in inspect(engine).get_unique_constraints("refill_draft")}
    assert unique == {
        "uq_refill_draft_patient_id_prior_order": ["patient_id", "prior_order"],
        "uq_refill_draft_request_key": ["request_key"],
    }
    indexes = {i["name"]: i["column_names"] for i in inspect(engine).get_indexes("refill_draft")}
    assert indexes["ix_refill_draft_patient_id_status"] == ["patient_id", "status"]  # the scan's per-patient lookups


def test_migration_applies_from_r0001_keeping_data_and_downgrades(engines: Callable[[], Engine]) -> None:
    engine = engines()
    with engine.begin() as connection:
        command.upgrade(db.alembic_config(connection), "0001_jti_and_feedback")
        connection.execute(insert(db.cds_jti).values(iss="i", jti="j", expires_at=NOW))
    assert db.current_revision(engine) == "0001_jti_and_feedback"
    assert "refill_draft" not in inspect(engine).get_table_names()
    db.migrate(engine)
    assert db.current_revision(engine) == "0004_smart_sessions"
    approvable(engine)
    with engine.connect() as connection:
        assert connection.execute(select(db.cds_jti.c.jti)).scalars().all() == ["j"]
    with engine.begin() as connection:
        command.downgrade(db.alembic_config(connection), "0001_jti_and_feedback")
    tables = set(inspect(engine).get_table_names())
    assert not tables & {"refill_draft", "refill_check", "refill_audit", "smart_launch", "smart_session"}
    assert "cds_jti" in tables
    db.migrate(engine)  # and up again: the triggers and function were dropped with the tables
    assert db.current_revision(engine) == "0004_smart_sessions"


# --- upsert: scans ----------------------------------------------------------------------------------


def test_upsert_twice_gives_one_draft_and_a_created_then_rechecked_audit(engine: Engine) -> None:
    first, created = store.upsert_draft(engine, new_draft(days_left=8), [AUTH_MISSING, CBC], now=NOW)
    assert created is True
    assert (first.status, first.version, first.blocking, first.days_left) == ("pending", 1, 1, 8)
    assert first.checks == (AUTH_MISSING, CBC)
    assert first.medication_request == medication_request("p1")
    assert first.authorization_number is None and first.request_key

    later = NOW + timedelta(days=1)
    second, created = store.upsert_draft(engine, new_draft(days_left=7), [AUTH_MISSING], now=later)
    assert created is False
    assert second.id == first.id and second.request_key == first.request_key
    assert (second.version, second.days_left, second.blocking, second.checks) == (2, 7, 1, (AUTH_MISSING,))
    assert second.updated_at == later and second.created_at == NOW
    assert drafts_count(engine) == 1

    trail = store.audit_trail(engine, first.id)
    assert [(a.action, a.actor) for a in trail] == [("created", "system:scan"), ("rechecked", "system:scan")]
    assert trail[0].before is None and trail[0].after is not None
    assert trail[0].after["days_left"] == 8 and trail[0].after["runs_out"] == "2026-11-29"
    assert trail[1].before == {
        "days_left": 8,
        "runs_out": "2026-11-29",
        "earliest_dispense": "2026-11-22",
        "checks": [AUTH_MISSING.as_json(), CBC.as_json()],
    }
    assert trail[1].after == {
        "days_left": 7,
        "runs_out": "2026-11-28",
        "earliest_dispense": "2026-11-21",
        "checks": [AUTH_MISSING.as_json()],
    }


def test_an_unchanged_recheck_bumps_no_version_and_writes_no_audit(engine: Engine) -> None:
    first, _ = store.upsert_draft(engine, new_draft(), [CBC], now=NOW)
    again, created = store.upsert_draft(engine, new_draft(), [CBC], now=NOW + timedelta(hours=1))
    assert created is False and again.version == first.version == 1
    assert again.checked_at == NOW + timedelta(hours=1) and again.updated_at == NOW
    assert [a.action for a in store.audit_trail(engine, first.id)] == ["created"]


def test_a_rescan_keeps_the_pharmacists_edit_and_never_touches_a_decided_draft(engine: Engine) -> None:
    draft = approvable(engine)
    edited_mr = medication_request("p1", days=21, text="lenalidomide 5 mg days 1-21")
    draft = store.edit_draft(
        engine, draft.id, expected_version=1, changes={"medication_request": edited_mr}, actor=PHARMACIST_A, now=NOW
    )
    rescanned, _ = store.upsert_draft(engine, new_draft(days_left=5), [CBC], now=NOW + timedelta(hours=1))
    assert rescanned.medication_request == edited_mr and rescanned.days_left == 5 and rescanned.version == 3

    store.decide(
        engine, draft.id, expected_version=3, decision="rejected", actor=PHARMACIST_A, reason="stopped", now=NOW
    )
    after, created = store.upsert_draft(engine, new_draft(days_left=2), [STALE], now=NOW + timedelta(hours=2))
    assert created is False
    assert (after.status, after.days_left, after.checks, after.version) == ("rejected", 5, (CBC,), 4)
    # a different order for the same patient is a different draft
    other, created = store.upsert_draft(engine, new_draft(prior="MedicationRequest/200"), [CBC], now=NOW)
    assert created is True and other.id != draft.id


def test_replicas_scanning_at_once_make_one_draft(engines: Callable[[], Engine], engine: Engine) -> None:
    n = 6
    replicas = [engines() for _ in range(n)]
    for round_ in range(3):
        prior = f"MedicationRequest/race-{round_}"
        results = all_at_once(
            n, lambda i, p=prior: store.upsert_draft(replicas[i], new_draft(prior=p), [AUTH_MISSING], now=NOW)
        )
        assert sorted(created for _, created in results) == [False] * (n - 1) + [True], f"round {round_}"
        assert len({d.id for d, _ in results}) == 1
        assert [a.action for a in store.audit_trail(engine, results[0][0].id)] == ["created"]
    assert drafts_count(engine) == 3


# --- edits and decisions ----------------------------------------------------------------------------


def test_an_edit_at_a_stale_version_is_a_conflict_naming_who_changed_it(engine: Engine) -> None:
    draft = approvable(engine)
    at = NOW + timedelta(minutes=3)
    store.edit_draft(
        engine, draft.id, expected_version=1, changes={"authorization_number": "12345678"}, actor=PHARMACIST_A, now=at
    )
    with pytest.raises(Conflict) as caught:
        store.edit_draft(engine, draft.id, expected_version=1, changes={"days_left": 3}, actor=PHARMACIST_B, now=at)
    conflict = caught.value
    assert (conflict.changed_by, conflict.changed_at, conflict.change) == (PHARMACIST_A, at, "authorization-entered")
    assert (conflict.expected_version, conflict.version, conflict.status) == (1, 2, "pending")
    assert "authorization-entered by PractitionerRole/pharm-a at 2026-11-21T15:03:00+00:00" in str(conflict)
    assert store.get_draft(engine, draft.id) == dataclasses.replace(
        draft, authorization_number="12345678", version=2, updated_at=at, updated_by=PHARMACIST_A
    )

    store.upsert_draft(engine, new_draft(days_left=4), [CBC], now=at)  # the scan re-checks it: version 3
    with pytest.raises(Conflict, match="rechecked by system:scan"):
        store.edit_draft(engine, draft.id, expected_version=2, changes={"days_left": 3}, actor=PHARMACIST_B, now=at)


def test_edits_are_audited_with_before_and_after_and_refuse_unknown_fields(engine: Engine) -> None:
    draft = approvable(engine)
    new_mr = medication_request("p1", days=21)
    edited = store.edit_draft(
        engine,
        draft.id,
        expected_version=1,
        changes={"medication_request": new_mr, "authorization_number": "A1"},
        checks=[CBC, STALE],
        actor=PHARMACIST_A,
        now=NOW,
        note="dose per cycle",
    )
    assert (edited.version, edited.blocking, edited.checks, edited.edited_at) == (2, 1, (CBC, STALE), NOW)
    last = store.audit_trail(engine, draft.id)[-1]
    assert (last.action, last.actor, last.note) == ("edited", PHARMACIST_A, "dose per cycle")
    assert last.before == {
        "medication_request": medication_request("p1"),
        "authorization_number": None,
        "blocking": 0,
        "checks": [CBC.as_json()],
    }
    assert last.after == {
        "medication_request": new_mr,
        "authorization_number": "A1",
        "blocking": 1,
        "checks": [CBC.as_json(), STALE.as_json()],
    }
    same = store.edit_draft(
        engine, draft.id, expected_version=2, changes={"authorization_number": "A1"}, actor=PHARMACIST_A, now=NOW
    )
    assert same.version == 2 and len(store.audit_trail(engine, draft.id)) == 2
    with pytest.raises(ValueError, match="not editable: status"):
        store.edit_draft(engine, draft.id, expected_version=2, changes={"status": "approved"}, actor="x", now=NOW)
    with pytest.raises(store.NotFound):
        store.edit_draft(engine, "nope", expected_version=1, changes={}, actor="x", now=NOW)


def test_two_pharmacists_approving_at_once_exactly_one_wins(engines: Callable[[], Engine], engine: Engine) -> None:
    replicas = [engines(), engines()]
    actors = [PHARMACIST_A, PHARMACIST_B]
    for round_ in range(4):
        draft = approvable(engine, patient=f"race-{round_}")
        results = all_at_once(
            2,
            lambda i, d=draft: outcome(
                lambda: store.decide(
                    replicas[i], d.id, expected_version=1, decision="approved", actor=actors[i], now=NOW
                )
            ),
        )
        winners = [r for r in results if isinstance(r, Draft)]
        losers = [r for r in results if isinstance(r, Conflict)]
        assert len(winners) == 1 and len(losers) == 1, f"round {round_}: {results}"
        winner = winners[0]
        assert (winner.status, winner.version, winner.decided_at) == ("approved", 2, NOW)
        assert losers[0].changed_by == winner.decided_by and losers[0].change == "approved"
        assert losers[0].status == "approved"
        assert [a.action for a in store.audit_trail(engine, draft.id)] == ["created", "approved"]


def test_approval_is_refused_while_a_blocking_check_remains_and_rejection_needs_a_reason(engine: Engine) -> None:
    draft, _ = store.upsert_draft(engine, new_draft(), [STALE, CBC, AUTH_MISSING], now=NOW)
    with pytest.raises(Blocked, match="pregnancy-test-stale, authorization-missing") as caught:
        store.decide(engine, draft.id, expected_version=1, decision="approved", actor=PHARMACIST_A, now=NOW)
    assert caught.value.codes == ("pregnancy-test-stale", "authorization-missing")
    with pytest.raises(ValueError, match="needs a reason"):
        store.decide(engine, draft.id, expected_version=1, decision="rejected", actor=PHARMACIST_A, reason=" ", now=NOW)
    current = store.get_draft(engine, draft.id)
    assert current is not None and (current.status, current.version) == ("pending", 1)
    rejected = store.decide(
        engine, draft.id, expected_version=1, decision="rejected", actor=PHARMACIST_A, reason="on hold", now=NOW
    )
    assert (rejected.status, rejected.decision_reason, rejected.decided_by) == ("rejected", "on hold", PHARMACIST_A)
    with pytest.raises(Conflict, match="could not be approved: rejected by PractitionerRole/pharm-a"):
        store.decide(engine, draft.id, expected_version=2, decision="approved", actor=PHARMACIST_B, now=NOW)


def test_write_outcomes_failed_then_written_once(engine: Engine) -> None:
    draft = approvable(engine)
    with pytest.raises(Conflict, match="is pending, not awaiting its write"):
        store.record_write(engine, draft.id, written_reference="MedicationRequest/x", actor="system:writer", now=NOW)
    store.decide(engine, draft.id, expected_version=1, decision="approved", actor=PHARMACIST_A, now=NOW)
    failed = store.record_write(engine, draft.id, error="FHIR server: 503", actor=PHARMACIST_A, now=NOW)
    assert (failed.status, failed.last_error, failed.version) == ("write-failed", "FHIR server: 503", 2)
    written = store.record_write(engine, draft.id, written_reference="MedicationRequest/new-1", actor="a", now=NOW)
    assert (written.status, written.written_reference, written.last_error) == (
        "written",
        "MedicationRequest/new-1",
        None,
    )
    again = store.record_write(engine, draft.id, written_reference="MedicationRequest/new-1", actor="a", now=NOW)
    assert again == written
    with pytest.raises(Conflict, match="is written"):
        store.record_write(engine, draft.id, written_reference="MedicationRequest/new-2", actor="a", now=NOW)
    with pytest.raises(Conflict, match="is written"):
        store.record_write(engine, draft.id, error="late timeout", actor="a", now=NOW)
    with pytest.raises(ValueError, match="exactly one"):
        store.record_write(engine, draft.id, actor="a", now=NOW)
    trail = store.audit_trail(engine, draft.id)
    assert [a.action for a in trail] == ["created", "approved", "write-failed", "written"]
    assert trail[2].before == {"status": "approved", "last_error": None}
    assert trail[2].after == {"status": "write-failed", "last_error": "FHIR server: 503"}
    assert trail[3].before == {"status": "write-failed", "written_reference": None, "last_error": "FHIR server: 503"}
    assert trail[3].after == {"status": "written", "written_reference": "MedicationRequest/new-1", "last_error": None}


def test_one_write_at_a_time_until_its_outcome_is_recorded_or_its_lease_runs_out(engine: Engine) -> None:
    draft = approvable(engine)
    assert not store.claim_write(engine, draft.id, worker="w1", now=NOW, lease_s=60)  # pending: nothing to write
    store.decide(engine, draft.id, expected_version=1, decision="approved", actor=PHARMACIST_A, now=NOW)
    assert store.claim_write(engine, draft.id, worker="w1", now=NOW, lease_s=60)
    assert not store.claim_write(engine, draft.id, worker="w2", now=NOW + timedelta(seconds=59), lease_s=60)
    assert store.claim_write(engine, draft.id, worker="w2", now=NOW + timedelta(seconds=60), lease_s=60)  # expired
    store.record_write(engine, draft.id, error="timed out", actor=PHARMACIST_A, now=NOW + timedelta(seconds=61))
    assert store.claim_write(engine, draft.id, worker="w3", now=NOW + timedelta(seconds=62), lease_s=60)  # released
    store.record_write(engine, draft.id, written_reference="MedicationRequest/w", actor="a", now=NOW)
    assert not store.claim_write(engine, draft.id, worker="w4", now=NOW + timedelta(hours=1), lease_s=60)  # written


def test_two_writers_recording_the_same_result_at_once_write_it_once(
    engines: Callable[[], Engine], engine: Engine
) -> None:
    """The original write and its retry both end in the conditional create's one MedicationRequest."""
    draft = approvable(engine)
    store.decide(engine, draft.id, expected_version=1, decision="approved", actor=PHARMACIST_A, now=NOW)
    writers = [engines() for _ in range(3)]
    results = all_at_once(
        3,
        lambda i: store.record_write(
            writers[i], draft.id, written_reference="MedicationRequest/once", actor=f"writer-{i}", now=NOW
        ),
    )
    assert {(r.status, r.written_reference) for r in results} == {("written", "MedicationRequest/once")}
    assert [a.action for a in store.audit_trail(engine, draft.id)] == ["created", "approved", "written"]


def test_unknown_drafts(engine: Engine) -> None:
    assert store.get_draft(engine, "no-such-draft") is None
    with pytest.raises(store.NotFound, match="no refill draft 'no-such-draft'"):
        store.decide(engine, "no-such-draft", expected_version=1, decision="approved", actor="a", now=NOW)
    with pytest.raises(store.NotFound):
        store.record_write(engine, "no-such-draft", error="e", actor="a", now=NOW)
    assert store.audit_trail(engine, "no-such-draft") == []


# --- worklist and claims ----------------------------------------------------------------------------


def test_worklist_is_sorted_by_days_left_then_blocking_then_run_out(engine: Engine) -> None:
    def put(patient: str, days_left: int, checks: list[Check], runs_out: date) -> None:
        store.upsert_draft(engine, new_draft(patient, days_left=days_left, runs_out=runs_out), checks, now=NOW)

    put("d5-clean", 5, [CBC], date(2026, 11, 26))
    put("d2-clean", 2, [], date(2026, 11, 23))
    put("d5-two-blocking", 5, [STALE, AUTH_MISSING], date(2026, 11, 26))
    put("d5-one-blocking-late", 5, [STALE], date(2026, 11, 27))
    put("d5-one-blocking-early", 5, [AUTH_MISSING], date(2026, 11, 25))
    put("d9", 9, [STALE, AUTH_MISSING], date(2026, 11, 30))
    done = store.upsert_draft(engine, new_draft("d0-rejected", days_left=0), [], now=NOW)[0]
    store.decide(engine, done.id, expected_version=1, decision="rejected", actor=PHARMACIST_A, reason="r", now=NOW)

    order = [d.patient_id for d in store.worklist(engine)]
    assert order == ["d2-clean", "d5-two-blocking", "d5-one-blocking-early", "d5-one-blocking-late", "d5-clean", "d9"]
    assert [d.patient_id for d in store.worklist(engine, limit=2, offset=2)] == order[2:4]
    assert [d.patient_id for d in store.worklist(engine, status="rejected")] == ["d0-rejected"]
    assert len(store.worklist(engine, status=None)) == 7
    assert store.worklist(engine)[1].checks == (STALE, AUTH_MISSING)


def test_workers_claiming_at_once_never_share_a_draft(engines: Callable[[], Engine], engine: Engine) -> None:
    for i in range(40):
        store.upsert_draft(engine, new_draft(f"p{i:02}"), [CBC], now=NOW - timedelta(minutes=40 - i))
    workers = [engines() for _ in range(4)]
    batches = all_at_once(4, lambda i: store.claim_batch(workers[i], worker=f"w{i}", limit=8, now=NOW, lease_s=300))
    ids = [d.id for batch in batches for d in batch]
    assert len(ids) == len(set(ids)) == 32, [len(b) for b in batches]
    for i, batch in enumerate(batches):
        assert all(d.claimed_by == f"w{i}" and d.claimed_until == NOW + timedelta(seconds=300) for d in batch)
    rest = store.claim_batch(engine, worker="w9", limit=100, now=NOW, lease_s=300)
    assert len(rest) == 8 and not set(ids) & {d.id for d in rest}
    assert store.claim_batch(engine, worker="w9", limit=100, now=NOW, lease_s=300) == []
    # the least recently checked come first; an expired lease is free again
    assert [
        d.patient_id
        for d in store.claim_batch(engine, worker="w8", limit=2, now=NOW + timedelta(seconds=300), lease_s=60)
    ] == ["p00", "p01"]


def test_a_claim_does_not_wait_for_drafts_another_transaction_holds(database_url: str, engine: Engine) -> None:
    """PostgreSQL: rows locked by another worker's open transaction are skipped (SKIP LOCKED), not waited
    for (lock_timeout turns a wait into an error here). SQLite has one writer at a time: the claim waits
    for the other transaction (busy_timeout) and then succeeds."""
    for i in range(16):
        store.upsert_draft(engine, new_draft(f"p{i:02}"), [CBC], now=NOW - timedelta(minutes=16 - i))
    postgresql = database_url.startswith("postgresql")
    kwargs = {"connect_args": {"options": "-c lock_timeout=3000"}} if postgresql else {}
    other = db.make_engine(database_url, **kwargs)
    held = [f"p{i:02}" for i in range(8)]
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        with engine.begin() as holding:
            holding.execute(
                select(store.refill_draft.c.id).where(store.refill_draft.c.patient_id.in_(held)).with_for_update()
            ).all()
            if postgresql:
                batch = store.claim_batch(other, worker="w2", limit=8, now=NOW, lease_s=60)
                assert sorted(d.patient_id for d in batch) == [f"p{i:02}" for i in range(8, 16)]
            else:
                waiting = pool.submit(store.claim_batch, other, worker="w2", limit=8, now=NOW, lease_s=60)
                time.sleep(0.3)
                assert not waiting.done()
        if not postgresql:
            assert sorted(d.patient_id for d in waiting.result(timeout=10)) == held
    finally:
        pool.shutdown(wait=True)
        other.dispose()


def test_a_claim_is_released_by_the_recheck_or_by_a_recorded_failure(engine: Engine) -> None:
    draft = approvable(engine)
    (claimed,) = store.claim_batch(engine, worker="w1", limit=5, now=NOW, lease_s=60)
    assert claimed.id == draft.id and claimed.version == 1
    assert store.release_claim(engine, draft.id, worker="w2", now=NOW, error="x") is False
    assert store.release_claim(engine, draft.id, worker="w1", now=NOW, error="FHIR server timed out") is True
    failed = store.get_draft(engine, draft.id)
    assert failed is not None
    assert (failed.last_error, failed.claimed_by, failed.version) == ("FHIR server timed out", None, 1)
    assert store.audit_trail(engine, draft.id)[-1].action == "check-failed"

    store.claim_batch(engine, worker="w1", limit=5, now=NOW, lease_s=60)
    rechecked, _ = store.upsert_draft(engine, new_draft(), [CBC], now=NOW + timedelta(seconds=5))
    assert (rechecked.claimed_by, rechecked.claimed_until, rechecked.last_error) == (None, None, None)
    assert len(store.claim_batch(engine, worker="w2", limit=5, now=NOW + timedelta(seconds=6), lease_s=60)) == 1


# --- audit ------------------------------------------------------------------------------------------


def test_the_audit_trail_only_grows_and_the_database_refuses_to_change_it(engine: Engine) -> None:
    draft = approvable(engine)
    store.edit_draft(engine, draft.id, expected_version=1, changes={"authorization_number": "9"}, actor="a", now=NOW)
    first = store.audit_trail(engine, draft.id)
    store.decide(engine, draft.id, expected_version=2, decision="approved", actor=PHARMACIST_B, now=NOW)
    second = store.audit_trail(engine, draft.id)
    assert second[: len(first)] == first and [a.action for a in second] == [
        "created",
        "authorization-entered",
        "approved",
    ]
    assert second[1].before == {"authorization_number": None} and second[1].after == {"authorization_number": "9"}
    assert all(a.at.tzinfo is UTC for a in second)
    public = [name for name in dir(store) if not name.startswith("_") and callable(getattr(store, name))]
    assert not [n for n in public if "audit" in n and n != "audit_trail" and n != "AuditEntry"]
    for statement in ("UPDATE refill_audit SET actor = 'forged'", "DELETE FROM refill_audit"):
        with pytest.raises(DBAPIError, match="refill_audit is append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    assert store.audit_trail(engine, draft.id) == second


def test_naive_datetimes_are_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        store.upsert_draft(engine, new_draft(), [], now=datetime(2026, 11, 21, 10, 0))
    assert drafts_count(engine) == 0
    with pytest.raises(ValueError, match="severity must be one of"):
        Check("x", "fatal", True, "s")  # type: ignore[arg-type]


def test_a_patients_drafts_in_the_asked_statuses_most_urgent_first(engine: Engine) -> None:
    later, _ = store.upsert_draft(engine, new_draft("p1", "MedicationRequest/1", days_left=9), [CBC], now=NOW)
    sooner, _ = store.upsert_draft(engine, new_draft("p1", "MedicationRequest/2", days_left=2), [CBC], now=NOW)
    rejected, _ = store.upsert_draft(engine, new_draft("p1", "MedicationRequest/3", days_left=1), [CBC], now=NOW)
    store.decide(
        engine, rejected.id, expected_version=1, decision="rejected", actor=PHARMACIST_A, reason="stopped", now=NOW
    )
    store.upsert_draft(engine, new_draft("p2", "MedicationRequest/4", days_left=0), [CBC], now=NOW)
    assert [d.id for d in store.patient_drafts(engine, "p1", ("pending", "approved"))] == [sooner.id, later.id]
    assert [d.id for d in store.patient_drafts(engine, "p1", ("rejected",))] == [rejected.id]
    assert store.patient_drafts(engine, "p3", ("pending",)) == []
    assert store.patient_drafts(engine, "p1", ("pending",))[0].checks == (CBC,)
