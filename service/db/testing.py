"""Throw-away databases for tests: a SQLite file, or a fresh PostgreSQL schema.

Any test of the database layer (ours or the controller's) runs on both::

    @pytest.fixture(params=["sqlite", "postgresql"])
    def db_url(request, tmp_path):
        with temporary_database(request.param, tmp_path) as url:
            yield url

PostgreSQL is ``EVOMERGE_TEST_POSTGRES_URL`` if set, else 127.0.0.1:5432, database
``test``, user ``postgres`` then ``root`` (trust auth). Each test gets its own schema
(the URL sets ``search_path``), dropped afterwards, so tests are repeatable and can run
beside others on the same database. When nothing listens on the port, PostgreSQL tests
are skipped with a loud reason and a warning; set ``EVOMERGE_REQUIRE_POSTGRES=1`` (CI)
to make that a failure. A server that answers but refuses us is always a failure.
"""

from __future__ import annotations

import os
import socket
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import make_url

from service.db.engine import make_engine, url_string

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_DATABASE = "127.0.0.1", 5432, "test"
DEFAULT_USERS = ("postgres", "root")
ABSENT = (
    "PostgreSQL at {where} is absent ({why}): PostgreSQL tests NOT RUN. "
    "Start it (trust auth, database 'test') or set EVOMERGE_TEST_POSTGRES_URL."
)


class PostgresAbsent(RuntimeError):
    """Nothing listens where the test PostgreSQL should be."""


def _listening(host: str, port: int) -> str | None:
    """None when something accepts TCP connections at host:port, else why not."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


@lru_cache(maxsize=1)
def postgres_url() -> str:
    """The URL of the test PostgreSQL. Raises ``PostgresAbsent`` when nothing listens
    there, and ``RuntimeError`` when a server answers but none of the users can log in."""
    configured = os.environ.get("EVOMERGE_TEST_POSTGRES_URL")
    if configured:
        candidates = [url_string(configured)]
        parsed = make_url(candidates[0])
        host, port = parsed.host or DEFAULT_HOST, parsed.port or DEFAULT_PORT
    else:
        host, port = DEFAULT_HOST, DEFAULT_PORT
        candidates = [f"postgresql+psycopg://{u}@{host}:{port}/{DEFAULT_DATABASE}" for u in DEFAULT_USERS]
    why = _listening(host, port)
    if why is not None:
        raise PostgresAbsent(ABSENT.format(where=f"{host}:{port}", why=why))
    errors = []
    for url in candidates:
        engine = make_engine(url, pool_pre_ping=False)
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return url
        except Exception as exc:  # try the next user
            errors.append(f"{make_url(url).username}: {str(exc).strip().splitlines()[0]}")
        finally:
            engine.dispose()
    raise RuntimeError(f"PostgreSQL answers at {host}:{port} but refuses us: {'; '.join(errors)}")


def require_postgres() -> str:
    """``postgres_url()``, or a pytest skip (with a warning) when PostgreSQL is absent."""
    import pytest

    try:
        return postgres_url()
    except PostgresAbsent as exc:
        if os.environ.get("EVOMERGE_REQUIRE_POSTGRES", "") not in ("", "0"):
            pytest.fail(f"{exc} (EVOMERGE_REQUIRE_POSTGRES is set)")
        warnings.warn(str(exc), pytest.PytestWarning, stacklevel=2)
        pytest.skip(str(exc))


@contextmanager
def postgres_schema(base_url: str) -> Iterator[str]:
    """A URL whose connections use a fresh schema of ``base_url``'s database; dropped on exit."""
    schema = f"em_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(base_url, isolation_level="AUTOCOMMIT", pool_pre_ping=False)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def temporary_database(kind: str, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of ``kind`` ("sqlite" or "postgresql") for one test."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'evomerge-test.db'}"
    elif kind == "postgresql":
        with postgres_schema(require_postgres()) as url:
            yield url
    else:
        raise ValueError(f"unknown database kind {kind!r}: use 'sqlite' or 'postgresql'")
