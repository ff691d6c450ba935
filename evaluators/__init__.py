"""Scoring candidates: the lm-eval adapter, built-in demo tasks, fitness.

Light on import (no torch, no lm_eval): the API service validates evaluation specs with
what is exported here. A worker keeps one evaluator per study::

    spec = registry.validate_spec(EvaluationSpec(...))    # at submission, no model
    evaluator = registry.create(spec)                     # once per worker
    result = evaluator.evaluate(model, tokenizer)         # per candidate; EvaluationError on failure
    value = fitness(result, multi_objective=False)
"""

from evaluators import registry
from evaluators.base import (
    EvaluationError,
    EvaluationResult,
    EvaluationSpec,
    Evaluator,
    ObjectiveScore,
    ObjectiveSpec,
    SpecError,
    Timings,
)
from evaluators.fitness import directions, fitness, objective_values, weighted_sum
from evaluators.validation import validate_objectives

__all__ = [
    "EvaluationError",
    "EvaluationResult",
    "EvaluationSpec",
    "Evaluator",
    "ObjectiveScore",
    "ObjectiveSpec",
    "SpecError",
    "Timings",
    "directions",
    "fitness",
    "objective_values",
    "registry",
    "validate_objectives",
    "weighted_sum",
]
