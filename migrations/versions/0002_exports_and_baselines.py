"""Exports (progress, content address, download leases), token scopes, baselines.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Types spelled out (not imported from ``service.db``) so that this revision never changes.
SQLite cannot drop columns in place: the downgrade uses batch mode (copy and swap).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC = sa.DateTime(timezone=True)

ARTIFACT_COLUMNS = (
    ("export_key", sa.String(64)),
    ("progress", sa.Float()),
    ("requested_by", sa.String(200)),
    ("started_at", UTC),
    ("finished_at", UTC),
    ("last_accessed_at", UTC),
    ("download_lease_until", UTC),
)


def upgrade() -> None:
    with op.batch_alter_table("em_artifacts") as batch:
        for name, type_ in ARTIFACT_COLUMNS:
            batch.add_column(sa.Column(name, type_, nullable=True))
    op.create_index("ix_em_artifacts_export_key", "em_artifacts", ["export_key"])
    op.create_index("ix_em_artifacts_state", "em_artifacts", ["state"])

    with op.batch_alter_table("em_api_tokens") as batch:
        batch.add_column(sa.Column("scopes", sa.String(100), nullable=False,
                                   server_default="read,write,download"))

    op.create_table(
        "em_baselines",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("study_id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("values", sa.JSON(), nullable=True),
        sa.Column("fitness", sa.Float(), nullable=True),
        sa.Column("heldout_scores", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("finished_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_em_baselines"),
        sa.ForeignKeyConstraint(["study_id"], ["em_studies.id"], name="fk_em_baselines_study_id_em_studies",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("study_id", "name", name="uq_em_baselines_study_id_name"),
    )


def downgrade() -> None:
    op.drop_table("em_baselines")
    with op.batch_alter_table("em_api_tokens") as batch:
        batch.drop_column("scopes")
    op.drop_index("ix_em_artifacts_state", table_name="em_artifacts")
    op.drop_index("ix_em_artifacts_export_key", table_name="em_artifacts")
    with op.batch_alter_table("em_artifacts") as batch:
        for name, _ in reversed(ARTIFACT_COLUMNS):
            batch.drop_column(name)
