"""The pharmacist refill drafts' store: drafts, their pre-checks, decisions and an append-only audit trail.

Tables (created by migration ``0002_refill_drafts``; defined on `cds_hooks.db.metadata`):

- ``refill_draft``: one drafted next prescription per (patient, order being renewed). UNIQUE
  (patient_id, prior_order) makes a re-run scan, or two scans on two replicas, find the same row
  instead of adding one. ``request_key`` (unique, fixed at creation) is the key of the conditional
  create that writes the approved MedicationRequest, so a retried write never makes two.
- ``refill_check``: the draft's pre-check list, in order; replaced as a whole when the draft is re-checked.
- ``refill_audit``: who did what to a draft and when, with the changed fields before and after. This
  module only ever inserts into it, and a trigger makes the database refuse UPDATE and DELETE.

Statuses (a closed set, checked by the database):

=================  =====================================================================================
``pending``        drafted, waiting for a pharmacist; the scan may re-check it, a pharmacist may edit it
``approved``       a pharmacist approved it; the MedicationRequest is owed to the FHIR server (the write
                   is in flight, or the process died before recording its outcome: retry it)
``written``        the MedicationRequest exists on the FHIR server (``written_reference``); final
``write-failed``   approved, but the last write failed (``last_error``); the content is frozen and the
                   write is retried with the same ``request_key``
``rejected``       a pharmacist rejected it (``decision_reason``); final
=================  =====================================================================================

Transitions: pending → approved | rejected (`decide`); approved | write-failed → written | write-failed
(`record_write`). Nothing leaves ``written`` or ``rejected``, and only ``pending`` drafts change content,
so what was approved is exactly what is written, however often the write is retried. An approval is
kept apart from its write (``approved`` before ``written``) because the write is a network call that can
time out with its outcome unknown: the decision is committed first, then the idempotent write is
retried until `record_write` records where it landed.

Concurrency:

- Every content change and every decision bumps ``version`` (claims, ``checked_at`` and the write's
  outcome do not: they change nothing a pharmacist reviews). `edit_draft` and `decide` take the version the user saw and
  change the row only with ``WHERE version = :expected`` (and ``status = 'pending'``) in the same UPDATE,
  so of two pharmacists acting on one draft exactly one wins; the other gets `Conflict`, which names who
  changed the draft, how and when (from the audit trail).
- `upsert_draft` is ``INSERT .. ON CONFLICT (patient_id, prior_order) DO NOTHING``, then (when the row
  existed) a locked read (``SELECT .. FOR UPDATE`` on PostgreSQL; on SQLite every transaction is
  ``BEGIN IMMEDIATE``, see `cds_hooks.db`) and an update only while the draft is still ``pending``.
  A re-check that changes nothing bumps no version and writes no audit row (it only stamps
  ``checked_at``), so a periodic scan does not make every open review stale.
- `claim_batch` leases pending drafts to one worker for re-checking: ``FOR UPDATE SKIP LOCKED`` on
  PostgreSQL, so concurrent workers take disjoint rows without waiting on each other; on SQLite the
  writers are serialised anyway and the conditional update suffices. A lease expires at
  ``claimed_until``, so a crashed worker's drafts are taken again later.

Dates (``runs_out``, ``earliest_dispense``, ``next_test_due``) are calendar days in the clinic's zone;
timestamps are tz-aware and stored in UTC (`cds_hooks.db.UtcDateTime`; a naive one raises ``ValueError``).
Callers pass ``now`` explicitly: the store never reads the clock.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import Any, Final, Literal, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    Date,
    Engine,
    ForeignKey,
    Index,
    Integer,
    RowMapping,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    delete,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from cds_hooks.db import UtcDateTime, metadata

Status = Literal["pending", "approved", "written", "write-failed", "rejected"]
STATUSES: Final[tuple[str, ...]] = ("pending", "approved", "written", "write-failed", "rejected")
Severity = Literal["info", "warning", "critical"]
SEVERITIES: Final[frozenset[str]] = frozenset({"info", "warning", "critical"})
Decision = Literal["approved", "rejected"]

SCAN_ACTOR: Final = "system:scan"
"""The actor recorded for what the scan does (`upsert_draft`, `release_claim`)."""

EDITABLE: Final[frozenset[str]] = frozenset(
    {"medication_request", "authorization_number", "days_left", "runs_out", "earliest_dispense", "next_test_due"}
)
"""The fields `edit_draft` may change (plus the checks, through its ``checks`` argument)."""

_Json = JSON().with_variant(postgresql.JSONB(), "postgresql")
_BigId = BigInteger().with_variant(Integer(), "sqlite")  # as in cds_hooks.db

refill_draft = Table(
    "refill_draft",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("patient_id", String(255), nullable=False),
    Column("prior_order", String(300), nullable=False),
    Column("drug", String(100), nullable=False),
    Column("status", String(16), nullable=False),
    Column("medication_request", _Json, nullable=False),
    Column("days_left", Integer(), nullable=False),
    Column("runs_out", Date(), nullable=False),
    Column("earliest_dispense", Date(), nullable=False),
    Column("next_test_due", Date(), nullable=True),
    Column("blocking", Integer(), nullable=False),
    Column("authorization_number", String(64), nullable=True),
    Column("version", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(300), nullable=False),
    Column("checked_at", UtcDateTime(), nullable=False),
    Column("edited_at", UtcDateTime(), nullable=True),
    Column("claimed_by", String(200), nullable=True),
    Column("claimed_until", UtcDateTime(), nullable=True),
    Column("last_error", Text(), nullable=True),
    Column("decided_by", String(300), nullable=True),
    Column("decided_at", UtcDateTime(), nullable=True),
    Column("decision_reason", Text(), nullable=True),
    Column("written_reference", String(300), nullable=True),
    Column("request_key", String(64), nullable=False),
    UniqueConstraint("patient_id", "prior_order"),
    UniqueConstraint("request_key"),
    CheckConstraint("status IN ('pending', 'approved', 'written', 'write-failed', 'rejected')", name="status"),
    CheckConstraint("blocking >= 0", name="blocking"),
    CheckConstraint("version >= 1", name="version"),
    Index(None, "status", "days_left", "blocking", "runs_out"),
    Index(None, "status", "checked_at"),
    Index(None, "patient_id", "status"),
)
"""One drafted refill per (patient_id, prior_order); see the module docstring for the statuses."""

refill_check = Table(
    "refill_check",
    metadata,
    Column("draft_id", String(36), ForeignKey("refill_draft.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer(), primary_key=True),
    Column("code", String(100), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("blocking", Boolean(), nullable=False),
    Column("summary", Text(), nullable=False),
    Column("detail", Text(), nullable=True),
    CheckConstraint("severity IN ('info', 'warning', 'critical')", name="severity"),
)
"""A draft's pre-checks, ``position`` 0, 1, ... in the order the rule engine gave them."""

