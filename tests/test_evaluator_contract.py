"""The evaluator contract: every registered evaluator (``evaluators.registry``) goes through the
same checks. The option checks need nothing but the evaluator's class, so a new evaluator is
checked by them with no edit to this file:

- its options are validated strictly: an unknown option, or a value of the wrong type for any
  option, is refused naming the option;
- each of its declared ``path_options`` is an option of its ``Options`` model.

Scoring a tiny model needs an evaluation spec whose data can be had offline: ``EXAMPLES`` holds
one per evaluator that has one (inline texts, the packaged zoo tasks); an evaluator without one
is skipped with the reason. With one:

- ``evaluate`` returns one score per objective, each finite and keyed as the spec says;
- the scores are deterministic: the same model twice, and a second evaluator of the same spec.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from pydantic import ValidationError

from evaluators import registry
from evaluators.base import EvaluationResult, EvaluationSpec

NAMES = registry.available()
WRONG = [[1.5]]  # of the wrong type for any option: not a bool, number, string, list of strings or mapping

# An evaluation spec per evaluator that can score the tiny models offline (few examples each).
EXAMPLES: dict[str, dict[str, Any]] = {
    "noop": {"objectives": [{"task": "fingerprint", "metric": "mean"},
                            {"task": "fingerprint", "metric": "mean", "name": "again", "weight": 0.5}]},
    "loglik": {"objectives": [{"task": "sums", "metric": "loglik_per_token"},
                              {"task": "sums", "metric": "perplexity"}],
               "options": {"texts": {"sums": ["12+34=46", "7+8=15", "50+5=55", "9+90=99"]}}},
    "lm_eval": {"objectives": [{"task": "zoo_en_add", "metric": "exact_match", "limit": 3}],
                "options": {"task_dirs": ["evomerge:zoo"], "include_defaults": False},
                "batch_size": 4},
}


def example(name: str) -> EvaluationSpec:
    if name not in EXAMPLES:
        pytest.skip(f"no offline example spec for evaluator {name!r} (its data is not shipped): "
                    "add one to EXAMPLES in this file")
    return registry.validate_spec(EvaluationSpec(evaluator=name, **EXAMPLES[name]))


def refused_fields(err: ValidationError) -> set[str]:
    return {str(e["loc"][0]) for e in err.errors() if e["loc"]}


@pytest.fixture(scope="module")
def tiny(family):
    """A tiny Llama in memory and its (character-level) tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, _ = family("llama")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.eval()
    return model, AutoTokenizer.from_pretrained(base)


# ---- options (every evaluator) -------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_refused_naming_it(name):
    spec = EvaluationSpec(evaluator=name, objectives=[{"task": "t", "metric": "m"}],
                          options={"no_such_option": 1})
    with pytest.raises(ValidationError) as refused:
        registry.validate_spec(spec)
    assert refused_fields(refused.value) == {"no_such_option"}


@pytest.mark.parametrize("name", NAMES)
def test_an_option_of_the_wrong_type_is_refused_naming_it(name):
    options = registry.get(name).Options
    for field in options.model_fields:
        with pytest.raises(ValidationError) as refused:
            options.model_validate({field: WRONG})
        assert refused_fields(refused.value) == {field}, (field, refused.value)


@pytest.mark.parametrize("name", NAMES)
def test_path_options_are_options(name):
    cls = registry.get(name)
    fields = cls.Options.model_fields
    for path_option in cls.path_options:
        assert path_option.key in fields, f"{name}: path option {path_option.key!r} is not an option"
        assert path_option.holds in ("list", "mapping") and path_option.points_to in ("task_dir", "file")
    assert len({p.key for p in cls.path_options}) == len(cls.path_options)


# ---- scoring a tiny model (evaluators with an offline example) ---------------------------------
def scores(result: EvaluationResult) -> dict[str, float]:
    return {o.key: o.value for o in result.objectives}


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_gives_one_score_per_objective(name, tiny):
    spec = example(name)
    model, tokenizer = tiny
    result = registry.create(spec).evaluate(model, tokenizer)
    assert isinstance(result, EvaluationResult)
    assert [o.key for o in result.objectives] == [o.key for o in spec.objectives]
    assert all(math.isfinite(o.value) for o in result.objectives)
    assert result.timings.total_s >= 0


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_is_deterministic_for_the_same_model(name, tiny):
    spec = example(name)
    model, tokenizer = tiny
    evaluator = registry.create(spec)
    first = scores(evaluator.evaluate(model, tokenizer))
    assert scores(evaluator.evaluate(model, tokenizer)) == first
    assert scores(registry.create(spec).evaluate(model, tokenizer)) == first


def test_every_built_in_evaluator_has_an_offline_example():
    assert {"noop", "loglik", "lm_eval"} <= set(NAMES) and set(EXAMPLES) <= set(NAMES)
