"""Alembic, driven from code: no ``alembic.ini`` is needed at run time.

Our history lives in ``migrations/versions`` and is recorded in its own version table,
``evomerge_alembic_version``; Optuna keeps its own in ``alembic_version``. Every
comparison and migration is filtered by ``include_name`` to our ``em_*`` tables, so
Alembic never sees, alters or drops Optuna's tables.

A migration runs in one transaction holding a lock, so several processes starting at
once (API replicas, a one-shot ``evomerge migrate`` step) migrate exactly once:
PostgreSQL takes a transaction-level advisory lock, SQLite ``BEGIN IMMEDIATE``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from service.db.engine import make_engine, redact_url
from service.db.models import OUR_TABLES, Base

VERSION_TABLE = "evomerge_alembic_version"
# pg_advisory_xact_lock key: the bytes of "evomerge" as a signed 64-bit integer.
_PG_LOCK_KEY = int.from_bytes(b"evomerge", "big", signed=True)


class MigrationError(RuntimeError):
    """The database cannot be brought to the requested revision; the message says why."""


def migrations_dir() -> Path:
    """The ``migrations/`` folder: beside the ``service`` package (a checkout, an editable
    install, or a wheel, which ships it as the ``migrations`` package), else wherever the
    ``migrations`` package is importable from."""
    candidates = [Path(__file__).resolve().parents[2] / "migrations"]
    spec = importlib.util.find_spec("migrations")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    for folder in candidates:
        if (folder / "env.py").is_file() and (folder / "versions").is_dir():
            return folder
    raise MigrationError(
        "evomerge's migrations folder (migrations/env.py, migrations/versions/) was not found "
        f"(looked in {', '.join(map(str, candidates))}); reinstall evomerge"
    )


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic's filter: only our tables (``em_*``) exist as far as Alembic is concerned."""
    if type_ == "table":
        return name in OUR_TABLES
    return True


def context_options() -> dict[str, Any]:
    """Options for ``EnvironmentContext.configure`` / ``MigrationContext.configure``."""
    return {
        "version_table": VERSION_TABLE,
        "include_name": include_name,
        "compare_type": True,
        "render_as_batch": True,  # ALTER on SQLite is done by copying the table
    }


def alembic_config(connection: Connection | None = None) -> Any:
    """An in-memory Alembic ``Config``; ``connection`` (if given) is what env.py migrates."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def locked_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside one transaction that holds the migration lock; commits on success.

    On SQLite foreign keys are off for the duration (the documented way to rebuild a
    table without cascading deletes) and checked before the commit.
    """
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # no effect inside a transaction
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits for other writers (busy timeout)
            try:
                yield conn
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise MigrationError(f"migration left rows with broken foreign keys: {broken[:5]}")
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()
    else:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            yield conn


def _current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def _run(url: str | URL | Engine, action: str, revision: str) -> str | None:
    from alembic import command
    from alembic.util.exc import CommandError

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with locked_connection(engine) as conn:
            try:
                getattr(command, action)(alembic_config(conn), revision)
            except CommandError as exc:
                raise MigrationError(
                    f"cannot {action} {redact_url(engine.url)} to {revision!r}: {exc}. "
                    f"Known revisions: {', '.join(revisions())}; the database is at {_current(conn)!r}"
                ) from exc
            return _current(conn)
    finally:
        if engine is not url:
            engine.dispose()


def upgrade(url: str | URL | Engine, revision: str = "head") -> str | None:
    """Bring the database up to ``revision``; returns the revision it is at. Idempotent."""
    return _run(url, "upgrade", revision)


def downgrade(url: str | URL | Engine, revision: str) -> str | None:
    """Take the database down to ``revision`` (``"base"``: drop all our tables, not Optuna's)."""
    return _run(url, "downgrade", revision)


def current(url: str | URL | Engine) -> str | None:
    """The revision the database is at, or None for a database we have never migrated."""
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as conn:
            return _current(conn)
    finally:
        if engine is not url:
            engine.dispose()


def revisions() -> list[str]:
    """Every known revision, base first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def head() -> str:
    """The newest revision."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise MigrationError(f"migrations/versions has {len(heads)} heads {heads}; merge them")
    return heads[0]


def schema_differences(url: str | URL | Engine) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match the models
    (our tables only); empty when they agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn, opts=context_options()), Base.metadata)
    finally:
        if engine is not url:
            engine.dispose()
