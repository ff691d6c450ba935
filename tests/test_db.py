"""The database layer on SQLite and PostgreSQL: models round-trip, constraints hold,
timestamps are UTC-aware, SQLite is set up for a concurrent API + controller."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError, StatementError

from service.db import (
    Artifact,
    ArtifactState,
    Event,
    Study,
    StudyStatus,
    Trial,
    TrialState,
    make_engine,
    normalize_url,
    redact_url,
    session_factory,
    upgrade,
    utcnow,
)
from service.db.testing import temporary_database

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    with temporary_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def engine(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def Session(engine):
    return session_factory(engine)


def make_study(session, **kw) -> Study:
    study = Study(name=kw.pop("name", "demo"), spec=kw.pop("spec", {"sources": ["a", "b"]}), **kw)
    session.add(study)
    session.flush()
    return study


def test_study_and_trials_round_trip(Session):
    spec = {"sources": [{"model": "zoo:math"}, {"model": "zoo:lang"}], "budget": {"max_trials": 8},
            "nested": {"list": [1, 2.5, None, "x"], "unicode": "算数"}}
    state = bytes(range(256)) * 4096  # 1 MiB of pycma pickle
    with Session.begin() as s:
        study = make_study(s, spec=spec, owner="alice", optuna_study_name="em-1", optimizer_state=state)
        sid = study.id
        s.add(Trial(study_id=sid, number=0, point_id="p0", params={"w": [0.1, 0.9]},
                    recipe={"merge_method": "ties"}, scores={"zoo_add": 0.5}, metrics={"acc": 0.5},
                    values=[0.5], fitness=0.5, state=TrialState.COMPLETE, timings={"eval_s": 1.5},
                    worker="w1", attempts=1))
        s.add(Trial(study_id=sid, number=1))
    with Session() as s:
        study = s.get(Study, sid)
        assert len(sid) == 12 and study.status is StudyStatus.QUEUED and study.status == "queued"
        assert study.spec == spec and study.optimizer_state == state and study.owner == "alice"
        assert (study.trials_done, study.trials_failed, study.elapsed_seconds) == (0, 0, 0.0)
        t0, t1 = study.trials
        assert t0.params == {"w": [0.1, 0.9]} and t0.values == [0.5] and t0.state is TrialState.COMPLETE
        assert t1.state is TrialState.PENDING and t1.attempts == 0
        # None is SQL NULL, not JSON null: "not set" is queryable with IS NULL
        assert s.scalar(select(func.count()).where(Trial.study_id == sid, Trial.scores.is_(None))) == 1
        raw = s.execute(text("SELECT status FROM em_studies WHERE id = :id"), {"id": sid}).scalar_one()
        assert raw == "queued"  # stored as its plain value, readable from SQL and other tools


def test_timestamps_are_timezone_aware_utc(Session):
    cet = timezone(timedelta(hours=1))
    with Session.begin() as s:
        study = make_study(s)
        sid = study.id
        s.add(Trial(study_id=sid, number=0, lease_expires_at=datetime(2030, 1, 1, 12, 0, tzinfo=cet)))
    with Session() as s:
        study = s.get(Study, sid)
        assert study.created_at.tzinfo is not None and study.created_at.utcoffset() == timedelta(0)
        assert abs(utcnow() - study.created_at) < timedelta(minutes=1)
        lease = s.scalars(select(Trial.lease_expires_at)).one()
        assert lease == datetime(2030, 1, 1, 11, 0, tzinfo=timezone.utc) and lease.utcoffset() == timedelta(0)
        # comparisons in SQL work the same on both databases
        expired = s.scalars(select(Trial).where(Trial.lease_expires_at < datetime(2030, 1, 1, 11, 30,
                                                                                  tzinfo=timezone.utc)))
        assert len(expired.all()) == 1


def test_naive_datetimes_are_refused(Session):
    with pytest.raises(StatementError, match="naive datetime"), Session.begin() as s:
        make_study(s, created_at=datetime(2030, 1, 1))


def test_updated_at_moves_on_update(Session):
    with Session.begin() as s:
        hour_ago = utcnow() - timedelta(hours=1)
        study = make_study(s, created_at=hour_ago, updated_at=hour_ago)
        sid, before = study.id, study.updated_at
    with Session.begin() as s:
        s.get(Study, sid).status = StudyStatus.RUNNING
    with Session() as s:
        assert s.get(Study, sid).updated_at > before + timedelta(minutes=59)


def test_unknown_status_is_refused(Session):
    with pytest.raises(StatementError, match="not among the defined enum values"), Session.begin() as s:
        make_study(s, status="bogus")


def test_trial_number_is_unique_per_study(Session):
    with Session.begin() as s:
        a, b = make_study(s), make_study(s)
        s.add_all([Trial(study_id=a.id, number=0), Trial(study_id=b.id, number=0)])
    with pytest.raises(IntegrityError), Session.begin() as s:
        s.add(Trial(study_id=a.id, number=0))


def test_foreign_keys_are_enforced_and_cascade(Session):
    with pytest.raises(IntegrityError), Session.begin() as s:
        s.add(Trial(study_id="no-such-study", number=0))
    with Session.begin() as s:
        study = make_study(s)
        sid = study.id
        s.add(Trial(study_id=sid, number=0))
        s.add(Artifact(study_id=sid, trial_number=0, kind="model", path="/x", sha256="0" * 64,
                       size_bytes=5 * 2**40))
        s.add(Event(study_id=sid, kind="study.created", data={"by": "alice"}))
        s.add(Event(study_id=None, kind="service.started"))
    with Session() as s:
        artifact = s.scalars(select(Artifact)).one()
        assert artifact.state is ArtifactState.PENDING and artifact.size_bytes == 5 * 2**40
    with Session.begin() as s:
        s.delete(s.get(Study, sid))
    with Session() as s:
        for model in (Trial, Artifact):
            assert s.scalar(select(func.count()).select_from(model)) == 0
        assert [e.kind for e in s.scalars(select(Event))] == ["service.started"]


def test_events_are_followed_by_id(Session):
    with Session.begin() as s:
        sid = make_study(s).id
        for i in range(5):
            s.add(Event(study_id=sid, kind="trial.finished", data={"number": i}))
    with Session() as s:
        events = s.scalars(select(Event).where(Event.study_id == sid).order_by(Event.id)).all()
        ids = [e.id for e in events]
        assert ids == sorted(ids) and len(set(ids)) == 5
        last = ids[2]
        newer = s.scalars(select(Event).where(Event.study_id == sid, Event.id > last).order_by(Event.id))
        assert [e.data["number"] for e in newer] == [3, 4]
    with Session.begin() as s:  # a deleted newest event's id is never handed out again
        s.delete(s.get(Event, ids[-1]))
    with Session.begin() as s:
        s.add(Event(study_id=sid, kind="x"))
        s.flush()
        assert s.scalars(select(func.max(Event.id))).one() > ids[-1]


def test_claiming_a_trial_is_won_once(Session):
    """The pattern the controller uses: a conditional UPDATE, from several threads at once."""
    with Session.begin() as s:
        sid = make_study(s).id
        s.add(Trial(study_id=sid, number=0))
    winners = []

    def claim(worker: str) -> None:
        with Session.begin() as s:
            done = s.execute(
                update(Trial)
                .where(Trial.study_id == sid, Trial.number == 0, Trial.state == TrialState.PENDING)
                .values(state=TrialState.RUNNING, worker=worker, started_at=utcnow(),
                        lease_expires_at=utcnow() + timedelta(minutes=10), attempts=Trial.attempts + 1)
            )
            if done.rowcount == 1:
                winners.append(worker)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    with Session() as s:
        trial = s.scalars(select(Trial)).one()
        assert trial.worker == winners[0] and trial.attempts == 1 and trial.state is TrialState.RUNNING


def test_sqlite_is_set_up_for_concurrency(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'deep' / 'er' / 'x.db'}")  # folders created
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    engine.dispose()


def test_in_memory_sqlite_is_one_database_for_all_threads():
    engine = make_engine("sqlite://")
    upgrade(engine)
    Session = session_factory(engine)

    def add():
        with Session.begin() as s:
            make_study(s)

    thread = threading.Thread(target=add)
    thread.start()
    thread.join()
    with Session() as s:
        assert s.scalar(select(func.count()).select_from(Study)) == 1


def test_urls():
    assert normalize_url("postgresql://u:p@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    assert normalize_url("postgresql+psycopg2://u@h/db").drivername == "postgresql+psycopg2"  # explicit wins
    assert redact_url("postgresql://u:secret@h/db") == "postgresql+psycopg://u:***@h/db"
    with pytest.raises(ValueError, match="not a database URL"):
        make_engine("not a url")
    with pytest.raises(ValueError, match="unsupported database 'mysql'"):
        make_engine("mysql://u@h/db")


def test_database_layer_imports_stay_light():
    code = (
        "import sys, service.settings, service.db, service.db.testing, service.cli;"
        "heavy = [m for m in ('torch', 'ray', 'lm_eval', 'transformers', 'optuna', 'alembic.command')"
        " if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
