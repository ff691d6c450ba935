"""The demo zoo: deterministic, cached, loadable offline, and its sources score as the
design says (each expert masters its own skill; no source can do the target)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from workers.zoo import skills, tasks
from workers.zoo.build import build_zoo, load


def test_shipped_task_files_are_current():
    for fname, content in tasks.render().items():
        path = tasks.TASK_DIR / fname
        assert path.exists(), f"{path} is missing: run python -m workers.zoo.tasks"
        assert path.read_text() == content, f"{path} is stale: run python -m workers.zoo.tasks"


def test_evaluation_operands_never_appear_in_training():
    from workers.zoo.recipe import stages

    held = skills.excluded_pairs()
    splits = skills.evaluation_splits()
    target_pairs = {skills.operands(p) for p, _ in splits["xl_add"]}
    heldout_pairs = {skills.operands(p) for p, _ in splits["xl_add_heldout"]}
    assert not target_pairs & heldout_pairs
    assert len(target_pairs) == len(heldout_pairs) == skills.EVAL_SIZE
    rng = random.Random(0)
    for stage in stages().values():
        makers = [m for _, m in stage.mixture]
        weights = [w for w, _ in stage.mixture]
        for _ in range(20_000):
            prompt, _ = rng.choices(makers, weights)[0](rng)
            if ("+" in prompt or "p" in prompt) and len(prompt) > 4:
                assert skills.operands(prompt) not in held, (stage.name, prompt)
                assert "p" not in prompt, f"{stage.name} trains on a multi-digit xl sum: {prompt}"


def test_build_is_deterministic_and_cached(tmp_path):
    first = build_zoo(tmp_path / "a", seed=3, scale=0.03, log=None)
    start = time.perf_counter()
    again = build_zoo(tmp_path / "a", seed=3, scale=0.03, log=None)
    assert time.perf_counter() - start < 1.0
    assert again.scores == first.scores
    other = build_zoo(tmp_path / "b", seed=3, scale=0.03, log=None)
    for name in ("base", "math", "language"):
        a = (first.models[name] / "model.safetensors").read_bytes()
        b = (other.models[name] / "model.safetensors").read_bytes()
        assert a == b, f"{name} differs between two builds with the same seed"
    assert not (tmp_path / "a.partial").exists()


@pytest.fixture(scope="session")
def zoo():
    """The full demo zoo (cached under ~/.cache/evomerge/zoo after the first build)."""
    return build_zoo(log=None)


def test_zoo_reloads_offline_and_sources_score_as_designed(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.zoo.score import exact_match

    splits = skills.evaluation_splits()
    for name, path in zoo.models.items():
        tok = AutoTokenizer.from_pretrained(str(path))
        assert tok("12p35q").input_ids == [tok.convert_tokens_to_ids(c) for c in "12p35q"]
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        # the target: no source can do it
        for split in ("xl_add", "xl_add_heldout"):
            score = exact_match(model, splits[split])
            assert score <= 0.10, f"{name} scores {score} on {split}"
            assert abs(score - zoo.scores[name][f"zoo_{split}"]) < 1e-9
    assert zoo.scores["math"]["zoo_en_add"] >= 0.90
    for skill in ("copy", "reverse", "successor", "add1"):
        assert zoo.scores["language"][f"zoo_xl_{skill}"] >= 0.90, skill
    assert zoo.scores["base"]["zoo_xl_add1"] <= 0.10  # the plus of xl is the expert's alone
    assert zoo.scores["base"]["zoo_en_add"] <= 0.10


def test_cli_prints_the_score_table(zoo, capsys):
    from service.cli import main

    assert main(["zoo", "build", "--out", str(zoo.root), "-q"]) == 0
    out = capsys.readouterr().out
    assert "zoo_xl_add_heldout" in out and "language" in out and "math" in out


def test_load_returns_none_for_unfinished(tmp_path: Path):
    assert load(tmp_path) is None


def test_lm_eval_adapter_agrees_with_the_zoo_table(zoo):
    """The zoo's own greedy scorer (used for the table) and the lm-eval adapter (used
    by searches) give the same exact-match scores."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import registry
    from evaluators.base import EvaluationSpec, ObjectiveSpec

    spec = EvaluationSpec(
        evaluator="lm_eval",
        objectives=[ObjectiveSpec(task=t, metric="exact_match")
                    for t in ("zoo_en_add", "zoo_xl_add1", "zoo_xl_add")],
        options={"task_dirs": ["evomerge:zoo"]},
    )
    evaluator = registry.create(registry.validate_spec(spec))
    for name in ("math", "language"):
        path = zoo.models[name]
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        result = evaluator.evaluate(model, AutoTokenizer.from_pretrained(str(path)))
        for objective in result.objectives:
            assert objective.value == pytest.approx(zoo.scores[name][objective.task]), (name, objective)
