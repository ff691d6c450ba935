"""The demo flow (``evomerge demo``) with a reduced budget, against the real service
(``evomerge serve`` in its own process, local Ray, lm-eval on the zoo's tasks): it submits
the demo study over REST, downloads the best model through the API, scores it with
transformers, and the evolved merge beats every source model on the target task."""

from __future__ import annotations

import pytest

from service.demo import HELDOUT, TARGET, _score, run_demo


@pytest.mark.slow
def test_the_demo_flow_beats_every_source(tmp_path, monkeypatch):
    for var in ("EVOMERGE_URL", "EVOMERGE_TOKEN", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    lines: list[str] = []
    result = run_demo(data_dir=tmp_path / "data", trials=60, log=lines.append)
    printed = "\n".join(lines)
    assert "/#/studies/" + result["study"] in printed  # the dashboard's address is shown
    assert result["table"] in printed and "evolved merge" in result["table"]
    names = {b["name"]: b for b in result["baselines"]}
    assert {"base: v2-seed0/base", "source: v2-seed0/math", "source: v2-seed0/language", "uniform merge",
            "task arithmetic"} <= set(names)
    assert all(b["state"] == "complete" for b in names.values()), names
    evolved = result["evolved"]
    # what the downloaded model scores is what the service measured for that trial
    assert evolved[TARGET] == pytest.approx(_score(result["best"]["scores"], TARGET))
    assert evolved[HELDOUT] == pytest.approx(_score(result["best"]["metrics"]["heldout"]["scores"], TARGET))
    for name, b in names.items():
        if b["kind"] == "source":
            assert evolved[TARGET] > _score(b["scores"], TARGET), name
            assert evolved[HELDOUT] > _score(b["heldout_scores"], TARGET), name  # the objective's key
    assert (tmp_path / "data" / "demo-best-model" / "model.safetensors").exists()
