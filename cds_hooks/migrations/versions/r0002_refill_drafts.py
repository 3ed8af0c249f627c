"""Pharmacist refill drafts: refill_draft, refill_check (its pre-checks) and refill_audit (append-only).

Revision ID: 0002_refill_drafts
Revises: 0001_jti_and_feedback

refill_audit refuses UPDATE and DELETE with a trigger on both databases, so "append-only" holds for
any code that reaches the database, not only for the Python API in cds_hooks.refill_store.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Frozen copy of the schema at this revision (types from SQLAlchemy only, never the live tables in
# cds_hooks.refill_store; DateTime(timezone=True) is what cds_hooks.db.UtcDateTime stores).
revision: str = "0002_refill_drafts"
down_revision: str | None = "0001_jti_and_feedback"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_STATUSES = "'pending', 'approved', 'written', 'write-failed', 'rejected'"
_APPEND_ONLY = "refill_audit is append-only"


def upgrade() -> None:
    op.create_table(
        "refill_draft",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("patient_id", sa.String(255), nullable=False),
        sa.Column("prior_order", sa.String(300), nullable=False),
        sa.Column("drug", sa.String(100), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("medication_request", _Json, nullable=False),
        sa.Column("days_left", sa.Integer(), nullable=False),
        sa.Column("runs_out", sa.Date(), nullable=False),
        sa.Column("earliest_dispense", sa.Date(), nullable=False),
        sa.Column("next_test_due", sa.Date(), nullable=True),
        sa.Column("blocking", sa.Integer(), nullable=False),
        sa.Column("authorization_number", sa.String(64), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(300), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("edited_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_by", sa.String(200), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("decided_by", sa.String(300), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decision_reason", sa.Text(), nullable=True),
        sa.Column("written_reference", sa.String(300), nullable=True),
        sa.Column("request_key", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_refill_draft"),
        sa.UniqueConstraint("patient_id", "prior_order", name="uq_refill_draft_patient_id_prior_order"),
        sa.UniqueConstraint("request_key", name="uq_refill_draft_request_key"),
        sa.CheckConstraint(f"status IN ({_STATUSES})", name="ck_refill_draft_status"),
        sa.CheckConstraint("blocking >= 0", name="ck_refill_draft_blocking"),
        sa.CheckConstraint("version >= 1", name="ck_refill_draft_version"),
    )
    op.create_index(
        "ix_refill_draft_status_days_left_blocking_runs_out",
        "refill_draft",
        ["status", "days_left", "blocking", "runs_out"],
    )
    op.create_index("ix_refill_draft_status_checked_at", "refill_draft", ["status", "checked_at"])

    op.create_table(
        "refill_check",
        sa.Column("draft_id", sa.String(36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(100), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("blocking", sa.Boolean(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("draft_id", "position", name="pk_refill_check"),
        sa.ForeignKeyConstraint(
            ["draft_id"], ["refill_draft.id"], name="fk_refill_check_draft_id_refill_draft", ondelete="CASCADE"
        ),
        sa.CheckConstraint("severity IN ('info', 'warning', 'critical')", name="ck_refill_check_severity"),
    )

    op.create_table(
        "refill_audit",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("draft_id", sa.String(36), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(300), nullable=False),
        sa.Column("action", sa.String(40), nullable=False),
        sa.Column("before", _Json, nullable=True),
        sa.Column("after", _Json, nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_refill_audit"),
        sa.ForeignKeyConstraint(["draft_id"], ["refill_draft.id"], name="fk_refill_audit_draft_id_refill_draft"),
    )
    op.create_index("ix_refill_audit_draft_id_id", "refill_audit", ["draft_id", "id"])

    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE FUNCTION refill_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN RAISE EXCEPTION '{_APPEND_ONLY}'; END $$"
        )
        op.execute(
            "CREATE TRIGGER refill_audit_append_only BEFORE UPDATE OR DELETE ON refill_audit "
            "FOR EACH ROW EXECUTE FUNCTION refill_audit_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER refill_audit_no_{event.lower()} BEFORE {event} ON refill_audit "
                f"BEGIN SELECT RAISE(ABORT, '{_APPEND_ONLY}'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS refill_audit_append_only ON refill_audit")
        op.execute("DROP FUNCTION IF EXISTS refill_audit_append_only()")
    op.drop_table("refill_audit")
    op.drop_table("refill_check")
    op.drop_table("refill_draft")
