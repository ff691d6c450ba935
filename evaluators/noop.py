"""A no-op evaluator: no data, no forward pass — for measuring everything else.

Each objective's value is a cheap fingerprint of the candidate (the mean of its first
parameter), so different candidates score differently. ``delay_s`` (optionally varied
per call by ``jitter``) simulates an evaluation's cost, e.g. to test that workers of
uneven speed are all kept busy.
"""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evaluators.base import EvaluationResult, Evaluator, ObjectiveScore, Timings
from evaluators.registry import register


class NoopOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    delay_s: float = Field(default=0.0, ge=0, le=3600)
    jitter: float = Field(default=0.0, ge=0, le=100, description="delay × (1 + jitter × U[0,1))")
    seed: int = Field(default=0, ge=0, le=2**32 - 1)


@register
class NoopEvaluator(Evaluator):
    name = "noop"
    Options = NoopOptions

    def __init__(self, spec) -> None:
        super().__init__(spec)
        self._rng = random.Random(self.options.seed)
        self._calls = itertools.count()

    supports_rungs = True

    def evaluate_rung(self, model: Any, tokenizer: Any, examples: int, *, fresh: bool) -> EvaluationResult:
        """The same fingerprint at every rung, counted as ``examples`` per task (at most its limit)."""
        result = self.evaluate(model, tokenizer)
        counts = {o.task: min(examples, o.limit) if isinstance(o.limit, int) else examples
                  for o in self.spec.objectives}
        return result.model_copy(update={"n_examples": counts})

    def evaluate(self, model: Any, tokenizer: Any) -> EvaluationResult:
        start = time.perf_counter()
        next(self._calls)
        delay = self.options.delay_s * (1 + self.options.jitter * self._rng.random())
        if delay:
            time.sleep(delay)
        first = next(model.parameters())
        value = float(first.detach().float().mean())
        objectives = [
            ObjectiveScore(key=o.key, task=o.task, metric=o.metric, value=value, weight=o.weight,
                           higher_is_better=True if o.higher_is_better is None else o.higher_is_better)
            for o in self.spec.objectives
        ]
        return EvaluationResult(
            objectives=objectives,
            metrics={o.task: {o.metric: value} for o in self.spec.objectives},
            n_examples={o.task: 0 for o in self.spec.objectives},
            timings=Timings(total_s=time.perf_counter() - start, forward_s=0.0, model_calls=0),
        )
