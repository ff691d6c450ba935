"""Alembic migrations of evomerge's database (its own version table, beside Optuna's)."""
