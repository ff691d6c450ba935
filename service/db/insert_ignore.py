"""INSERT … unless a row with the same unique key exists: one statement, race-safe.

Two writers that insert the same key at once (two controllers, a controller and a replay) must
not fail: PostgreSQL and SQLite both do ``ON CONFLICT DO NOTHING`` atomically. Any other
database takes a savepoint and ignores the integrity error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session


def insert_ignore(session: Session, model: type[Any], values: dict[str, Any], unique: Sequence[str]) -> None:
    """Insert ``values`` into ``model``'s table unless a row with the same ``unique`` columns exists."""
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        session.execute(insert(model).values(**values).on_conflict_do_nothing(index_elements=list(unique)))
        return
    from sqlalchemy import insert as generic_insert

    try:
        with session.begin_nested():
            session.execute(generic_insert(model).values(**values))
    except IntegrityError:
        pass
