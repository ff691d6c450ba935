"""Initial schema: studies, trials, artifacts, events, API tokens.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

Written by hand. Every table is prefixed ``em_``: Optuna's storage, in the same database,
owns ``studies``, ``trials`` and the rest of its names. Types are spelled out here rather
than imported from ``service.db`` so that this revision never changes when the models do.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# BIGINT on PostgreSQL; INTEGER on SQLite, which autoincrements only an INTEGER PRIMARY KEY.
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "em_studies",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trials_done", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("trials_failed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("elapsed_seconds", sa.Float(), server_default=sa.text("0"), nullable=False),
        sa.Column("best_trial_number", sa.Integer(), nullable=True),
        sa.Column("best_value", sa.Float(), nullable=True),
        sa.Column("optuna_study_name", sa.String(255), nullable=True),
        sa.Column("optimizer_state", sa.LargeBinary(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_em_studies"),
        sa.UniqueConstraint("optuna_study_name", name="uq_em_studies_optuna_study_name"),
    )
    op.create_index("ix_em_studies_status", "em_studies", ["status"])

    op.create_table(
        "em_trials",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("study_id", sa.String(36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("point_id", sa.String(64), nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("recipe", sa.JSON(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("values", sa.JSON(), nullable=True),
        sa.Column("fitness", sa.Float(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_em_trials"),
        sa.ForeignKeyConstraint(
            ["study_id"], ["em_studies.id"], name="fk_em_trials_study_id_em_studies", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("study_id", "number", name="uq_em_trials_study_id_number"),
    )
    op.create_index("ix_em_trials_study_id_state", "em_trials", ["study_id", "state"])

    op.create_table(
        "em_artifacts",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("study_id", sa.String(36), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_em_artifacts"),
        sa.ForeignKeyConstraint(
            ["study_id"], ["em_studies.id"], name="fk_em_artifacts_study_id_em_studies", ondelete="CASCADE"
        ),
    )
    op.create_index("ix_em_artifacts_study_id_trial_number", "em_artifacts", ["study_id", "trial_number"])

    op.create_table(
        "em_events",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("study_id", sa.String(36), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("data", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_em_events"),
        sa.ForeignKeyConstraint(
            ["study_id"], ["em_studies.id"], name="fk_em_events_study_id_em_studies", ondelete="CASCADE"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_em_events_study_id_id", "em_events", ["study_id", "id"])

    op.create_table(
        "em_api_tokens",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_em_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_em_api_tokens_token_hash"),
    )
    op.create_index("ix_em_api_tokens_name", "em_api_tokens", ["name"])


def downgrade() -> None:
    op.drop_index("ix_em_api_tokens_name", table_name="em_api_tokens")
    op.drop_table("em_api_tokens")
    op.drop_index("ix_em_events_study_id_id", table_name="em_events")
    op.drop_table("em_events")
    op.drop_index("ix_em_artifacts_study_id_trial_number", table_name="em_artifacts")
    op.drop_table("em_artifacts")
    op.drop_index("ix_em_trials_study_id_state", table_name="em_trials")
    op.drop_table("em_trials")
    op.drop_index("ix_em_studies_status", table_name="em_studies")
    op.drop_table("em_studies")
