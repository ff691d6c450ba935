"""Alembic environment for evomerge's own tables (``em_*``), beside Optuna's.

Run from code by ``service.db.migrate`` (which passes a locked connection in
``config.attributes["connection"]``), or by the ``alembic`` command for development:

    alembic -c migrations/alembic.ini -x url=sqlite:///evomerge-data/evomerge.db revision -m "what changes"

Without ``-x url=...`` the URL comes from evomerge's settings (``EVOMERGE_DATABASE_URL``).
"""

from __future__ import annotations

from alembic import context

from service.db.engine import make_engine, url_string
from service.db.migrate import context_options, locked_connection
from service.db.models import Base

config = context.config


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        from service.settings import get_settings

        url = get_settings().database_url
    return url_string(url)


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, **context_options())
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True, **context_options())
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
else:
    engine = make_engine(_url())
    try:
        with locked_connection(engine) as conn:
            _run(conn)
    finally:
        engine.dispose()
