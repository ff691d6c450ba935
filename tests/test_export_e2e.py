"""Export end to end: a study runs on Ray workers under the real controller, the best trial
is exported by a worker (the API process never loads weights), downloaded with
``evomerge download`` (resumable, checksum verified), and the folder loads with
transformers and gives the logits of the candidate that was scored. An export left
``running`` by a killed controller is rebuilt after a restart."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.cli import main
from service.db import Artifact, ArtifactState, Event, make_engine, session_factory
from tests import api_fixtures as fx

llama = fx.llama


def Server(settings) -> fx.LiveServer:
    return fx.LiveServer(create_app(settings, poll_seconds=0.05))


def wait_for(predicate, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_best_trial_exported_downloaded_and_identical(llama, tmp_path, model_root, ray_local, monkeypatch,
                                                      capsys):
    from service.api.client import Client

    for var in ("EVOMERGE_URL", "EVOMERGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    url_db = f"sqlite:///{tmp_path / 'e.db'}"
    settings = fx.make_settings(url_db, tmp_path, model_root, max_workers=2, lease_seconds=60)
    spec = fx.spec_data(llama, space={"kind": "parameter", "method": "ties", "granularity": 2},
                        optimizer={"name": "optuna-cmaes", "population_size": 4}, budget={"max_trials": 4},
                        parallelism=2)
    with Server(settings) as url, Client(url) as client:
        study = client.submit(json.dumps(spec).encode(), "application/json")
        sid = study["id"]
        wait_for(lambda: client.study(sid)["status"] in ("completed", "failed"))
        assert client.study(sid)["status"] == "completed"
        best = client.best(sid)
        out = tmp_path / "downloaded"
        code = main(["download", sid, str(out), "--url", url, "-q"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "verified" in printed.out
        exports = client.request("GET", f"/studies/{sid}/exports")
        assert len(exports) == 1 and exports[0]["state"] == "ready"
        assert exports[0]["trial_number"] == best["number"]
        again = client.export(sid)  # asking again: the same export, nothing rebuilt
        assert again["id"] == exports[0]["id"]
        # a second download of the same export into another folder resumes from a partial file
        part = tmp_path / "again.tar.part"
        archive = client._http.get(exports[0]["archive_url"]).content
        part.write_bytes(archive[: len(archive) // 3])
        assert main(["download", sid, str(tmp_path / "again"), "--url", url, "-q"]) == 0
        assert not part.exists()

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "README.md", "evomerge_recipe.yaml", "mergekit_config.yml", "SHA256SUMS"} <= names
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert sid in card and "ties" in card

    from transformers import AutoModelForCausalLM

    from search_spaces.recipe import Recipe
    from workers.trial import TrialRunner

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    base, (e0, e1) = llama
    runner = TrialRunner({"sources": [str(base), str(e0), str(e1)], "base_model": str(base),
                          "evaluation": spec["evaluation"]})
    scored = runner.builder.build(Recipe.model_validate(best["recipe"]))
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, scored(ids).logits)

    engine = make_engine(url_db)
    with session_factory(engine)() as s:
        kinds = [e.kind for e in s.query(Event).filter_by(study_id=sid).order_by(Event.id)]
    engine.dispose()
    assert kinds.count("export_requested") == 1 and kinds.count("export_ready") == 1
    assert kinds.index("export_started") < kinds.index("export_ready")


@pytest.mark.slow
def test_an_export_left_running_by_a_dead_controller_is_rebuilt(llama, tmp_path, model_root, ray_local):
    from service.api.client import Client

    url_db = f"sqlite:///{tmp_path / 'r.db'}"
    settings = fx.make_settings(url_db, tmp_path, model_root, max_workers=2, lease_seconds=60)
    spec = fx.spec_data(llama, optimizer={"name": "random"}, budget={"max_trials": 2})
    with Server(settings) as url, Client(url) as client:
        sid = client.submit(json.dumps(spec).encode(), "application/json")["id"]
        wait_for(lambda: client.study(sid)["status"] == "completed")
    # what a kill -9 mid-export leaves: a `running` row and a staging folder, nothing servable
    engine = make_engine(url_db)
    sessions = session_factory(engine)
    staging = settings.data_dir / "exports" / ".staging" / "half-written"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"\0" * 100)
    with sessions.begin() as s:
        s.add(Artifact(study_id=sid, trial_number=0, kind="export", path="", state=ArtifactState.RUNNING,
                       progress=0.4))
    with Server(settings) as url, Client(url) as client:
        export = client.request("GET", f"/studies/{sid}/exports")[0]
        assert export["state"] in ("pending", "running", "ready")
        r = client._http.get(f"/studies/{sid}/exports/{export['id']}/archive")
        assert r.status_code in (200, 409)  # never a half-written folder
        done = wait_for(lambda: (e := client.export_state(sid, export["id"]))["state"] == "ready" and e)
        r = client._http.get(done["archive_url"])
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == done["sha256"]
    engine.dispose()
