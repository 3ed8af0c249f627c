"""JWT replay cache (cds_jti) and CDS Hooks feedback (cds_feedback).

Revision ID: 0001_jti_and_feedback
Revises: (none: the first migration)
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Frozen copy of the schema at this revision: types from SQLAlchemy only, never the live tables in
# cds_hooks.db (DateTime(timezone=True) is what cds_hooks.db.UtcDateTime stores).
revision: str = "0001_jti_and_feedback"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "cds_jti",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("iss", sa.String(255), nullable=False),
        sa.Column("jti", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_cds_jti"),
        sa.UniqueConstraint("iss", "jti", name="uq_cds_jti_iss_jti"),
    )
    op.create_index("ix_cds_jti_expires_at", "cds_jti", ["expires_at"])

    op.create_table(
        "cds_feedback",
        sa.Column("id", _BigId, autoincrement=True, nullable=False),
        sa.Column("service_id", sa.String(200), nullable=False),
        sa.Column("card_uuid", sa.String(64), nullable=False),
        sa.Column("rule_code", sa.String(100), nullable=True),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("override_reason_system", sa.String(500), nullable=True),
        sa.Column("override_reason_code", sa.String(200), nullable=True),
        sa.Column("override_reason_display", sa.Text(), nullable=True),
        sa.Column("user_comment", sa.Text(), nullable=True),
        sa.Column("accepted_suggestions", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("outcome_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("client_iss", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_cds_feedback"),
        sa.CheckConstraint("outcome IN ('accepted', 'overridden')", name="ck_cds_feedback_outcome"),
    )
    op.create_index("ix_cds_feedback_rule_code_outcome", "cds_feedback", ["rule_code", "outcome"])
    op.create_index("ix_cds_feedback_card_uuid", "cds_feedback", ["card_uuid"])


def downgrade() -> None:
    op.drop_table("cds_feedback")
    op.drop_table("cds_jti")
