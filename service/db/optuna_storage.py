"""Optuna's storage in evomerge's database, so `optuna-dashboard <url>` shows our studies.

Optuna's tables (``studies``, ``trials``, ... and its ``alembic_version``) and ours
(``em_*``, ``evomerge_alembic_version``) never share a name; each side migrates only its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.db.engine import SQLITE_BUSY_TIMEOUT_S, JournaledSQLiteConnection, normalize_url, url_string

if TYPE_CHECKING:
    import optuna


def optuna_storage(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
    """An ``optuna.storages.RDBStorage`` on the database at ``url`` (``postgresql://`` means
    psycopg 3, as for our engine). ``kwargs`` go to ``RDBStorage``; Optuna creates its
    tables on first use. Imports optuna, so call it where Optuna is needed."""
    import optuna

    engine_kwargs = dict(kwargs.pop("engine_kwargs", None) or {})
    if normalize_url(url).get_backend_name() == "sqlite":
        # WAL + synchronous=NORMAL as on our own engine (service.db.engine): without it each of
        # Optuna's several commits per trial fsyncs
        connect_args = {"timeout": SQLITE_BUSY_TIMEOUT_S, "factory": JournaledSQLiteConnection,
                        **engine_kwargs.get("connect_args", {})}
        engine_kwargs["connect_args"] = connect_args
    else:
        engine_kwargs.setdefault("pool_pre_ping", True)
    return optuna.storages.RDBStorage(url_string(url), engine_kwargs=engine_kwargs, **kwargs)
