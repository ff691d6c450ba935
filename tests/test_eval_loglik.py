"""The log-likelihood evaluator: our own scoring, no lm-eval."""

from __future__ import annotations

import copy
import json
import math

import pytest

from evaluators import EvaluationError, EvaluationSpec, ObjectiveSpec, SpecError, fitness, registry

TEXTS = ["12p35q47", "3p4q7", "99p1q100", "50p50q100", "7p0q7", "1", "21p21q42"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.synthetic import make_model

    path = make_model("llama", tmp_path_factory.mktemp("loglik") / "m", seed=21, hidden=32, layers=2)
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _spec(**options) -> EvaluationSpec:
    return registry.validate_spec(EvaluationSpec(
        evaluator="loglik", batch_size=3,
        objectives=[ObjectiveSpec(task="sums", metric="loglik_per_token"),
                    ObjectiveSpec(task="sums", metric="perplexity", weight=0.5)],
        options={"texts": {"sums": TEXTS}, **options},
    ))


def _reference(model, tokenizer, texts, head=None) -> tuple[float, int, list[float]]:
    """Per text, unpadded: sum of log p(token | prefix) over all but the first token."""
    import torch

    total, count, per_text = 0.0, 0, []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = ids if head is None else [head, *ids]
        if len(ids) < 2:
            continue
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        lp = logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        total, count = total + lp, count + len(ids) - 1
        per_text.append(lp)
    return total, count, per_text


def test_matches_a_plain_computation(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = registry.create(_spec()).evaluate(model, tokenizer)
    total, count, per_text = _reference(model, tokenizer, TEXTS)
    metrics = result.metrics["sums"]
    assert metrics["loglik_per_token"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["loglik"] == pytest.approx(sum(per_text) / len(per_text), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(-total / count), rel=1e-5)
    assert result.n_examples == {"sums": len(TEXTS) - 1}  # "1" has no token to score
    assert fitness(result) == pytest.approx(total / count - 0.5 * math.exp(-total / count), rel=1e-5)


def test_bos_prefix_scores_every_token(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    result = registry.create(_spec(prefix="bos")).evaluate(model, tokenizer)
    total, count, _ = _reference(model, tokenizer, TEXTS, head=tokenizer.bos_token_id)
    assert result.metrics["sums"]["loglik_per_token"] == pytest.approx(total / count, rel=1e-5)


def test_weights_in_memory_change_the_score(model_and_tokenizer):
    import torch

    model, tokenizer = model_and_tokenizer
    model = copy.deepcopy(model)
    evaluator = registry.create(_spec())
    before = evaluator.evaluate(model, tokenizer).scores
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(3.0)
    after = evaluator.evaluate(model, tokenizer).scores
    assert after["sums/loglik_per_token"] != before["sums/loglik_per_token"]


def test_text_files_limit_and_nan(model_and_tokenizer, tmp_path):
    import torch

    model, tokenizer = model_and_tokenizer
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 4))
    spec = registry.validate_spec(EvaluationSpec(
        evaluator="loglik", objectives=[ObjectiveSpec(task="a", metric="loglik", limit=10)],
        options={"text_files": {"a": str(tmp_path / "a.jsonl")}}))
    assert registry.create(spec).evaluate(model, tokenizer).n_examples["a"] <= 10
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.norm.weight.fill_(float("nan"))
    with pytest.raises(EvaluationError, match="nan"):
        registry.create(spec).evaluate(broken, tokenizer)


def test_validation_names_what_is_wrong(tmp_path):
    def check(objective: ObjectiveSpec, **options):
        registry.validate_spec(EvaluationSpec(evaluator="loglik", objectives=[objective],
                                              options={"texts": {"sums": TEXTS}, **options}))

    with pytest.raises(SpecError, match=r"unknown text set 'sum'.*sums"):
        check(ObjectiveSpec(task="sum", metric="loglik"))
    with pytest.raises(SpecError, match=r"unknown metric 'perplexity_'.*perplexity"):
        check(ObjectiveSpec(task="sums", metric="perplexity_"))
    with pytest.raises(SpecError, match="does not exist"):
        check(ObjectiveSpec(task="sums", metric="loglik"), text_files={"b": str(tmp_path / "nope.txt")})
    (spec,) = registry.validate_spec(EvaluationSpec(
        evaluator="loglik", objectives=[ObjectiveSpec(task="sums", metric="perplexity")],
        options={"texts": {"sums": TEXTS}})).objectives
    assert spec.higher_is_better is False
