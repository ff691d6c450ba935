"""The API and the real controller together: a study submitted over REST runs on Ray
workers to exactly its budget, and its trials, best trial and events are served."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import get_settings


def test_submitted_study_runs_to_completion(family, model_root, tmp_path, ray_local):
    base, (e0, e1) = family("llama")
    settings = get_settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'e2e.db'}",
                            model_roots=[str(model_root)], max_workers=2, lease_seconds=60)
    spec = {
        "name": "end to end",
        "sources": [str(e0), str(e1)],
        "base_model": str(base),
        "space": {"kind": "parameter", "method": "ties", "granularity": 1},
        "evaluation": {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}]},
        "optimizer": {"name": "optuna-cmaes", "population_size": 4},
        "budget": {"max_trials": 8},
        "parallelism": 2,
        "seed": 0,
    }
    with TestClient(create_app(settings)) as client:
        created = client.post("/studies", json=spec)
        assert created.status_code == 201, created.text
        study_id = created.json()["id"]
        deadline = time.time() + 180
        while True:
            study = client.get(f"/studies/{study_id}").json()
            if study["status"] in ("completed", "failed", "cancelled"):
                break
            assert time.time() < deadline, study
            time.sleep(0.5)
        assert study["status"] == "completed", study
        trials = client.get(f"/studies/{study_id}/trials", params={"limit": 100}).json()
        numbers = sorted(t["number"] for t in trials["items"])
        assert numbers == list(range(8))
        assert all(t["state"] == "complete" for t in trials["items"])
        best = client.get(f"/studies/{study_id}/best").json()
        assert best["fitness"] == max(t["fitness"] for t in trials["items"])
        assert best["recipe"]["merge_method"] == "ties"
