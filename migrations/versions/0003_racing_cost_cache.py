"""Multi-fidelity racing, cost accounting and the score cache.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

Trials and baselines gain their cost (examples, tokens, worker seconds, whether a cache hit
served them) and trials their last rung; studies keep their recounted cost; the score cache
and the weight digests it is keyed by are new tables. ``pruned``, a new trial state, needs no
change: states are plain strings. Types spelled out so that this revision never changes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
UTC = sa.DateTime(timezone=True)

COST_COLUMNS = (
    ("examples", sa.BigInteger()),
    ("tokens", sa.BigInteger()),
    ("worker_seconds", sa.Float()),
)


def _cost_columns(batch) -> None:
    for name, type_ in COST_COLUMNS:
        batch.add_column(sa.Column(name, type_, nullable=True))
    batch.add_column(sa.Column("cached", sa.Boolean(), nullable=False, server_default=sa.false()))


def upgrade() -> None:
    with op.batch_alter_table("em_trials") as batch:
        _cost_columns(batch)
        batch.add_column(sa.Column("rung", sa.Integer(), nullable=True))
    with op.batch_alter_table("em_baselines") as batch:
        _cost_columns(batch)
    with op.batch_alter_table("em_studies") as batch:
        batch.add_column(sa.Column("cost", sa.JSON(), nullable=True))

    op.create_table(
        "em_score_cache",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("parts", sa.JSON(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("values", sa.JSON(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=True),
        *(sa.Column(name, type_, nullable=True) for name, type_ in COST_COLUMNS),
        sa.Column("hits", sa.Integer(), nullable=False, server_default=sa.text("0")),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("last_used_at", UTC, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_em_score_cache"),
        sa.UniqueConstraint("key", name="uq_em_score_cache_key"),
    )
    op.create_table(
        "em_weight_digests",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("mtime_ns", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_em_weight_digests"),
        sa.UniqueConstraint("path", "size_bytes", "mtime_ns",
                            name="uq_em_weight_digests_path_size_bytes_mtime_ns"),
    )


def downgrade() -> None:
    op.drop_table("em_weight_digests")
    op.drop_table("em_score_cache")
    with op.batch_alter_table("em_studies") as batch:
        batch.drop_column("cost")
    with op.batch_alter_table("em_baselines") as batch:
        batch.drop_column("cached")
        for name, _ in reversed(COST_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("em_trials") as batch:
        batch.drop_column("rung")
        batch.drop_column("cached")
        for name, _ in reversed(COST_COLUMNS):
            batch.drop_column(name)
