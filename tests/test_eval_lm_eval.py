"""The lm-eval adapter scores the in-memory model exactly as lm_eval.simple_evaluate scores
the same weights saved to a folder, on the same seeded examples."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest

from evaluators import EvaluationError, EvaluationSpec, ObjectiveSpec, fitness, registry
from evaluators.testing import (
    addition_rows,
    choice_rows,
    write_choice_task,
    write_generate_task,
    write_group,
    write_loglikelihood_task,
)

SEED = 1234
CHAT_TEMPLATE = (  # characters the fixture tokenizer knows
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)


def _greedy_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(p, return_tensors="pt")
            gen = model.generate(**ids, max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(gen[0, ids.input_ids.shape[1]:], skip_special_tokens=True))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A chaotic tiny Llama saved to a folder, and task files whose generation answers are
    that model's own greedy outputs for half of the prompts (so exact_match is about 0.5
    and moves when the weights move)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.synthetic import make_model

    root = tmp_path_factory.mktemp("lmeval")
    base = make_model("llama", root / "base", seed=11, hidden=64, layers=2)
    path = make_model("llama", root / "model", seed=12, base=base, noise=0.3)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    rows = addition_rows(60, seed=1)
    answers = _greedy_answers(model, tokenizer, [r["prompt"] for r in rows])
    for i, (row, answer) in enumerate(zip(rows, answers)):
        row["answer"] = answer if i % 2 == 0 else answer + "Z"
    tasks = root / "tasks"
    write_generate_task(tasks, "fx_gen", rows, train_rows=addition_rows(10, seed=2))
    write_choice_task(tasks, "fx_mc", choice_rows(40, seed=3))
    write_choice_task(tasks, "fx_mc2", choice_rows(30, seed=4))
    write_group(tasks, "fx_grp", ["fx_mc", "fx_mc2"], "acc")
    write_loglikelihood_task(tasks, "fx_ll", addition_rows(30, seed=5))
    return {"path": path, "model": model, "tokenizer": tokenizer, "tasks": tasks}


def _spec(tasks: Path, num_fewshot: int | None = None, chat: bool = False, **kw) -> EvaluationSpec:
    objectives = [
        ObjectiveSpec(task="fx_gen", metric="exact_match", limit=40, num_fewshot=num_fewshot, weight=2.0),
        ObjectiveSpec(task="fx_grp", metric="acc", limit=20, num_fewshot=num_fewshot),
        ObjectiveSpec(task="fx_mc", metric="acc_norm", limit=20, num_fewshot=num_fewshot),
        ObjectiveSpec(task="fx_ll", metric="perplexity", limit=25, num_fewshot=num_fewshot, weight=0.1),
    ]
    options = {"task_dirs": [str(tasks)], "apply_chat_template": chat}
    return registry.validate_spec(EvaluationSpec(
        objectives=objectives, seed=SEED, batch_size=8, options=options, **kw))


def _simple_evaluate(path: Path, tasks: Path, samples: dict, num_fewshot: int | None = None,
                     chat: bool = False) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={path}", device="cpu", batch_size=8,
        tasks=["fx_gen", "fx_grp", "fx_ll"], num_fewshot=num_fewshot,
        samples={k: v for k, v in samples.items() if v is not None},
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        bootstrap_iters=0, log_samples=False, fewshot_random_seed=SEED,
        apply_chat_template=chat, fewshot_as_multiturn=False,
    )
    return res["results"]


def _assert_same(ours: dict[str, dict[str, float]], theirs: dict[str, dict]) -> None:
    assert set(ours) == {"fx_gen", "fx_mc", "fx_mc2", "fx_grp", "fx_ll"}
    for task, metrics in ours.items():
        assert metrics, task
        for key, value in metrics.items():
            assert float(theirs[task][key]) == value, (task, key)


@pytest.mark.parametrize(("num_fewshot", "chat"), [(None, False), (2, False), (None, True)],
                         ids=["zero-shot", "two-shot", "chat-template"])
def test_same_scores_as_simple_evaluate_on_the_saved_folder(setup, num_fewshot, chat):
    evaluator = registry.create(_spec(setup["tasks"], num_fewshot, chat))
    result = evaluator.evaluate(setup["model"], setup["tokenizer"])
    _assert_same(result.metrics, _simple_evaluate(setup["path"], setup["tasks"], evaluator.suite.samples,
                                                  num_fewshot, chat))
    assert result.n_examples == {"fx_gen": 40, "fx_mc": 20, "fx_mc2": 20, "fx_ll": 25}
    prompt = evaluator.suite.runs[-1].task.instances[0].args[0]
    assert prompt.startswith("u:") == chat
    if num_fewshot is None and not chat:
        assert 0.3 < result.scores["fx_gen/exact_match"] < 0.7  # the model's own answers, half of them


def test_in_memory_weights_are_the_ones_scored(setup, tmp_path):
    import torch

    model = copy.deepcopy(setup["model"])
    evaluator = registry.create(_spec(setup["tasks"]))
    before = evaluator.evaluate(model, setup["tokenizer"])
    with torch.no_grad():  # in place, as a worker materializes candidates into its resident model
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(1.5)
    after = evaluator.evaluate(model, setup["tokenizer"])
    assert after.scores["fx_gen/exact_match"] != before.scores["fx_gen/exact_match"]
    assert after.scores["fx_ll/perplexity"] != before.scores["fx_ll/perplexity"]
    model.save_pretrained(tmp_path)
    setup["tokenizer"].save_pretrained(tmp_path)
    _assert_same(after.metrics, _simple_evaluate(tmp_path, setup["tasks"], evaluator.suite.samples))
    # another model object of the same architecture: swapped in, same requests
    again = evaluator.evaluate(setup["model"], setup["tokenizer"])
    assert again.metrics == before.metrics


def test_fast_generate_matches_model_generate(setup):
    fast = registry.create(_spec(setup["tasks"])).evaluate(setup["model"], setup["tokenizer"])
    plain = registry.create(_spec(setup["tasks"]).model_copy(
        update={"options": {"task_dirs": [str(setup["tasks"])], "fast_generate": False}}))
    assert plain.evaluate(setup["model"], setup["tokenizer"]).metrics == fast.metrics


def test_seeded_subsets_and_holdout(setup):
    spec = _spec(setup["tasks"])
    a, b = registry.create(spec), registry.create(spec)
    other = registry.create(spec.model_copy(update={"seed": 99}))
    holdout = registry.create(spec.holdout())
    assert a.suite.samples == b.suite.samples
    assert a.suite.samples["fx_gen"] != other.suite.samples["fx_gen"]
    search, held = set(a.suite.samples["fx_gen"]), set(holdout.suite.samples["fx_gen"])
    assert len(search) == 40 and not search & held and search | held == set(range(60))
    result = holdout.evaluate(setup["model"], setup["tokenizer"])
    assert result.n_examples["fx_gen"] == 20


def test_split_override(setup):
    spec = EvaluationSpec(objectives=[ObjectiveSpec(task="fx_gen", metric="exact_match", split="train")],
                          options={"task_dirs": [str(setup["tasks"])]})
    result = registry.create(registry.validate_spec(spec)).evaluate(setup["model"], setup["tokenizer"])
    assert result.n_examples == {"fx_gen": 10}
    bad = spec.model_copy(update={"objectives": [spec.objectives[0].model_copy(update={"split": "dev"})]})
    with pytest.raises(EvaluationError, match=r"no split 'dev'.*'test', 'train'"):
        registry.create(bad).evaluate(setup["model"], setup["tokenizer"])


def test_result_fitness_and_timings(setup):
    evaluator = registry.create(_spec(setup["tasks"]))
    first = evaluator.evaluate(setup["model"], setup["tokenizer"])
    second = evaluator.evaluate(setup["model"], setup["tokenizer"])
    assert first.timings.prepare_s > 0 and second.timings.prepare_s == 0
    assert 0 < second.timings.forward_s < second.timings.total_s and second.timings.model_calls > 0
    by_key = {o.key: o for o in second.objectives}
    assert by_key["fx_ll/perplexity"].higher_is_better is False
    assert by_key["fx_gen/exact_match"].metric == "exact_match,none"
    s = second.scores
    want = 2.0 * s["fx_gen/exact_match"] + s["fx_grp/acc"] + s["fx_mc/acc_norm"] - 0.1 * s["fx_ll/perplexity"]
    assert fitness(second) == pytest.approx(want)
    assert fitness(second, multi_objective=True)[3] == -s["fx_ll/perplexity"]
    assert EvaluationSpec.model_validate_json(_spec(setup["tasks"]).model_dump_json())  # storable


def test_crash_is_a_failed_trial_with_its_reason(setup):
    model = copy.deepcopy(setup["model"])
    evaluator = registry.create(_spec(setup["tasks"]))

    def broken(*args, **kwargs):
        raise RuntimeError("shapes do not match")

    model.forward = broken
    with pytest.raises(EvaluationError) as info:
        evaluator.evaluate(model, setup["tokenizer"])
    assert "RuntimeError: shapes do not match" in info.value.reason and "Traceback" in info.value.detail
    restored = pickle.loads(pickle.dumps(info.value))
    assert restored.reason == info.value.reason and restored.detail == info.value.detail


def test_nan_is_a_failed_trial_never_a_score(setup):
    import torch

    model = copy.deepcopy(setup["model"])
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(EvaluationError, match="nan") as info:
        registry.create(_spec(setup["tasks"])).evaluate(model, setup["tokenizer"])
    assert info.value.task == "fx_ll"
