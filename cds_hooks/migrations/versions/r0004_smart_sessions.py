"""SMART app sessions: smart_launch (a launch in flight: state → PKCE verifier, bound to the browser) and
smart_session (an authorized app session: the EHR's tokens, kept server-side).

Revision ID: 0004_smart_sessions
Revises: 0003_refill_draft_patient
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# Frozen copy of the schema at this revision (see 0002).
revision: str = "0004_smart_sessions"
down_revision: str | None = "0003_refill_draft_patient"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_Json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "smart_launch",
        sa.Column("state_hash", sa.String(64), nullable=False),
        sa.Column("browser_hash", sa.String(64), nullable=False),
        sa.Column("iss", sa.String(500), nullable=False),
        sa.Column("launch", sa.Text(), nullable=True),
        sa.Column("code_verifier", sa.String(128), nullable=False),
        sa.Column("nonce", sa.String(64), nullable=False),
        sa.Column("token_endpoint", sa.String(500), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("state_hash", name="pk_smart_launch"),
    )
    op.create_index("ix_smart_launch_expires_at", "smart_launch", ["expires_at"])
    op.create_table(
        "smart_session",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("browser_hash", sa.String(64), nullable=False),
        sa.Column("iss", sa.String(500), nullable=False),
        sa.Column("token_endpoint", sa.String(500), nullable=False),
        sa.Column("access_token", sa.Text(), nullable=False),
        sa.Column("refresh_token", sa.Text(), nullable=True),
        sa.Column("access_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("patient", sa.String(255), nullable=True),
        sa.Column("encounter", sa.String(255), nullable=True),
        sa.Column("fhir_user", sa.String(300), nullable=True),
        sa.Column("need_patient_banner", sa.Boolean(), nullable=False),
        sa.Column("style", _Json, nullable=True),
        sa.Column("app_context", sa.Text(), nullable=True),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("refreshing_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_smart_session"),
    )
    op.create_index("ix_smart_session_expires_at", "smart_session", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_smart_session_expires_at", table_name="smart_session")
    op.drop_table("smart_session")
    op.drop_index("ix_smart_launch_expires_at", table_name="smart_launch")
    op.drop_table("smart_launch")
