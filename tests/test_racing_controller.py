"""Racing through the controller: pruned trials are recorded with their partial scores and told
to the optimizer as pruned; a raced study survives kill -9 of its controller. Tiny Llama
family, the ``noop`` evaluator (it races: the same fingerprint at every rung), SQLite."""

from __future__ import annotations

import optuna
import pytest

from service.controller import Controller
from service.db import StudyStatus, TrialState
from tests.test_controller import (
    add_study,
    db,
    events,
    kill_9_controller_when,
    optuna_trials,
    settings,
    spec,
    step_until,
    study_row,
    trials,
)

__all__ = ["db", "settings"]  # fixtures


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


SIZES = [10, 30, 90]


def raced(llama, trials: int, optimizer: str = "optuna-tpe", delay: float = 0.0) -> dict:
    data = spec(llama, trials=trials, delay=delay, optimizer=optimizer)
    data["evaluation"]["objectives"][0]["limit"] = 90
    data["fidelity"] = {"min_examples": 10, "eta": 3}
    return data


def check_raced_rows(url, sessions, sid, budget: int) -> None:
    rows = trials(sessions, sid)
    assert [t.number for t in rows] == list(range(budget))
    states = {t.state for t in rows}
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED} and TrialState.PRUNED in states
    pruned = [t for t in rows if t.state == TrialState.PRUNED]
    complete = [t for t in rows if t.state == TrialState.COMPLETE]
    for t in pruned:  # its partial score, from its last rung, never its fitness
        assert t.fitness is None and t.rung is not None and t.rung < len(SIZES) - 1
        last = t.metrics["rungs"][-1]
        assert last["rung"] == t.rung and last["examples"] == SIZES[t.rung] and t.values == last["values"]
        assert t.examples == SIZES[t.rung] < SIZES[-1]
    for t in complete:
        if t.cached:  # the same point again (a score cache hit): never raced, nothing spent
            continue
        assert t.rung == len(SIZES) - 1 and t.examples == SIZES[-1] and t.fitness == t.values[0]
    study = study_row(sessions, sid)
    assert study.trials_done == budget
    assert study.best_trial_number in {t.number for t in complete}
    assert len(events(sessions, sid, "trial_pruned")) == len(pruned)
    told = {t.number: t for t in optuna_trials(url, study)}
    assert not [t for t in told.values() if t.state == optuna.trial.TrialState.RUNNING]
    for t in rows:
        ot = told[int(t.point_id)]
        if t.state == TrialState.PRUNED:  # told as pruned, its partial value at its rung
            assert ot.state == optuna.trial.TrialState.PRUNED
            assert ot.intermediate_values == {t.rung: pytest.approx(t.values[0])}
        else:
            assert ot.state == optuna.trial.TrialState.COMPLETE and ot.value == pytest.approx(t.values[0])


def test_a_raced_study_prunes_and_records_partial_scores(llama, db, settings, ray_local):
    url, sessions = db
    sid = add_study(sessions, raced(llama, trials=14))
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    check_raced_rows(url, sessions, sid, 14)


def test_a_raced_study_survives_kill_9(llama, db, settings, ray_local, model_root):
    url, sessions = db
    budget = 14
    sid = add_study(sessions, raced(llama, trials=budget, delay=0.3))
    # generous: the subprocess starts its own workers on a busy machine
    kill_9_controller_when(db, sid, settings, model_root, ray_local, trials_done=5, deadline_s=180)
    before = {t.number: t.state for t in trials(sessions, sid)}
    assert len(before) < budget
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    check_raced_rows(url, sessions, sid, budget)
    after = {t.number: t.state for t in trials(sessions, sid)}
    assert all(after[n] == s for n, s in before.items() if s.finished)  # nothing finished changed
