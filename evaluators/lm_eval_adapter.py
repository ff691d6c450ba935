"""The lm-eval evaluator: lm-eval tasks (by name or from task directories) scored on an
in-memory model, with the tasks and their requests built once per worker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from evaluators.base import (
    EvaluationResult,
    EvaluationSpec,
    Evaluator,
    ObjectiveScore,
    PathOption,
    SpecError,
    Timings,
    failures_as_evaluation_errors,
)
from evaluators.registry import register
from evaluators.validation import BUILTIN_PREFIX, validate_objectives


class LmEvalOptions(BaseModel):
    """``EvaluationSpec.options`` of the lm-eval evaluator."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # directories of task YAML files: under the roots, or evomerge:NAME (a packaged folder)
    task_dirs: list[str] = Field(default_factory=list, max_length=16)
    include_defaults: bool | None = None  # index lm-eval's built-in tasks; None: only if needed
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    system_instruction: str | None = Field(default=None, max_length=16_384)
    fast_generate: bool = True  # the batched greedy decoder (identical outputs) instead of model.generate
    # more HFLM arguments: add_bos_token, max_length…
    hflm_args: dict[str, Any] = Field(default_factory=dict, max_length=16)


@register
class LmEvalEvaluator(Evaluator):
    """Scores objectives that are metrics of lm-eval tasks."""

    name = "lm_eval"
    Options = LmEvalOptions
    path_options = (PathOption("task_dirs", holds="list", points_to="task_dir", what="task directory"),)

    @classmethod
    def validate(cls, spec: EvaluationSpec) -> EvaluationSpec:
        options = cls.Options.model_validate(spec.options)
        if spec.subset == "holdout":
            unlimited = sorted({o.task for o in spec.objectives if o.limit is None})
            if unlimited:
                raise SpecError(
                    f"a held-out score needs a search `limit` on every task; {unlimited} have none"
                )
        objectives = validate_objectives(spec.objectives, options.task_dirs,
                                         include_defaults=options.include_defaults)
        # keep the directories as given ("evomerge:zoo" stays portable), relative ones made absolute
        dirs = [d if d.startswith(BUILTIN_PREFIX) else str(Path(d).expanduser().resolve())
                for d in options.task_dirs]
        options_out = {**spec.options, "task_dirs": dirs}
        return spec.model_copy(update={"objectives": objectives, "options": options_out})

    def __init__(self, spec: EvaluationSpec) -> None:
        super().__init__(spec)
        self.options: LmEvalOptions
        self._suite = None
        self._lm = None
        self._tokenizer = None
        self._rungs = None

    @property
    def suite(self):
        """The tasks, built on first use (no model needed)."""
        if self._suite is None:
            from evaluators.runtime.lm_eval_suite import LmEvalSuite

            self._suite = LmEvalSuite(
                self.spec.objectives,
                task_dirs=self.options.task_dirs,
                include_defaults=self.options.include_defaults,
                seed=self.spec.seed,
                subset=self.spec.subset,
            )
        return self._suite

    def _lm_for(self, model, tokenizer):
        """The LM wrapper for this model; requests are (re)built only for a new tokenizer."""
        if self._lm is not None and tokenizer is self._tokenizer:
            if self._lm.model is not model:
                self._lm.set_model(model)
            return self._lm
        from evaluators.runtime.fast_lm import FastHFLM

        lm = FastHFLM(model, tokenizer, batch_size=self.spec.batch_size, **self.options.hflm_args)
        self.suite.build_requests(
            lm,
            apply_chat_template=self.options.apply_chat_template,
            fewshot_as_multiturn=self.options.fewshot_as_multiturn,
            system_instruction=self.options.system_instruction,
            fast_generate=self.options.fast_generate,
        )
        self._lm, self._tokenizer = lm, tokenizer
        self._rungs = None  # its requests are new: the rungs' slices are made again
        return lm

    def _rung_scorer(self):
        if self._rungs is None or self._rungs.suite is not self.suite:
            from evaluators.runtime.lm_eval_rungs import RungScorer

            self._rungs = RungScorer(self.suite, fast_generate=self.options.fast_generate)
        return self._rungs

    def prepare(self, model, tokenizer) -> float:
        """Build tasks and requests now (else the first ``evaluate`` does); returns seconds."""
        start = time.perf_counter()
        with failures_as_evaluation_errors():
            self._lm_for(model, tokenizer)
        return time.perf_counter() - start

    supports_rungs = True

    def evaluate(self, model, tokenizer) -> EvaluationResult:
        return self._evaluate(model, tokenizer, None, fresh=True)

    def evaluate_rung(self, model, tokenizer, examples: int, *, fresh: bool) -> EvaluationResult:
        return self._evaluate(model, tokenizer, examples, fresh=fresh)

    def _evaluate(self, model, tokenizer, examples: int | None, *, fresh: bool) -> EvaluationResult:
        start = time.perf_counter()
        with failures_as_evaluation_errors():  # a crashed evaluation is a failed trial, never a score
            first = self._lm is None or tokenizer is not self._tokenizer
            lm = self._lm_for(model, tokenizer)
            prepare_s = time.perf_counter() - start if first else 0.0
            model.eval()
            from evaluators.runtime.timing import ForwardTimer

            with ForwardTimer(model) as timer:
                if examples is None:
                    results, counts = self.suite.run(lm)
                else:
                    rungs = self._rung_scorer()
                    if fresh:
                        rungs.start()
                    results, counts = rungs.score(lm, examples)
            values = self.suite.objective_values(results)
        return EvaluationResult(
            objectives=[
                ObjectiveScore(key=o.spec.key, task=o.spec.task, metric=o.key, value=v,
                               weight=o.spec.weight, higher_is_better=o.higher_is_better)
                for o, v in values
            ],
            metrics={task: _numeric(res) for task, res in results.items()},
            n_examples=counts,
            timings=Timings(total_s=time.perf_counter() - start, forward_s=timer.seconds,
                            model_calls=timer.calls, prepare_s=prepare_s),
            tokens=timer.tokens,
        )


def _numeric(results: dict[str, Any]) -> dict[str, float]:
    """The finite numeric metrics of one task's results (stderr placeholders and names dropped)."""
    out = {}
    for key, value in results.items():
        if "," not in key or isinstance(value, bool):
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if number == number and abs(number) != float("inf"):
            out[key] = number
    return out