refill_audit = Table(
    "refill_audit",
    metadata,
    Column("id", _BigId, primary_key=True, autoincrement=True),
    Column("draft_id", String(36), ForeignKey("refill_draft.id"), nullable=False),
    Column("at", UtcDateTime(), nullable=False),
    Column("actor", String(300), nullable=False),
    Column("action", String(40), nullable=False),
    Column("before", _Json, nullable=True),
    Column("after", _Json, nullable=True),
    Column("note", Text(), nullable=True),
    Index(None, "draft_id", "id"),
)
"""Append-only: inserted by this module, never updated or deleted (a trigger refuses both)."""


# ---------------------------------------------------------------------------------------------------
# Values


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    """One pre-check of a draft: a rule finding (``code`` = the rule code) or a fact the pharmacist
    should see. ``blocking`` findings keep the draft from being approved."""

    code: str
    severity: Severity
    blocking: bool
    summary: str
    detail: str | None = None

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {sorted(SEVERITIES)}, got {self.severity!r}")

    def as_json(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "severity": self.severity,
            "blocking": self.blocking,
            "summary": self.summary,
            "detail": self.detail,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class NewDraft:
    """What the scan drafts for one patient: the order it renews (``prior_order``, a reference such as
    ``MedicationRequest/123``), the drafted MedicationRequest (FHIR JSON) and the supply facts."""

    patient_id: str
    prior_order: str
    drug: str
    medication_request: Mapping[str, Any]
    days_left: int
    runs_out: date
    earliest_dispense: date
    next_test_due: date | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Draft:
    """A stored draft with its checks. ``blocking`` is how many of ``checks`` are blocking."""

    id: str
    patient_id: str
    prior_order: str
    drug: str
    status: Status
    medication_request: Mapping[str, Any]
    days_left: int
    runs_out: date
    earliest_dispense: date
    next_test_due: date | None
    blocking: int
    authorization_number: str | None
    version: int
    created_at: datetime
    updated_at: datetime
    updated_by: str
    checked_at: datetime
    edited_at: datetime | None
    claimed_by: str | None
    claimed_until: datetime | None
    last_error: str | None
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str | None
    written_reference: str | None
    request_key: str
    checks: tuple[Check, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class AuditEntry:
    """One audit row: ``before``/``after`` hold the fields that changed (dates as ISO strings, checks as
    lists of dicts); ``before`` is None for ``created``."""

    id: int
    draft_id: str
    at: datetime
    actor: str
    action: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    note: str | None


class StoreError(Exception):
    """Base of the errors below."""


class NotFound(StoreError):
    """No draft with that id."""

    def __init__(self, draft_id: str) -> None:
        super().__init__(f"no refill draft {draft_id!r}")
        self.draft_id = draft_id


class Conflict(StoreError):
    """The draft is not in the version or status the caller expected: someone else changed it first.
    ``changed_by``/``changed_at``/``change`` come from the newest audit row (who did what, when)."""

    def __init__(
        self,
        draft_id: str,
        *,
        expected_version: int | None,
        version: int,
        status: str,
        changed_by: str | None,
        changed_at: datetime | None,
        change: str | None,
        reason: str,
    ) -> None:
        self.draft_id = draft_id
        self.expected_version = expected_version
        self.version = version
        self.status = status
        self.changed_by = changed_by
        self.changed_at = changed_at
        self.change = change
        who = f"{change} by {changed_by} at {changed_at.isoformat()}" if changed_at is not None else "changed"
        super().__init__(f"refill draft {draft_id} {reason}: {who}; it is now version {version}, {status}")


class Blocked(StoreError):
    """Approval refused: the draft still has blocking checks (their codes in ``codes``)."""

    def __init__(self, draft_id: str, codes: Sequence[str]) -> None:
        self.draft_id = draft_id
        self.codes = tuple(codes)
        super().__init__(f"refill draft {draft_id} cannot be approved while blocking checks remain: {', '.join(codes)}")


# ---------------------------------------------------------------------------------------------------
# Operations


Outcome = Literal["created", "changed", "unchanged", "frozen"]
"""What `store_draft` did: inserted, re-checked with changes, re-checked with none, or left a decided draft be."""


def upsert_draft(
    engine: Engine, draft: NewDraft, checks: Sequence[Check], *, actor: str = SCAN_ACTOR, now: datetime
) -> tuple[Draft, bool]:
    """`store_draft`, returning (draft, whether it was created)."""
    stored, outcome = store_draft(engine, draft, checks, actor=actor, now=now)
    return stored, outcome == "created"


def store_draft(
    engine: Engine, draft: NewDraft, checks: Sequence[Check], *, actor: str = SCAN_ACTOR, now: datetime
) -> tuple[Draft, Outcome]:
    """Store what the scan drafted for (``draft.patient_id``, ``draft.prior_order``); returns the stored
    draft and whether it was created.

    - No draft yet: insert it (``pending``, version 1) with ``checks``; audit ``created``.
    - A ``pending`` draft: re-check it. The supply facts, drug and checks are replaced; the drafted
      MedicationRequest too, unless a pharmacist has edited it (``edited_at`` set: their edit wins,
      and the caller should re-check the stored one). If anything changed: version + 1, audit
      ``rechecked`` with the changed fields. Either way ``checked_at`` = now, the claim is released
      and ``last_error`` cleared.
    - Any other status: left exactly as it is (a decided draft is never redrafted for the same order).

    Safe when several scans race on one draft: the unique key lets exactly one insert."""
    _aware(now)
    blocking = sum(1 for c in checks if c.blocking)
    new_id = str(uuid.uuid4())
    row = {
        "id": new_id,
        "patient_id": draft.patient_id,
        "prior_order": draft.prior_order,
        "drug": draft.drug,
        "status": "pending",
        "medication_request": dict(draft.medication_request),
        "days_left": draft.days_left,
        "runs_out": draft.runs_out,
        "earliest_dispense": draft.earliest_dispense,
        "next_test_due": draft.next_test_due,
        "blocking": blocking,
        "authorization_number": None,
        "version": 1,
        "created_at": now,
        "updated_at": now,
        "updated_by": actor,
        "checked_at": now,
        "request_key": str(uuid.uuid4()),
    }
    with engine.begin() as conn:
        dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            dialect_insert(refill_draft)
            .values(row)
            .on_conflict_do_nothing(index_elements=[refill_draft.c.patient_id, refill_draft.c.prior_order])
            .returning(refill_draft.c.id)
        )
        if conn.execute(stmt).first() is not None:
            _replace_checks(conn, new_id, checks)
            after = _snapshot(row, checks)
            _audit(conn, new_id, now, actor, "created", None, after)
            return _load(conn, new_id), "created"

        current = (
            conn.execute(
                select(refill_draft)
                .where(refill_draft.c.patient_id == draft.patient_id, refill_draft.c.prior_order == draft.prior_order)
                .with_for_update()
            )
            .mappings()
            .one()
        )
        draft_id = str(current["id"])
        if current["status"] != "pending":
            return _load(conn, draft_id), "frozen"
        wanted: dict[str, Any] = {
            "drug": draft.drug,
            "days_left": draft.days_left,
            "runs_out": draft.runs_out,
            "earliest_dispense": draft.earliest_dispense,
            "next_test_due": draft.next_test_due,
            "blocking": blocking,
        }
        if current["edited_at"] is None:
            wanted["medication_request"] = dict(draft.medication_request)
        before, after = _diff(current, wanted)
        old_checks = _checks(conn, [draft_id])[draft_id]
        if tuple(checks) != old_checks:
            before["checks"] = [c.as_json() for c in old_checks]
            after["checks"] = [c.as_json() for c in checks]
        housekeeping = {"checked_at": now, "claimed_by": None, "claimed_until": None, "last_error": None}
        if not after:
            conn.execute(update(refill_draft).where(refill_draft.c.id == draft_id).values(housekeeping))
            return _load(conn, draft_id), "unchanged"
        conn.execute(
            update(refill_draft)
            .where(refill_draft.c.id == draft_id)
            .values(
                **wanted,
                **housekeeping,
                version=refill_draft.c.version + 1,
                updated_at=now,
                updated_by=actor,
            )
        )
        _replace_checks(conn, draft_id, checks)
        _audit(conn, draft_id, now, actor, "rechecked", before, after)
        return _load(conn, draft_id), "changed"


def get_draft(engine: Engine, draft_id: str) -> Draft | None:
    """The draft with its checks, or None."""
    with engine.connect() as conn:
        row = conn.execute(select(refill_draft).where(refill_draft.c.id == draft_id)).mappings().first()
        if row is None:
            return None
        return _draft(row, _checks(conn, [draft_id])[draft_id])


def worklist(engine: Engine, *, status: Status | None = "pending", limit: int = 100, offset: int = 0) -> list[Draft]:
    """Drafts (of ``status``; None: all) most urgent first: fewest days left, then most blocking
    checks, then the earliest run-out date (then creation, then id, so pages are stable)."""
    query = select(refill_draft).order_by(
        refill_draft.c.days_left.asc(),
        refill_draft.c.blocking.desc(),
        refill_draft.c.runs_out.asc(),
        refill_draft.c.created_at.asc(),
        refill_draft.c.id.asc(),
    )
    if status is not None:
        query = query.where(refill_draft.c.status == status)
    with engine.connect() as conn:
        rows = conn.execute(query.limit(limit).offset(offset)).mappings().all()
        checks = _checks(conn, [str(r["id"]) for r in rows])
    return [_draft(r, checks[str(r["id"])]) for r in rows]


def edit_draft(
    engine: Engine,
    draft_id: str,
    *,
    expected_version: int,
    changes: Mapping[str, Any],
    checks: Sequence[Check] | None = None,
    actor: str,
    now: datetime,
    note: str | None = None,
) -> Draft:
    """A pharmacist's edit of a ``pending`` draft at ``expected_version`` (the version they saw).

    ``changes`` maps fields of `EDITABLE` to new values (the whole edited MedicationRequest for dose,
    quantity, supply or notes; the authorization number; ...); ``checks``, when given, replaces the
    pre-check list (the caller re-ran the rules on the edited draft). Audit ``authorization-entered``
    when only the authorization number changed, else ``edited``. An edit that changes nothing returns
    the draft untouched. Raises `NotFound`, `Conflict` (stale version, or no longer pending: says who
    changed it, how and when) or ``ValueError`` (a field that is not editable)."""
    _aware(now)
    unknown = set(changes) - EDITABLE
    if unknown:
        raise ValueError(f"not editable: {', '.join(sorted(unknown))} (editable: {', '.join(sorted(EDITABLE))})")
    wanted = {k: (dict(v) if k == "medication_request" else v) for k, v in changes.items()}
    with engine.begin() as conn:
        current = _locked(conn, draft_id)
        _expect(conn, current, expected_version, "was changed before your edit")
        if checks is not None:
            wanted["blocking"] = sum(1 for c in checks if c.blocking)
        before, after = _diff(current, wanted)
        if checks is not None:
            old_checks = _checks(conn, [draft_id])[draft_id]
            if tuple(checks) != old_checks:
                before["checks"] = [c.as_json() for c in old_checks]
                after["checks"] = [c.as_json() for c in checks]
        if not after:
            return _load(conn, draft_id)
        values: dict[str, Any] = {
            **wanted,
            "version": refill_draft.c.version + 1,
            "updated_at": now,
            "updated_by": actor,
        }
        if "medication_request" in wanted:
            values["edited_at"] = now
        result = conn.execute(
            update(refill_draft)
            .where(
                refill_draft.c.id == draft_id,
                refill_draft.c.version == expected_version,
                refill_draft.c.status == "pending",
            )
            .values(values)
        )
        if result.rowcount != 1:  # cannot happen while the row is locked above; a guard, not a code path
            _raise_conflict(conn, draft_id, expected_version, "was changed before your edit")
        if checks is not None:
            _replace_checks(conn, draft_id, checks)
        action = "authorization-entered" if set(after) == {"authorization_number"} else "edited"
        _audit(conn, draft_id, now, actor, action, before, after, note)
        return _load(conn, draft_id)


def decide(
    engine: Engine,
    draft_id: str,
    *,
    expected_version: int,
    decision: Decision,
    actor: str,
    reason: str | None = None,
    now: datetime,
) -> Draft:
    """A pharmacist approves or rejects a ``pending`` draft at ``expected_version``.

    One conditional ``UPDATE .. WHERE status = 'pending' AND version = :expected`` decides, so of two
    concurrent decisions exactly one wins; the loser gets `Conflict` naming the winner. Approval also
    needs no blocking checks (else `Blocked`, with their codes) and leaves the draft ``approved``: the
    caller then writes it to the FHIR server with ``request_key`` and calls `record_write`. Rejection
    needs a ``reason``. Audit ``approved`` / ``rejected``."""
    _aware(now)
    if decision not in ("approved", "rejected"):
        raise ValueError(f"decision must be 'approved' or 'rejected', got {decision!r}")
    if decision == "rejected" and not (reason and reason.strip()):
        raise ValueError("a rejection needs a reason")
    conditions = [
        refill_draft.c.id == draft_id,
        refill_draft.c.status == "pending",
        refill_draft.c.version == expected_version,
    ]
    if decision == "approved":
        conditions.append(refill_draft.c.blocking == 0)
    with engine.begin() as conn:
        result = conn.execute(
            update(refill_draft)
            .where(*conditions)
            .values(
                status=decision,
                version=refill_draft.c.version + 1,
                updated_at=now,
                updated_by=actor,
                decided_by=actor,
                decided_at=now,
                decision_reason=reason,
                claimed_by=None,
                claimed_until=None,
            )
            .returning(refill_draft.c.id)
        )
        if result.first() is None:
            current = _row(conn, draft_id)
            if current["status"] == "pending" and current["version"] == expected_version:
                codes = [c.code for c in _checks(conn, [draft_id])[draft_id] if c.blocking]
                raise Blocked(draft_id, codes)
            _raise_conflict(conn, draft_id, expected_version, f"could not be {decision}")
        before = {"status": "pending", "version": expected_version}
        after = {"status": decision, "version": expected_version + 1}
        _audit(conn, draft_id, now, actor, decision, before, after, reason)
        return _load(conn, draft_id)


def record_write(
    engine: Engine,
    draft_id: str,
    *,
    written_reference: str | None = None,
    error: str | None = None,
    actor: str,
    now: datetime,
) -> Draft:
    """Record the outcome of writing an approved draft to the FHIR server: exactly one of
    ``written_reference`` (e.g. ``MedicationRequest/abc``: status ``written``, audit ``written``) or
    ``error`` (status ``write-failed``, ``last_error`` set, audit ``write-failed``). Allowed from
    ``approved`` and ``write-failed``. Recording the same reference again is a no-op (a retried write
    found its earlier result through the conditional create); anything else on a ``written`` or
    unapproved draft raises `Conflict`."""
    _aware(now)
    if (written_reference is None) == (error is None):
        raise ValueError("give exactly one of written_reference and error")
    with engine.begin() as conn:
        current = _locked(conn, draft_id)
        if current["status"] == "written" and written_reference == current["written_reference"]:
            return _load(conn, draft_id)
        if current["status"] not in ("approved", "write-failed"):
            _raise_conflict(conn, draft_id, None, f"is {current['status']}, not awaiting its write")
        if written_reference is not None:
            values = {"status": "written", "written_reference": written_reference, "last_error": None}
            action = "written"
        else:
            values = {"status": "write-failed", "last_error": error}
            action = "write-failed"
        conn.execute(
            update(refill_draft)
            .where(refill_draft.c.id == draft_id)
            .values(**values, updated_at=now, updated_by=actor, claimed_by=None, claimed_until=None)
        )
        before, after = _diff(current, values)
        _audit(conn, draft_id, now, actor, action, before, after, error)
        return _load(conn, draft_id)


def claim_write(engine: Engine, draft_id: str, *, worker: str, now: datetime, lease_s: float) -> bool:
    """Take the right to write an ``approved`` / ``write-failed`` draft to the FHIR server until
    ``now + lease_s``: one conditional UPDATE, so while one write is in flight no other (a retried approval,
    the periodic retry, another replica) is sent. `record_write` releases it; a crashed writer's lease runs
    out. False when someone else holds it or the draft is not awaiting its write."""
    _aware(now)
    with engine.begin() as conn:
        result = conn.execute(
            update(refill_draft)
            .where(
                refill_draft.c.id == draft_id,
                refill_draft.c.status.in_(("approved", "write-failed")),
                or_(refill_draft.c.claimed_until.is_(None), refill_draft.c.claimed_until <= now),
            )
            .values(claimed_by=worker, claimed_until=now + timedelta(seconds=lease_s))
        )
        return result.rowcount == 1


def claim_batch(engine: Engine, *, worker: str, limit: int, now: datetime, lease_s: float) -> list[Draft]:
    """Lease up to ``limit`` ``pending`` drafts that nobody holds (or whose lease ran out) to ``worker``
    until ``now + lease_s``, least recently checked first. Concurrent callers never get the same draft
    while its lease runs. The worker re-checks each and calls `upsert_draft` (which releases the claim)
    or `release_claim`. Claims are bookkeeping: they bump no version and write no audit row."""
    _aware(now)
    until = now + timedelta(seconds=lease_s)
    free = and_(
        refill_draft.c.status == "pending",
        or_(refill_draft.c.claimed_until.is_(None), refill_draft.c.claimed_until <= now),
    )
    with engine.begin() as conn:
        candidates = (
            select(refill_draft.c.id)
            .where(free)
            .order_by(refill_draft.c.checked_at.asc(), refill_draft.c.id.asc())
            .limit(limit)
        )
        if conn.dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        ids = [str(i) for i in conn.execute(candidates).scalars()]
        if not ids:
            return []
        claimed = conn.execute(
            update(refill_draft)
            .where(refill_draft.c.id.in_(ids), free)
            .values(claimed_by=worker, claimed_until=until)
            .returning(refill_draft.c.id)
        )
        got = {str(i) for i in claimed.scalars()}
        rows = (
            conn.execute(
                select(refill_draft)
                .where(refill_draft.c.id.in_(got))
                .order_by(refill_draft.c.checked_at.asc(), refill_draft.c.id.asc())
            )
            .mappings()
            .all()
        )
        checks = _checks(conn, list(got))
    return [_draft(r, checks[str(r["id"])]) for r in rows]


def release_claim(
    engine: Engine, draft_id: str, *, worker: str, now: datetime, error: str | None = None, actor: str = SCAN_ACTOR
) -> bool:
    """Give back ``worker``'s claim on a draft without re-drafting it; with ``error`` (the re-check
    failed: FHIR server down, ...) record it in ``last_error`` and audit ``check-failed``, leaving the
    draft's content and version as they were. False when ``worker`` did not hold the claim."""
    _aware(now)
    values: dict[str, Any] = {"claimed_by": None, "claimed_until": None}
    if error is not None:
        values["last_error"] = error
    with engine.begin() as conn:
        result = conn.execute(
            update(refill_draft)
            .where(refill_draft.c.id == draft_id, refill_draft.c.claimed_by == worker)
            .values(values)
            .returning(refill_draft.c.last_error)
        )
        if result.first() is None:
            return False
        if error is not None:
            _audit(conn, draft_id, now, actor, "check-failed", None, {"last_error": error}, None)
        return True


def counts(engine: Engine) -> dict[str, int]:
    """How many drafts are in each status (every status listed, 0 included)."""
    from sqlalchemy import func

    with engine.connect() as conn:
        rows = conn.execute(select(refill_draft.c.status, func.count()).group_by(refill_draft.c.status)).all()
    found = {str(status): int(n) for status, n in rows}
    return {status: found.get(status, 0) for status in STATUSES}


def patient_drafts(engine: Engine, patient_id: str, statuses: Sequence[Status]) -> list[Draft]:
    """`patient_id`'s drafts in `statuses`, most urgent first (the ``(patient_id, status)`` index)."""
    query = (
        select(refill_draft)
        .where(refill_draft.c.patient_id == patient_id, refill_draft.c.status.in_(list(statuses)))
        .order_by(refill_draft.c.days_left.asc(), refill_draft.c.created_at.asc(), refill_draft.c.id.asc())
    )
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
        checks = _checks(conn, [str(r["id"]) for r in rows])
    return [_draft(r, checks[str(r["id"])]) for r in rows]


def find_draft(engine: Engine, patient_id: str, prior_order: str) -> Draft | None:
    """The draft continuing `prior_order` for `patient_id`, or None."""
    with engine.connect() as conn:
        row = (
            conn.execute(
                select(refill_draft).where(
                    refill_draft.c.patient_id == patient_id, refill_draft.c.prior_order == prior_order
                )
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        return _draft(row, _checks(conn, [str(row["id"])])[str(row["id"])])


def record_check_error(engine: Engine, patient_id: str, error: str, *, now: datetime, actor: str = SCAN_ACTOR) -> int:
    """A re-check of `patient_id`'s drafts failed (FHIR server down, chart unreadable): record `error` in
    ``last_error`` of each of their ``pending`` drafts (audit ``check-failed``) and change nothing else.
    Returns how many drafts got it. The same error twice in a row is not audited again."""
    _aware(now)
    with engine.begin() as conn:
        rows = conn.execute(
            select(refill_draft.c.id, refill_draft.c.last_error).where(
                refill_draft.c.patient_id == patient_id, refill_draft.c.status == "pending"
            )
        ).all()
        for draft_id, last in rows:
            if last == error:
                continue
            conn.execute(update(refill_draft).where(refill_draft.c.id == draft_id).values(last_error=error))
            _audit(conn, draft_id, now, actor, "check-failed", {"last_error": last}, {"last_error": error}, None)
        return len(rows)


def set_error(engine: Engine, draft_id: str, error: str | None, *, actor: str, now: datetime) -> Draft:
    """Record (or clear, with None) the last error of a draft's check or write without changing its
    content or version; audit ``check-failed`` when set."""
    _aware(now)
    with engine.begin() as conn:
        current = _locked(conn, draft_id)
        if current["last_error"] != error:
            conn.execute(update(refill_draft).where(refill_draft.c.id == draft_id).values(last_error=error))
            if error is not None:
                before = {"last_error": current["last_error"]}
                _audit(conn, draft_id, now, actor, "check-failed", before, {"last_error": error})
        return _load(conn, draft_id)


def _skip_locked(conn: Connection, query: Any) -> Any:
    """On PostgreSQL, lock the rows read and skip those another transaction holds (another replica's scan
    withdrawing the same drafts, a pharmacist's decision in flight): they are left to that transaction, and
    the versioned UPDATE in `_withdraw` guards the rest. SQLite serialises writers anyway."""
    return query.with_for_update(skip_locked=True) if conn.dialect.name == "postgresql" else query


def _withdraw(conn: Connection, row: Any, now: datetime, reason: str) -> bool:
    result = conn.execute(
        update(refill_draft)
        .where(refill_draft.c.id == row.id, refill_draft.c.status == "pending", refill_draft.c.version == row.version)
        .values(
            status="rejected",
            version=row.version + 1,
            updated_at=now,
            updated_by=SCAN_ACTOR,
            decided_by=SCAN_ACTOR,
            decided_at=now,
            decision_reason=reason,
            claimed_by=None,
            claimed_until=None,
        )
    )
    if result.rowcount != 1:
        return False
    before = {"status": "pending", "version": row.version}
    after = {"status": "rejected", "version": row.version + 1}
    _audit(conn, row.id, now, SCAN_ACTOR, "withdrawn", before, after, reason)
    return True


def withdraw_superseded(engine: Engine, patient_id: str, *, current: Iterable[str], now: datetime, reason: str) -> int:
    """Reject (as ``system:scan``, audit ``withdrawn``) the patient's ``pending`` drafts whose prior order is
    not in `current` (the orders that are now the patient's active ones). A draft a pharmacist changed at
    the same moment is left for the next scan. Returns how many were withdrawn."""
    _aware(now)
    keep = set(current)
    with engine.begin() as conn:
        rows = conn.execute(
            _skip_locked(
                conn,
                select(refill_draft.c.id, refill_draft.c.version, refill_draft.c.prior_order).where(
                    refill_draft.c.patient_id == patient_id, refill_draft.c.status == "pending"
                ),
            )
        ).all()
        stale = [row for row in rows if row.prior_order not in keep]
        return sum(1 for row in stale if _withdraw(conn, row, now, f"{row.prior_order} {reason}"))


def withdraw_unseen(engine: Engine, seen: set[str], *, now: datetime, reason: str) -> int:
    """After a complete scan: reject the ``pending`` drafts of patients the scan did not find (no active
    IMiD order any more). Returns how many."""
    _aware(now)
    with engine.begin() as conn:
        rows = conn.execute(
            _skip_locked(
                conn,
                select(refill_draft.c.id, refill_draft.c.version, refill_draft.c.patient_id).where(
                    refill_draft.c.status == "pending"
                ),
            )
        ).all()
        return sum(1 for row in rows if row.patient_id not in seen and _withdraw(conn, row, now, reason))


def audit_trail(engine: Engine, draft_id: str) -> list[AuditEntry]:
    """The draft's audit rows, oldest first. There is deliberately no way to change or delete them."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(refill_audit).where(refill_audit.c.draft_id == draft_id).order_by(refill_audit.c.id)
        ).mappings()
        return [
            AuditEntry(
                id=int(r["id"]),
                draft_id=str(r["draft_id"]),
                at=r["at"],
                actor=r["actor"],
                action=r["action"],
                before=r["before"],
                after=r["after"],
                note=r["note"],
            )
            for r in rows
        ]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _aware(now: datetime) -> None:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"naive datetime {now.isoformat()} refused: give it a time zone")


def _jsonable(value: Any) -> Any:
    if isinstance(value, date | datetime):
        return value.isoformat()
    return value


def _snapshot(row: Mapping[str, Any], checks: Sequence[Check]) -> dict[str, Any]:
    keys = (
        "patient_id",
        "prior_order",
        "drug",
        "status",
        "medication_request",
        "days_left",
        "runs_out",
        "earliest_dispense",
        "next_test_due",
        "blocking",
        "version",
        "request_key",
    )
    return {k: _jsonable(row[k]) for k in keys} | {"checks": [c.as_json() for c in checks]}


def _diff(current: RowMapping, wanted: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after) of the fields in ``wanted`` whose value differs from ``current``."""
    before: dict[str, Any] = {}
    after: dict[str, Any] = {}
    for key, value in wanted.items():
        if current[key] != value:
            before[key] = _jsonable(current[key])
            after[key] = _jsonable(value)
    return before, after


def _audit(
    conn: Connection,
    draft_id: str,
    at: datetime,
    actor: str,
    action: str,
    before: Mapping[str, Any] | None,
    after: Mapping[str, Any] | None,
    note: str | None = None,
) -> None:
    conn.execute(
        insert(refill_audit).values(
            draft_id=draft_id, at=at, actor=actor, action=action, before=before, after=after, note=note
        )
    )


def _replace_checks(conn: Connection, draft_id: str, checks: Iterable[Check]) -> None:
    conn.execute(delete(refill_check).where(refill_check.c.draft_id == draft_id))
    rows = [{"draft_id": draft_id, "position": i, **c.as_json()} for i, c in enumerate(checks)]
    if rows:
        conn.execute(insert(refill_check), rows)


def _checks(conn: Connection, draft_ids: Sequence[str]) -> dict[str, tuple[Check, ...]]:
    out: dict[str, list[Check]] = {i: [] for i in draft_ids}
    if draft_ids:
        rows = conn.execute(
            select(refill_check)
            .where(refill_check.c.draft_id.in_(list(draft_ids)))
            .order_by(refill_check.c.draft_id, refill_check.c.position)
        ).mappings()
        for r in rows:
            out[str(r["draft_id"])].append(
                Check(
                    code=r["code"],
                    severity=cast(Severity, r["severity"]),
                    blocking=bool(r["blocking"]),
                    summary=r["summary"],
                    detail=r["detail"],
                )
            )
    return {k: tuple(v) for k, v in out.items()}


def _row(conn: Connection, draft_id: str) -> RowMapping:
    row = conn.execute(select(refill_draft).where(refill_draft.c.id == draft_id)).mappings().first()
    if row is None:
        raise NotFound(draft_id)
    return row


def _locked(conn: Connection, draft_id: str) -> RowMapping:
    row = conn.execute(select(refill_draft).where(refill_draft.c.id == draft_id).with_for_update()).mappings().first()
    if row is None:
        raise NotFound(draft_id)
    return row


def _load(conn: Connection, draft_id: str) -> Draft:
    return _draft(_row(conn, draft_id), _checks(conn, [draft_id])[draft_id])


def _expect(conn: Connection, current: RowMapping, expected_version: int, reason: str) -> None:
    if current["status"] != "pending" or current["version"] != expected_version:
        _raise_conflict(conn, str(current["id"]), expected_version, reason)


def _raise_conflict(conn: Connection, draft_id: str, expected_version: int | None, reason: str) -> None:
    current = _row(conn, draft_id)
    last = conn.execute(
        select(refill_audit.c.actor, refill_audit.c.at, refill_audit.c.action)
        .where(refill_audit.c.draft_id == draft_id)
        .order_by(refill_audit.c.id.desc())
        .limit(1)
    ).first()
    raise Conflict(
        draft_id,
        expected_version=expected_version,
        version=int(current["version"]),
        status=str(current["status"]),
        changed_by=last.actor if last is not None else None,
        changed_at=last.at if last is not None else None,
        change=last.action if last is not None else None,
        reason=reason,
    )


def _draft(row: RowMapping, checks: tuple[Check, ...]) -> Draft:
    return Draft(
        id=str(row["id"]),
        patient_id=row["patient_id"],
        prior_order=row["prior_order"],
        drug=row["drug"],
        status=cast(Status, row["status"]),
        medication_request=row["medication_request"],
        days_left=int(row["days_left"]),
        runs_out=row["runs_out"],
        earliest_dispense=row["earliest_dispense"],
        next_test_due=row["next_test_due"],
        blocking=int(row["blocking"]),
        authorization_number=row["authorization_number"],
        version=int(row["version"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
        checked_at=row["checked_at"],
        edited_at=row["edited_at"],
        claimed_by=row["claimed_by"],
        claimed_until=row["claimed_until"],
        last_error=row["last_error"],
        decided_by=row["decided_by"],
        decided_at=row["decided_at"],
        decision_reason=row["decision_reason"],
        written_reference=row["written_reference"],
        request_key=row["request_key"],
        checks=checks,
    )
