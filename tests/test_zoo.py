"""The demo zoo family: every variant builds deterministically, is cached, loads offline,
ships current tasks, never trains on its evaluation operands, and its sources cannot do
its target; the full default zoo scores as the design says (each expert masters its own
skill; no source can do the target)."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import pytest
import torch

from workers.zoo import skills, tasks
from workers.zoo.build import build_zoo, default_dir, load, settings_hash
from workers.zoo.variants import DEFAULT, VARIANTS, get_variant

REDUCED = 0.01  # the tests' zoos: ten steps or so per model


def test_shipped_task_files_are_current():
    folders = tasks.folders()
    assert {f.name for f in folders} == {v.task_folder for v in VARIANTS.values()}
    for folder, files in folders.items():
        for fname, content in files.items():
            path = folder / fname
            assert path.exists(), f"{path} is missing: run python -m workers.zoo.tasks"
            assert path.read_text() == content, f"{path} is stale: run python -m workers.zoo.tasks"


def test_the_registry_and_the_first_zoos_cache_key():
    assert DEFAULT == "two-experts" and next(iter(VARIANTS)) == DEFAULT
    with pytest.raises(ValueError, match="the variants are: two-experts, distractor, subtract"):
        get_variant("nope")
    # the first zoo keeps its folder and key from before the family (built zoos stay cached)
    assert settings_hash(0, 1.0) == "cd66af977e868cc3"
    assert default_dir(0).name == "v2-seed0" and default_dir(0, 0.5).name == "v2-seed0-scale0.5"
    assert default_dir(1, variant="subtract").name == "v2-subtract-seed1"
    assert len({settings_hash(0, 1.0, v) for v in VARIANTS}) == len(VARIANTS)
    for v in VARIANTS.values():
        assert v.vocab[:4] == ("<pad>", "<s>", "</s>", "<unk>") and v.models[0] == "base"
        plan = v.stages(REDUCED)  # the models in order, the base first (other stages: intermediate steps)
        assert next(iter(plan)) == v.models[0] and [n for n in plan if n in v.models] == list(v.models)
        splits = v.evaluation_splits() | v.checks()
        assert v.target in splits and v.heldout in splits
        assert all(s in splits for names in v.skills.values() for s in names)
        for examples in splits.values():  # every split is written in the variant's vocabulary
            assert all(c in v.tokens.ids for p, a in examples for c in p + a)


PAIR = re.compile(r"(\d+)([" + re.escape(skills.OPERATORS) + r"])(\d+)")


def _multi_digit_pairs(text: str) -> list[tuple[int, int, str]]:
    """Every ``a OP b`` in ``text`` with an operand of two digits or more."""
    return [(int(a), int(b), op) for a, op, b in PAIR.findall(text) if max(int(a), int(b)) >= 10]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_evaluation_operands_never_appear_in_training(name):
    v = get_variant(name)
    splits = v.evaluation_splits() | v.checks()
    target_pairs = {skills.operands(p) for p, _ in splits[v.target]}
    heldout_pairs = {skills.operands(p) for p, _ in splits[v.heldout]}
    assert not target_pairs & heldout_pairs
    assert len(target_pairs) == len(heldout_pairs) == skills.EVAL_SIZE
    held = skills.pairs_of(ex for examples in splits.values() for ex in examples if _multi_digit_pairs(ex[0]))
    target_op = next(op for op in skills.OPERATORS if op in splits[v.target][0][0])
    rng = random.Random(0)
    for stage in v.stages(1.0).values():
        makers = [m for _, m in stage.mixture]
        weights = [w for w, _ in stage.mixture]
        answers = getattr(stage, "objective", "answers") == "answers"  # else (text, text) pairs
        for _ in range(20_000):
            example = rng.choices(makers, weights)[0](rng)
            for text in example:
                assert all(c in v.tokens.ids for c in text), (name, stage.name, example)
                for a, b, op in _multi_digit_pairs(text):
                    assert (a, b) not in held, (name, stage.name, example)
                    if answers:
                        assert op != target_op, f"{name}/{stage.name} trains on the target's: {example}"


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """Each variant built twice at a reduced scale (seed 3), in two folders."""
    root = tmp_path_factory.mktemp("zoos")
    return {name: (build_zoo(root / name / "a", seed=3, scale=REDUCED, log=None, variant=name),
                   build_zoo(root / name / "b", seed=3, scale=REDUCED, log=None, variant=name))
            for name in VARIANTS}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_build_is_deterministic_and_cached(reduced, name):
    first, other = reduced[name]
    v = get_variant(name)
    assert first.variant == name and tuple(first.models) == v.models
    start = time.perf_counter()
    again = build_zoo(first.root, seed=3, scale=REDUCED, log=None, variant=name)
    assert time.perf_counter() - start < 1.0
    assert again.scores == first.scores and again.checks == first.checks
    for model in v.models:
        a = (first.models[model] / "model.safetensors").read_bytes()
        b = (other.models[model] / "model.safetensors").read_bytes()
        assert a == b, f"{name}/{model} differs between two builds with the same seed"
    assert not first.root.with_name("a.partial").exists()
    manifest = json.loads((first.root / "zoo.json").read_text())
    assert manifest["variant"] == name
    assert set(manifest["machine"]) == {"cpu", "torch", "cpu_capability"}
    assert json.loads((first.models["base"] / "config.json").read_text())["model_type"] == \
        v.config().model_type


@pytest.mark.parametrize("name", list(VARIANTS))
def test_reduced_sources_cannot_do_the_target(reduced, name):
    zoo, v = reduced[name][0], get_variant(name)
    for model in v.models:
        for task in (v.target_task, v.heldout_task):
            assert zoo.scores[model][task] <= 0.10, (model, task)


def test_a_stage_trains_only_the_parameters_it_names():
    from workers.zoo.architectures import model_for
    from workers.zoo.train import Stage, train

    v = get_variant(DEFAULT)
    torch.manual_seed(0)
    model = model_for(v.config())
    before = {k: t.clone() for k, t in model.state_dict().items()}
    stage = Stage("embeddings", [(1.0, lambda rng: skills.copy("en", rng))], steps=3, lr=1e-2, batch=8,
                  trains=("model.embed_tokens.*",))
    train(model, stage, 0, v.tokens)
    changed = {k for k, t in model.state_dict().items() if not torch.equal(t, before[k])}
    assert changed == {"model.embed_tokens.weight"}
    assert all(p.requires_grad for p in model.parameters())


def test_zoo_list_names_every_variant(capsys):
    from service.cli import main

    assert main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    for v in VARIANTS.values():
        assert v.name in out and v.summary in out and v.target_task in out


def test_another_variants_tasks_load_in_lm_eval(reduced):
    """A packaged folder of another variant (evomerge:zoo_subtract) scores like the zoo's table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import registry
    from evaluators.base import EvaluationSpec, ObjectiveSpec

    zoo, v = reduced["subtract"][0], get_variant("subtract")
    spec = EvaluationSpec(
        evaluator="lm_eval",
        objectives=[ObjectiveSpec(task=v.task(s), metric="exact_match") for s in ("zl_copy", v.target)],
        options={"task_dirs": [f"evomerge:{v.task_folder}"]},
    )
    evaluator = registry.create(registry.validate_spec(spec))
    path = zoo.models["language"]
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    result = evaluator.evaluate(model, AutoTokenizer.from_pretrained(str(path)))
    assert zoo.scores["language"][v.task("zl_copy")] > 0  # not a vacuous comparison
    for objective in result.objectives:
        assert objective.value == pytest.approx(zoo.scores["language"][objective.task]), objective


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
    assert "zoo_xl_add_heldout" in out and "language" in out and "math" in out and "two-experts" in out


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
