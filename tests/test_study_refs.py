"""PS then DFS: a layer-stacking study over the best merge a finished parameter-space study
found. The API checks the reference at submission; the controller exports that model,
then runs the new study with every recipe and worker naming the export's folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.controller import Controller
from service.db import Artifact, ArtifactState, Baseline, StudyStatus, TrialState
from tests import api_fixtures as fx
from tests.test_controller import add_study, db, settings, spec, step_until, study_row, trials

__all__ = ["db", "settings"]  # fixtures
api, db_url = fx.api, fx.db_url


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


def stacking_on(study_id: str, llama, **changes) -> dict:
    _, (e0, _) = llama
    return spec(llama, trials=3, name="dfs over the best", base_model=None, sources=[
        {"study": study_id, "trial": "best"}, str(e0)], space={"kind": "stacking", "repeats": 1}, **changes)


def test_a_stacking_study_over_another_studys_best(llama, db, settings, ray_local):
    _, sessions = db
    ps = add_study(sessions, spec(llama, trials=4))
    controller = Controller(settings, sessions)
    try:
        step_until(controller, lambda: study_row(sessions, ps).status == StudyStatus.COMPLETED)
        dfs = add_study(sessions, stacking_on(ps, llama))
        step_until(controller, lambda: study_row(sessions, dfs).status in (StudyStatus.COMPLETED,
                                                                         StudyStatus.FAILED), timeout=120)
    finally:
        controller.stop()
    assert study_row(sessions, dfs).status == StudyStatus.COMPLETED, study_row(sessions, dfs).error
    best = study_row(sessions, ps).best_trial_number
    with sessions() as s:
        export = s.scalars(select(Artifact).where(Artifact.study_id == ps)).one()
        assert export.state == ArtifactState.READY and export.trial_number == best
        refs = list(s.scalars(select(Baseline).where(Baseline.study_id == dfs)))
    rows = trials(sessions, dfs)
    assert [t.number for t in rows] == [0, 1, 2] and all(t.state == TrialState.COMPLETE for t in rows)
    models = {src["model"] for t in rows for piece in t.recipe["slices"] for src in piece["sources"]}
    assert export.path in models and not any(m.startswith("study:") for m in models)
    assert all(b.state == TrialState.COMPLETE for b in refs), [(b.name, b.error) for b in refs]
    assert any(f"study:{ps}/best" in b.name for b in refs)  # named as the spec names it


def test_the_api_checks_a_study_reference_at_submission(api, llama):
    done = api.post("/studies", json=fx.spec_data(llama)).json()["id"]
    api.ctl.add_trial(done, 0, 0.5)
    with api.ctl.sessions.begin() as s:
        from service.db import Trial

        s.query(Trial).filter_by(study_id=done).one().recipe = {"merge_method": "linear"}
    _, (e0, _) = llama
    body = fx.spec_data(llama, base_model=None, sources=[{"study": done, "trial": "best"}, str(e0)],
                        space={"kind": "stacking", "repeats": 1})
    r = api.post("/studies", json=body)
    assert r.status_code == 422 and "queued" in r.text  # its best is known once it has completed
    api.ctl.set_status(done, StudyStatus.COMPLETED)
    r = api.post("/studies", json=body)
    assert r.status_code == 201, r.text
    body["sources"][0] = {"study": "nope", "trial": "best"}
    r = api.post("/studies", json=body)
    assert r.status_code == 422 and "there is no study 'nope'" in r.text
    body["sources"][0] = {"study": done, "trial": 7}
    assert "trial 7" in api.post("/studies", json=body).text
