"""Engines and sessions for SQLite (the embedded default) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_S = 30.0


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; ``postgresql://`` and ``postgres://`` mean psycopg 3 (``postgresql+psycopg://``).

    Pass the normalized URL to Optuna as well: a plain ``postgresql://`` would ask for
    psycopg2, which evomerge does not install.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except ArgumentError as exc:
        raise ValueError(
            f"{url!r} is not a database URL; use sqlite:///path/to/evomerge.db or "
            "postgresql://user:password@host:5432/dbname"
        ) from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def url_string(url: str | URL) -> str:
    """The normalized URL as a string, password included (for Optuna, Alembic)."""
    return normalize_url(url).render_as_string(hide_password=False)


def redact_url(url: str | URL) -> str:
    """The URL with its password masked, for logs and messages."""
    try:
        return normalize_url(url).render_as_string(hide_password=True)
    except ValueError:
        return "<invalid database URL>"


def _sqlite_file(url: URL) -> Path | None:
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:") or url.query.get("mode"):
        return None
    return Path(database)


def _switch_to_wal(cursor: Any) -> Any:
    """``PRAGMA journal_mode=WAL``, retried: switching a new file needs an exclusive lock,
    and SQLite does not always wait on the busy timeout for it (several processes opening
    a fresh database at once got "database is locked" on a loaded machine)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode=WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


def _sqlite_journal(dbapi_connection: Any) -> None:
    """WAL, and ``synchronous=NORMAL`` with it, on a new SQLite connection.

    WAL lets the API read while the controller writes; it is a property of the file.
    ``synchronous`` is a property of each connection (SQLite's default, FULL, fsyncs the
    WAL at every commit: about a millisecond each, and Optuna commits several times per
    trial). With NORMAL a commit is durable against the process being killed (the WAL is
    in the OS's page cache); a power cut or OS crash may lose the last commits before a
    checkpoint, never corrupt the file, and since every connection appends to the same
    WAL what survives is every transaction up to some point — the state of an earlier
    moment, which a restart handles like a crash at that moment (docs/controller.md).
    """
    cursor = dbapi_connection.cursor()
    try:
        mode = _switch_to_wal(cursor)
        if mode and str(mode[0]).lower() == "wal":
            cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    finally:
        cursor.close()
    _sqlite_journal(dbapi_connection)


class JournaledSQLiteConnection(sqlite3.Connection):
    """A ``sqlite3`` connection that sets WAL and ``synchronous=NORMAL`` as it opens
    (:func:`_sqlite_journal`). For engines evomerge does not create itself (Optuna's
    ``RDBStorage``): pass it as ``connect_args={"factory": JournaledSQLiteConnection}``.
    A class rather than an engine event, so that it survives Optuna re-creating its
    engine (``RDBStorage`` is rebuilt from its URL and engine arguments when unpickled)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _sqlite_journal(self)


def make_engine(url: str | URL, *, create_dirs: bool = True, **kwargs: Any) -> Engine:
    """An engine for ``url`` with the settings evomerge relies on.

    SQLite: foreign keys on, WAL journal, a 30 s busy timeout, usable from any thread;
    the file's folder is created when ``create_dirs``; ``sqlite://`` is one in-memory
    database shared by all threads (for tests). pysqlite's own transaction handling is
    kept (it begins a transaction at the first write, so a reader never blocks a writer):
    claim rows with a conditional UPDATE (``... WHERE state = 'pending'``), not SELECT-then-UPDATE.
    PostgreSQL: psycopg 3, connections checked before use. ``kwargs`` go to ``sqlalchemy.create_engine``.
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        connect_args = {"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S}
        connect_args.update(kwargs.pop("connect_args", {}))
        path = _sqlite_file(parsed)
        if path is not None and create_dirs:
            path.expanduser().parent.mkdir(parents=True, exist_ok=True)
        if not parsed.database or parsed.database == ":memory:":
            # one in-memory database shared by every thread (tests), not one per thread
            kwargs.setdefault("poolclass", StaticPool)
        engine = create_engine(parsed, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    if backend == "postgresql":
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, **kwargs)
    raise ValueError(
        f"unsupported database {backend!r} in {redact_url(parsed)}: evomerge runs on SQLite "
        "(sqlite:///path/evomerge.db) or PostgreSQL (postgresql://user@host/db)"
    )


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(engine, expire_on_commit=False)
