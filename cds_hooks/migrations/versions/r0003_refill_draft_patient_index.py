"""Index refill_draft by (patient_id, status): the scan looks up each patient's pending drafts (withdrawals,
recorded errors); without it SQLite read every pending draft per patient (5 ms a call at 10,000 drafts).

Revision ID: 0003_refill_draft_patient
Revises: 0002_refill_drafts
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003_refill_draft_patient"
down_revision: str | None = "0002_refill_drafts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_refill_draft_patient_id_status", "refill_draft", ["patient_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_refill_draft_patient_id_status", table_name="refill_draft")
