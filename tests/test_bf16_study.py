"""A study over bf16 sources through the service: the plan says a bf16 candidate and a
tier, Ray workers build bf16 candidates in memory, and the exported model is bf16 and
computes exactly what the scored candidate computed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.cli import main
from tests import api_fixtures as fx


@pytest.mark.slow
def test_a_bf16_study_runs_exports_and_downloads(family, tmp_path, model_root, ray_local, monkeypatch,
                                                 capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from search_spaces.recipe import Recipe
    from service.api.client import Client
    from workers.trial import TrialRunner

    for var in ("EVOMERGE_URL", "EVOMERGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    bf16 = family("llama", dtype=torch.bfloat16)
    settings = fx.make_settings(f"sqlite:///{tmp_path / 'b.db'}", tmp_path, model_root, max_workers=2,
                                lease_seconds=60)
    spec = fx.spec_data(bf16, space={"kind": "parameter", "method": "ties", "granularity": 2},
                        optimizer={"name": "random"}, budget={"max_trials": 3}, parallelism=2)
    with fx.LiveServer(create_app(settings, poll_seconds=0.05)) as url, Client(url) as client:
        study = client.submit(json.dumps(spec).encode(), "application/json")
        sid = study["id"]
        plan = study["memory_plan"]
        assert plan["candidate_dtype"] == "bfloat16" and plan["tier"] == "resident"
        deadline = time.monotonic() + 240
        while client.study(sid)["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, "the study did not finish"
            time.sleep(0.2)
        assert client.study(sid)["status"] == "completed"
        trials = client.request("GET", f"/studies/{sid}/trials")
        assert [t["state"] for t in trials["items"]].count("complete") == 3, trials
        best = client.best(sid)
        out = tmp_path / "downloaded"
        assert main(["download", sid, str(out), "--url", url, "-q"]) == 0, capsys.readouterr().err

    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys()} == {torch.bfloat16}
    base, experts = bf16
    runner = TrialRunner({"sources": [str(base), *map(str, experts)], "base_model": str(base),
                          "evaluation": spec["evaluation"]})
    scored = runner.builder.build(Recipe.model_validate(best["recipe"]))
    assert {p.dtype for p in scored.parameters()} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, scored(ids).logits)
