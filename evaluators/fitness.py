"""From measured objectives to what the optimizer maximizes.

Every value handed to the optimizer is oriented so that higher is better: a
lower-is-better metric (perplexity, a loss) enters with its sign flipped. A single-
objective study maximizes the weighted sum; a multi-objective study maximizes each
signed value separately (weights do not apply there: a Pareto front has no exchange rate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from evaluators.base import EvaluationError, EvaluationResult, ObjectiveScore


def signed(score: ObjectiveScore) -> float:
    """The objective's value, oriented so that higher is better."""
    return score.value if score.higher_is_better else -score.value


def _finite(scores: Sequence[ObjectiveScore]) -> None:
    for s in scores:
        if not math.isfinite(s.value):
            raise EvaluationError(f"objective {s.key} is {s.value}: not a score", task=s.task)


def objective_values(result: EvaluationResult) -> list[float]:
    """One signed value per objective, in spec order (all to be maximized)."""
    _finite(result.objectives)
    return [signed(s) for s in result.objectives]


def weighted_sum(result: EvaluationResult) -> float:
    """Sum of weight × signed value over the objectives."""
    _finite(result.objectives)
    return math.fsum(s.weight * signed(s) for s in result.objectives)


def fitness(result: EvaluationResult, *, multi_objective: bool = False) -> float | list[float]:
    """What the optimizer is told: a number, or a vector for a multi-objective study."""
    return objective_values(result) if multi_objective else weighted_sum(result)


def directions(result_or_n: EvaluationResult | int) -> list[str]:
    """Optuna study directions matching ``objective_values`` (always maximize)."""
    n = result_or_n if isinstance(result_or_n, int) else len(result_or_n.objectives)
    return ["maximize"] * n
