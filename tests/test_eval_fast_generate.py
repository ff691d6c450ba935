"""The batched greedy decoder returns exactly what lm-eval's HFLM (model.generate) returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluators.testing import addition_rows

GREEDY = {"until": ["</s>"], "max_gen_toks": 8, "do_sample": False}
STOPS = {"until": [".", "q"], "max_gen_toks": 6}  # stop strings that are not EOS: lm-eval's look-back rule


def _chaotic(root: Path, arch: str, seed: int) -> Path:
    """A random model perturbed enough to give varied outputs of varied lengths (some hit EOS)."""
    from workers.synthetic import make_model

    base = make_model(arch, root / f"{arch}-base", seed=seed, hidden=64, layers=2)
    return make_model(arch, root / f"{arch}-chaotic", seed=seed + 1, base=base, noise=0.3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("fastgen")
    out = {}
    for arch, seed in [("llama", 5), ("qwen2", 6), ("gpt2", 7)]:
        path = _chaotic(root, arch, seed)
        out[arch] = (AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))
    return out


def _requests(gen_kwargs_list: list[dict], n: int = 40):
    from lm_eval.api.instance import Instance

    prompts = [r["prompt"] for r in addition_rows(n, seed=3)]
    prompts[3] = prompts[3] * 3  # a long one, so batches need padding
    return [
        Instance(request_type="generate_until", doc={}, idx=0, metadata=("t", i, 1),
                 arguments=(p, dict(gen_kwargs_list[i % len(gen_kwargs_list)])))
        for i, p in enumerate(prompts)
    ]


def _reference(model, tokenizer, requests, batch_size):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size).generate_until(
        requests, disable_tqdm=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("batch_size", [1, 7, 0])
def test_identical_to_hf_generate(models, arch, batch_size):
    from evaluators.runtime.fast_lm import FastHFLM

    model, tokenizer = models[arch]
    requests = _requests([GREEDY, STOPS])
    fast = FastHFLM(model, tokenizer, batch_size=batch_size)
    plan = fast.plan_generation(requests)
    assert plan is not None and fast.fast_path_available()
    got = fast.run_plan(plan)
    want = _reference(model, tokenizer, requests, batch_size)
    assert got == want
    assert len(set(got)) > 10 and any(len(g) < 6 for g in got)  # varied, and some stopped early
    assert fast.run_plan(plan) == got  # a plan is reusable


def test_batches_follow_hflm_order(models):
    """Same batches as HFLM (so the same padding, so the same numbers): lm-eval's Collator."""
    from lm_eval.models.utils import Collator

    from evaluators.runtime.fast_lm import FastHFLM

    model, tokenizer = models["llama"]
    requests = _requests([GREEDY, STOPS, {**GREEDY, "max_gen_toks": 3}])
    fast = FastHFLM(model, tokenizer, batch_size=4)
    plan = fast.plan_generation(requests)
    collator = Collator([r.args for r in requests], group_by="gen_kwargs", group_fn=lambda x: x[1],
                        sort_fn=lambda r: (-len(fast.tok_encode(r[0])), r[0]))
    chunks = [len(c) for c in collator.get_batched(n=4)]
    assert [len(b.rows) for g in plan.groups for b in g.batches] == chunks
    assert [row for g in plan.groups for b in g.batches for row in b.rows] == collator._reorder_indices


def test_generation_config_with_processors_falls_back(models):
    from evaluators.runtime.fast_lm import FastHFLM

    model, tokenizer = models["llama"]
    requests = _requests([GREEDY], n=12)
    want = _reference(model, tokenizer, requests, 4)
    original = model.generation_config.repetition_penalty
    model.generation_config.repetition_penalty = 1.5
    try:
        fast = FastHFLM(model, tokenizer, batch_size=4)
        assert not fast.fast_path_available()
        penalized = fast.generate_until(requests)
        assert penalized == _reference(model, tokenizer, requests, 4)
        assert penalized != want
    finally:
        model.generation_config.repetition_penalty = original


@pytest.mark.parametrize("max_new_tokens", [3, 12])
def test_max_new_tokens_of_the_generation_config_wins(models, max_new_tokens):
    """model.generate lets the model's max_new_tokens override lm-eval's max_length."""
    from evaluators.runtime.fast_lm import FastHFLM

    model, tokenizer = models["llama"]
    requests = _requests([GREEDY, STOPS], n=16)
    original = model.generation_config.max_new_tokens
    model.generation_config.max_new_tokens = max_new_tokens
    try:
        fast = FastHFLM(model, tokenizer, batch_size=5)
        assert fast.fast_path_available()
        got = fast.generate_until(requests)
        assert got == _reference(model, tokenizer, requests, 5)
        assert max(map(len, got)) == max_new_tokens
    finally:
        model.generation_config.max_new_tokens = original


def test_sampling_requests_are_not_planned(models):
    from evaluators.runtime.fast_lm import FastHFLM

    model, tokenizer = models["llama"]
    fast = FastHFLM(model, tokenizer, batch_size=4)
    assert fast.plan_generation(_requests([{**GREEDY, "do_sample": True, "temperature": 0.7}], n=4)) is None
