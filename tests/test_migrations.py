"""Migrations on SQLite and PostgreSQL: empty → head → base, models == migrated schema,
Optuna's storage side by side in the same database, concurrent start-ups."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import inspect, text

from service.cli import main
from service.db import OPTUNA_TABLES, OUR_TABLES, make_engine, url_string
from service.db import migrate as mig
from service.db.testing import temporary_database


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    with temporary_database(request.param, tmp_path) as url:
        yield url


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_migrations_folder_is_found_and_linear():
    folder = mig.migrations_dir()
    assert (folder / "env.py").is_file()
    revs = mig.revisions()
    assert revs[0] == "0001" and revs[-1] == mig.head()


def test_upgrade_from_empty_to_head_and_down_to_base(db_url):
    assert mig.current(db_url) is None
    assert mig.upgrade(db_url) == mig.head()
    assert tables(db_url) == OUR_TABLES | {mig.VERSION_TABLE}
    assert mig.schema_differences(db_url) == []
    assert mig.upgrade(db_url) == mig.head()  # idempotent

    assert mig.downgrade(db_url, "base") is None
    assert tables(db_url) & OUR_TABLES == set()
    assert mig.current(db_url) is None
    assert mig.upgrade(db_url) == mig.head()  # and up again
    assert mig.schema_differences(db_url) == []


def test_every_revision_steps_up_and_down(db_url):
    """Each revision's downgrade undoes its upgrade (matters once there are several)."""
    previous = None
    for rev in mig.revisions():
        assert mig.upgrade(db_url, rev) == rev
        assert mig.downgrade(db_url, "-1") == previous
        assert mig.upgrade(db_url, rev) == rev
        previous = rev
    assert mig.schema_differences(db_url) == []


def test_schema_comparison_sees_a_difference(db_url):
    """The models-vs-schema check is not vacuous: a missing index (and, where the database
    can alter a column, a changed type) is reported."""
    mig.upgrade(db_url)
    engine = make_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_em_trials_study_id_state"))
        if engine.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE em_studies ALTER COLUMN created_at TYPE timestamp"))
    engine.dispose()
    diffs = [d[0] if isinstance(d, tuple) else d[0][0] for d in mig.schema_differences(db_url)]
    expected = ["add_index"] + (["modify_type"] if db_url.startswith("postgresql") else [])
    assert sorted(diffs) == expected


def test_optuna_storage_lives_beside_ours(db_url):
    optuna = pytest.importorskip("optuna")
    from service.db.optuna_storage import optuna_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna first (its own tables and alembic_version), then ours on top.
    storage = optuna_storage(db_url)
    study = optuna.create_study(study_name="em-abc", storage=storage, direction="maximize")
    trial = study.ask({"w": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(trial, 0.5)
    assert mig.upgrade(db_url) == mig.head()
    names = tables(db_url)
    assert OUR_TABLES <= names and {"studies", "trials", "alembic_version"} <= names
    assert mig.schema_differences(db_url) == []  # Optuna's tables are ignored, not "to drop"

    # Optuna keeps working with our tables present, through a plain URL too.
    study = optuna.load_study(study_name="em-abc", storage=url_string(db_url))
    study.tell(study.ask({"w": optuna.distributions.FloatDistribution(0, 1)}), 0.75)
    assert study.best_value == 0.75 and len(study.trials) == 2

    # Our downgrade leaves every Optuna table and row alone.
    assert mig.downgrade(db_url, "base") is None
    optuna_present = tables(db_url) & OPTUNA_TABLES
    assert {"studies", "trials", "trial_values", "version_info", "alembic_version"} <= optuna_present
    assert len(optuna.load_study(study_name="em-abc", storage=storage).trials) == 2

    # And ours comes back over an existing Optuna storage.
    assert mig.upgrade(db_url) == mig.head()
    assert len(optuna.load_study(study_name="em-abc", storage=storage).trials) == 2
    storage.engine.dispose()


def test_concurrent_upgrades_migrate_once(db_url):
    """Several processes starting together (API replicas, a migrate step) do not collide."""
    results, errors = [], []

    def run():
        try:
            results.append(mig.upgrade(db_url))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [mig.head()] * 3
    assert mig.schema_differences(db_url) == []


def test_unknown_revision_is_explained(db_url):
    with pytest.raises(mig.MigrationError, match="Known revisions: 0001"):
        mig.upgrade(db_url, "9999")


def test_cli_migrate(db_url, capsys):
    assert main(["migrate", "--database-url", db_url]) == 0
    assert f"empty -> {mig.head()}" in capsys.readouterr().out
    assert main(["migrate", "--database-url", db_url]) == 0
    assert "already at" in capsys.readouterr().out
    assert main(["migrate", "--database-url", db_url, "--downgrade", "--revision", "base"]) == 0
    assert tables(db_url) & OUR_TABLES == set()


def test_cli_migrate_uses_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EVOMERGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("EVOMERGE_DATABASE_URL", raising=False)
    assert main(["migrate"]) == 0
    assert (tmp_path / "data" / "evomerge.db").is_file()
    assert mig.current(f"sqlite:///{tmp_path / 'data' / 'evomerge.db'}") == mig.head()


def test_cli_migrate_reports_unreachable_database(capsys):
    url = "postgresql://someone:hunter2@127.0.0.1:1/nowhere"
    assert main(["migrate", "--database-url", url]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "hunter2" not in err and "Traceback" not in err


def test_alembic_command_line_for_developers(tmp_path):
    """`alembic -c migrations/alembic.ini -x url=... upgrade head` works (env.py's own engine)."""
    from alembic.config import main as alembic_main

    url = f"sqlite:///{tmp_path / 'dev.db'}"
    ini = mig.migrations_dir() / "alembic.ini"
    alembic_main(argv=["-c", str(ini), "-x", f"url={url}", "upgrade", "head"])
    assert mig.current(url) == mig.head()
    alembic_main(argv=["-c", str(ini), "-x", f"url={url}", "downgrade", "base"])
    assert mig.current(url) is None
