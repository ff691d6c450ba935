"""The controller beyond the trial budget: a wall-clock budget (paused time excluded), a
multi-objective study, and the whole loop on PostgreSQL as well as SQLite."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.controller import Controller
from service.db import StudyStatus, TrialState, make_engine, session_factory, upgrade
from service.db.testing import temporary_database
from tests.test_controller import add_study, set_status, settings, spec, step_until, study_row, trials

__all__ = ["settings"]  # a fixture (over this module's db)


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    with temporary_database(request.param, tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        yield url, session_factory(engine)
        engine.dispose()


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)  # the clock is database-agnostic
def test_a_time_budget_ends_the_study_and_paused_time_does_not_count(llama, db, settings, ray_local):
    _, sessions = db
    budget_s, delay, pause_s = 8.0, 0.2, 3.0
    sid = add_study(sessions, spec(llama, trials=0, delay=delay, budget={"max_seconds": budget_s}))
    controller = Controller(settings, sessions)
    submitted = time.monotonic()
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.RUNNING)
        set_status(sessions, sid, StudyStatus.PAUSED)
        step_until(controller, lambda: not controller.runtimes[sid].in_flight)
        paused_at = study_row(sessions, sid).elapsed_seconds
        assert paused_at < budget_s / 2
        pause_began = time.monotonic()
        while time.monotonic() - pause_began < pause_s:
            controller.step()
            time.sleep(0.05)
        assert study_row(sessions, sid).status == StudyStatus.PAUSED
        assert study_row(sessions, sid).elapsed_seconds == pytest.approx(paused_at, abs=0.3)
        set_status(sessions, sid, StudyStatus.RUNNING)
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED, timeout=60)
        wall = time.monotonic() - submitted
    finally:
        controller.stop()
    study = study_row(sessions, sid)
    rows = trials(sessions, sid)
    assert budget_s <= study.elapsed_seconds < budget_s + 10 * delay + 2  # nothing new after the budget
    assert wall >= budget_s + pause_s  # the pause was not counted
    assert len(rows) >= 3 and all(t.state == TrialState.COMPLETE for t in rows)
    assert [t.number for t in rows] == list(range(len(rows)))
    assert study.trials_done == len(rows)


def test_a_multi_objective_study_runs_and_keeps_every_value(llama, db, settings, ray_local):
    _, sessions = db
    data = spec(llama, trials=8, optimizer="nsga2", multi_objective=True, heldout={"top_k": 2})
    data["evaluation"]["objectives"] = [{"task": "fingerprint", "metric": "mean"},
                                        {"task": "fingerprint", "metric": "mean", "name": "again"}]
    sid = add_study(sessions, data)
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    study = study_row(sessions, sid)
    rows = trials(sessions, sid)
    assert study.error is None, study.error
    assert [t.number for t in rows] == list(range(8))
    assert all(t.state == TrialState.COMPLETE and t.fitness is None and len(t.values) == 2 for t in rows)
    assert study.best_value is None and study.best_trial_number is None  # a front, not one best
    from service.pareto import pareto_front

    front = pareto_front([(t.number, t.values) for t in rows])
    rescored = [t.number for t in rows if (t.metrics or {}).get("heldout")]
    assert rescored == front[:2]  # k trials of the Pareto front are re-scored on the held-out split
    assert all(len(t.metrics["heldout"]["values"]) == 2 for t in rows if t.number in rescored)
    assert study.trials_done == 8
