"""Baselines: each model alone, the uniform merge and plain task arithmetic are scored by
the study's workers (and on the held-out split at the end), never counted as trials and
never told to the optimizer; a baseline that cannot be built is failed with its reason."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.controller import Controller
from service.db import Baseline, StudyStatus, TrialState
from tests.test_controller import add_study, db, optuna_trials, settings, spec, step_until, study_row, trials

__all__ = ["db", "settings"]  # fixtures


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


def baselines(sessions, study_id: str) -> list[Baseline]:
    with sessions() as s:
        return list(s.scalars(select(Baseline).where(Baseline.study_id == study_id).order_by(Baseline.id)))


def test_baselines_are_scored_beside_the_search(llama, db, settings, ray_local):
    url, sessions = db
    sid = add_study(sessions, spec(llama, trials=4, heldout={"top_k": 1}))
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    rows = baselines(sessions, sid)
    base, (e0, e1) = llama
    assert [(b.kind, b.name) for b in rows] == [
        ("source", f"base: {base}"), ("source", f"source: {e0}"), ("source", f"source: {e1}"),
        ("uniform", "uniform merge"), ("task_arithmetic", "task arithmetic")]
    assert all(b.state == TrialState.COMPLETE for b in rows), [(b.name, b.error) for b in rows]
    assert all(b.scores and "fingerprint/mean" in b.scores and b.fitness is not None for b in rows)
    assert all(b.heldout_scores and "fingerprint/mean" in b.heldout_scores for b in rows)
    # distinct models score differently (the noop evaluator fingerprints the weights)
    assert len({b.fitness for b in rows}) == len(rows)
    assert [t.number for t in trials(sessions, sid)] == [0, 1, 2, 3]  # not trials
    assert study_row(sessions, sid).trials_done == 4
    assert len(optuna_trials(url, study_row(sessions, sid))) == 4  # never told


def test_a_baseline_that_cannot_be_built_fails_with_its_reason(llama, db, settings, ray_local):
    _, sessions = db
    _, (e0, _) = llama
    sid = add_study(sessions, spec(llama, trials=2))
    good = {"merge_method": "linear", "models": [{"model": str(e0), "parameters": {"weight": 1}}]}
    bad = {"merge_method": "linear", "models": [{"model": "/nowhere", "parameters": {"weight": 1}}]}
    with sessions.begin() as s:  # rows that exist are kept: the controller scores them as they are
        s.add_all([Baseline(study_id=sid, name="good", kind="source", recipe=good, state=TrialState.PENDING),
                   Baseline(study_id=sid, name="bad", kind="uniform", recipe=bad, state=TrialState.PENDING)])
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, sid).status == StudyStatus.COMPLETED)
    finally:
        controller.stop()
    rows = {b.name: b for b in baselines(sessions, sid)}
    assert set(rows) == {"good", "bad"}
    assert rows["good"].state == TrialState.COMPLETE
    assert rows["bad"].state == TrialState.FAILED and "/nowhere" in rows["bad"].error
