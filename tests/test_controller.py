"""The study controller: budgets, pause / resume / cancel, a kill -9 and a restart, and
several studies sharing the workers. Tiny Llama family, the ``noop`` evaluator, SQLite."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from service.controller import Controller
from service.db import Event, Study, StudyStatus, Trial, TrialState, make_engine, session_factory, upgrade
from service.settings import get_settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'evomerge.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield url, session_factory(engine)
    engine.dispose()


@pytest.fixture
def settings(db, tmp_path, model_root):
    return get_settings(data_dir=tmp_path, database_url=db[0], model_roots=[model_root], max_workers=2,
                        lease_seconds=60)


def spec(llama, *, trials: int, delay: float = 0.0, optimizer: str = "optuna-cmaes", **changes) -> dict:
    base, (e0, e1) = llama
    data = {
        "name": "controller test",
        "sources": [str(e0), str(e1)],
        "base_model": str(base),
        "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
        "evaluation": {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}],
                       "options": {"delay_s": delay}},
        "optimizer": {"name": optimizer, "population_size": 4},
        "budget": {"max_trials": trials},
        "parallelism": 2,
        "seed": 0,
    }
    data.update(changes)
    return data


def add_study(sessions, data: dict) -> str:
    with sessions.begin() as s:
        study = Study(name=data["name"], spec=data)
        s.add(study)
        s.flush()
        return study.id


def set_status(sessions, study_id: str, status: StudyStatus) -> None:
    """What the REST API does for pause / resume / cancel."""
    with sessions.begin() as s:
        s.get(Study, study_id).status = status


def study_row(sessions, study_id: str) -> Study:
    with sessions() as s:
        return s.get(Study, study_id)


def trials(sessions, study_id: str) -> list[Trial]:
    with sessions() as s:
        return list(s.scalars(select(Trial).where(Trial.study_id == study_id).order_by(Trial.number)))


def events(sessions, study_id: str, kind: str) -> list[Event]:
    with sessions() as s:
        return list(s.scalars(select(Event).where(Event.study_id == study_id, Event.kind == kind)
                              .order_by(Event.id)))


def step_until(controller: Controller, done: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out waiting for the controller"
        if not controller.step():
            time.sleep(0.05)


def optuna_trials(url: str, study: Study):
    import optuna

    from service.db import optuna_storage

    return optuna.load_study(study_name=study.optuna_study_name, storage=optuna_storage(url)).get_trials()


def run_to_completion(settings, sessions, sid: str) -> None:
    """A controller in this process, stepped until the study is completed, then stopped."""
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()


def kill_9_controller_when(db, sid: str, settings, model_root, ray_local, *, trials_done: int,
                           deadline_s: float = 60.0) -> None:
    """Run the controller as its own process until the study has ``trials_done`` trials done,
    then kill -9 it."""
    url, sessions = db
    env = {**os.environ, "EVOMERGE_MODEL_ROOTS": str(model_root), "EVOMERGE_MAX_WORKERS": "2",
           "EVOMERGE_RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "EVOMERGE_DATA_DIR": str(settings.data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "service.controller", "--database-url", url,
                             "--exit-when-idle"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + deadline_s
        while study_row(sessions, sid).trials_done < trials_done:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the controller subprocess made no progress"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_a_study_runs_to_its_budget_and_rescores_the_best(llama, db, settings, ray_local):
    import optuna

    url, sessions = db
    sid = add_study(sessions, spec(llama, trials=12, heldout={"top_k": 2}))
    run_to_completion(settings, sessions, sid)
    study = study_row(sessions, sid)
    rows = trials(sessions, sid)
    assert [t.number for t in rows] == list(range(12))
    assert all(t.state == TrialState.COMPLETE for t in rows)
    assert study.trials_done == 12 and study.trials_failed == 0
    best = max(rows, key=lambda t: t.fitness)
    assert study.best_trial_number == best.number and study.best_value == pytest.approx(best.fitness)
    finished = [t for t in optuna_trials(url, study) if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 12
    heldout = [t for t in rows if (t.metrics or {}).get("heldout")]
    assert len(heldout) == 2 and best in heldout
    assert heldout[0].metrics["heldout"]["state"] == "complete"
    assert "fingerprint/mean" in heldout[0].metrics["heldout"]["scores"]
    assert len(events(sessions, sid, "study_completed")) == 1
    assert len(events(sessions, sid, "trial_complete")) == 12


def test_kill_9_and_restart_continue_the_study(llama, db, settings, ray_local, model_root):
    import optuna

    url, sessions = db
    budget = 16
    sid = add_study(sessions, spec(llama, trials=budget, delay=0.3))
    kill_9_controller_when(db, sid, settings, model_root, ray_local, trials_done=6)
    before = trials(sessions, sid)
    assert 6 <= len(before) < budget
    study = study_row(sessions, sid)
    gen = {t.number: t.system_attrs.get("cma:generation") for t in optuna_trials(url, study)}
    gen_before = max(g for g in gen.values() if g is not None)

    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    rows = trials(sessions, sid)
    assert [t.number for t in rows] == list(range(budget))  # numbers 0..N-1, each once
    assert all(t.state == TrialState.COMPLETE for t in rows), [(t.number, t.failure_reason) for t in rows]
    assert study_row(sessions, sid).trials_done == budget
    assert len(events(sessions, sid, "trial_complete")) == budget  # none counted twice
    retried = {t.number for t in rows if t.attempts == 2}
    assert retried and retried == {t.number for t in before if t.state == TrialState.RUNNING}

    otrials = {t.number: t for t in optuna_trials(url, study_row(sessions, sid))}
    assert not [t for t in otrials.values() if t.state == optuna.trial.TrialState.RUNNING]
    complete = [t for t in otrials.values() if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == budget
    for t in rows:  # a retried trial re-ran its own point, told once
        assert otrials[int(t.point_id)].params == pytest.approx(t.params)
        assert otrials[int(t.point_id)].values == pytest.approx(t.values)
    # the CMA-ES generation continued rather than restarting
    # (the space's start, enqueued as the first trial, was not sampled by CMA-ES: no generation)
    gens = [otrials[int(t.point_id)].system_attrs.get("cma:generation") for t in rows]
    assert gens[0] is None and None not in gens[1:]
    assert gens[1:] == sorted(gens[1:]) and gens[-1] > gen_before >= 1


def test_results_committed_but_not_told_are_told_after_a_restart(llama, db, settings, ray_local, monkeypatch):
    """The crash windows around Optuna's separate connection: our row committed but the tell
    lost, and a point asked from Optuna but never recorded by us."""
    import optuna

    from service.controller import OptimizerStore

    url, sessions = db
    sid = add_study(sessions, spec(llama, trials=6))
    controller = Controller(settings, sessions)
    try:
        # each tell is "lost" right after its commit
        monkeypatch.setattr(OptimizerStore, "tell", lambda *args, **kwargs: None)
        step_until(controller, lambda: study_row(sessions, sid).trials_done >= 3)
        set_status(sessions, sid, StudyStatus.PAUSED)
        step_until(controller, lambda: not controller.runtimes[sid].in_flight)
        study = study_row(sessions, sid)
        untold = [t for t in optuna_trials(url, study) if t.state == optuna.trial.TrialState.RUNNING]
        assert len(untold) >= 3
        orphan = optuna.load_study(study_name=study.optuna_study_name, storage=url).ask().number

        # a restart, keeping the (warm) workers: the runtime is rebuilt from the database
        monkeypatch.undo()
        controller.runtimes.clear()
        set_status(sessions, sid, StudyStatus.RUNNING)
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    rows = trials(sessions, sid)
    assert [t.number for t in rows] == list(range(6)) and all(t.state == TrialState.COMPLETE for t in rows)
    otrials = {t.number: t for t in optuna_trials(url, study)}
    assert otrials[orphan].state == optuna.trial.TrialState.FAIL
    assert [t.number for t in otrials.values() if t.state == optuna.trial.TrialState.COMPLETE] == sorted(
        int(t.point_id) for t in rows)
    assert not [t for t in otrials.values() if t.state == optuna.trial.TrialState.RUNNING]


def test_two_studies_share_the_workers_and_pause_resume_cancel(llama, db, settings, ray_local):
    _, sessions = db
    a = add_study(sessions, spec(llama, trials=10, delay=0.1))
    b = add_study(sessions, spec(llama, trials=60, delay=0.1, optimizer="cma", seed=1))
    # no score cache: b's baselines would be a's cache hits, and b would start its trials first
    controller = Controller(settings.model_copy(update={"score_cache": False}), sessions)

    def done(sid: str) -> int:
        return study_row(sessions, sid).trials_done

    def running(sid: str) -> bool:
        return any(t.state == TrialState.RUNNING for t in trials(sessions, sid))

    try:
        step_until(controller, lambda: done(a) >= 2 and done(b) >= 2)  # both progress at once
        assert len(controller.pools) == 1  # the same worker spec: one shared pool

        set_status(sessions, b, StudyStatus.PAUSED)  # what the API writes
        step_until(controller, lambda: not running(b))
        paused_at = len(trials(sessions, b))
        assert all(t.state == TrialState.COMPLETE for t in trials(sessions, b))  # running ones recorded
        step_until(controller, lambda: study_row(sessions, a).status == StudyStatus.COMPLETED)
        assert len(trials(sessions, b)) == paused_at  # nothing new while paused

        set_status(sessions, b, StudyStatus.RUNNING)
        step_until(controller, lambda: done(b) >= paused_at + 2)

        set_status(sessions, b, StudyStatus.CANCELLED)
        controller.step()
        after_cancel = len(trials(sessions, b))
        for _ in range(10):
            controller.step()
            time.sleep(0.05)
        assert len(trials(sessions, b)) == after_cancel and not running(b)
        assert study_row(sessions, b).status == StudyStatus.CANCELLED and b not in controller.runtimes
        assert len(events(sessions, b, "study_cancelled")) == 1
    finally:
        controller.stop()
    rows = trials(sessions, a)
    assert [t.number for t in rows] == list(range(10)) and all(t.state == TrialState.COMPLETE for t in rows)
    rows = trials(sessions, b)
    assert [t.number for t in rows] == list(range(len(rows)))
    assert {t.state for t in rows} <= {TrialState.COMPLETE, TrialState.CANCELLED}
    assert study_row(sessions, b).optimizer_state  # pycma's state is saved
    with sessions() as s:
        order = [e.study_id for e in s.scalars(select(Event).where(Event.kind == "trial_complete")
                                               .order_by(Event.id))]
    assert {a, b} <= set(order[:4])  # round-robin: neither waited for the other


def test_a_cancel_written_while_the_controller_opens_the_study_is_kept(llama, db, settings, monkeypatch):
    """The API cancels a queued study while the controller is opening it, just before the
    controller marks it running: the cancel wins, the study never starts. (The controller
    used to read the row, then write its status back as running over the cancel.)"""
    from sqlalchemy.orm import Session
    from sqlalchemy.sql.dml import Update

    _, sessions = db
    sid = add_study(sessions, spec(llama, trials=4))
    original_get, original_execute = Session.get, Session.execute
    seen = {"reads": 0, "cancelled": False}

    def cancel_once() -> None:
        if not seen["cancelled"]:
            seen["cancelled"] = True
            set_status(sessions, sid, StudyStatus.CANCELLED)  # the API's write, from its own session

    def get(self, entity, ident, *args, **kwargs):
        row = original_get(self, entity, ident, *args, **kwargs)
        if entity is Study and ident == sid and not seen["cancelled"]:
            seen["reads"] += 1
            if seen["reads"] == 2:  # read again to be written back: the API cancels in between
                cancel_once()
        return row

    def execute(self, statement, *args, **kwargs):
        if isinstance(statement, Update) and statement.table.name == Study.__tablename__:
            cancel_once()  # the controller's first write to the row: the API cancels just before
        return original_execute(self, statement, *args, **kwargs)

    monkeypatch.setattr(Session, "get", get)
    monkeypatch.setattr(Session, "execute", execute)
    controller = Controller(settings, sessions)
    try:
        controller._open(sid)
    finally:
        controller.stop()
    monkeypatch.undo()
    assert seen["cancelled"]
    assert study_row(sessions, sid).status == StudyStatus.CANCELLED
    assert events(sessions, sid, "study_started") == []
