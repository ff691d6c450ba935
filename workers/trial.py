"""One trial on a worker: build the candidate in memory, score it, report.

:class:`TrialRunner` is plain Python (no Ray), so everything a Ray actor does is
testable on its own. A trial never raises: a recipe that cannot be built, a crashed
or NaN evaluation become a *failed* :class:`TrialResult` with its reason.
"""

from __future__ import annotations

import os
import resource
import socket
import time
import traceback
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from evaluators.base import EvaluationSpec

if TYPE_CHECKING:
    from evaluators.base import EvaluationResult
    from search_spaces.recipe import Recipe
    from workers.racing import RaceTicket


class WorkerSpec(BaseModel):
    """What a worker needs to build and score a study's candidates."""

    sources: list[str] = Field(min_length=1, description="model references, base included")
    base_model: str | None = None
    evaluation: EvaluationSpec
    device: str = "cpu"
    threads: int = Field(default=1, ge=1, description="torch threads (1 is fastest for tiny models)")
    tokenizer: str | None = Field(default=None, description="tokenizer source (default: the base)")
    multi_objective: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="the candidate's dtype (auto: the merged model's own)")
    tier: Literal["auto", "resident", "streamed", "mapped"] = Field(
        default="auto", description="where the sources live (auto: the worker plans it)")
    cache_task_vectors: bool = False
    method: str | None = Field(default=None, max_length=64, description="the merge method (for the plan)")
    stacking_layers: int | None = Field(default=None, ge=1, le=4096,
                                        description="a stacking space's most layers (for the plan)")
    memory_plan: dict[str, Any] | None = Field(default=None,
                                               description="the API's plan (workers.memory_plan)")

    def source_key(self) -> tuple[str, ...]:
        """Workers are reused across trials of any study with the same sources."""
        return (self.base_model or "", *sorted(self.sources), self.device)


class TrialTimings(BaseModel):
    build_s: float = 0.0
    evaluate_s: float = 0.0
    forward_s: float = 0.0
    started_at: float = 0.0  # wall clock on the worker
    finished_at: float = 0.0


class TrialCost(BaseModel):
    """What scoring one candidate cost (service/cost.py sums them per study)."""

    examples: int = Field(default=0, ge=0, description="examples scored, over every task")
    tokens: int = Field(default=0, ge=0, description="tokens through the model's forward passes")
    worker_seconds: float = Field(default=0.0, ge=0.0, description="build + evaluate on the worker")


class RungScore(BaseModel):
    """Racing: the candidate's value after one rung (``examples`` per task at most)."""

    rung: int
    examples: int
    values: list[float]
    scores: dict[str, float]


class TrialResult(BaseModel):
    """What a worker reports for one trial (crosses the Ray boundary as the object, pickled).

    ``pruned``: racing stopped it after a rung; ``values``/``scores`` are then the partial
    ones of its last rung (``rungs[-1]``), never a full-fidelity score."""

    trial_id: int
    state: Literal["complete", "failed", "pruned"]
    values: list[float] = Field(default_factory=list, description="what the optimizer is told")
    scores: dict[str, float] = Field(default_factory=dict, description="objective -> raw value")
    metrics: dict[str, dict[str, float]] = Field(default_factory=dict)
    timings: TrialTimings = Field(default_factory=TrialTimings)
    peak_memory_bytes: int = 0
    worker: str = ""
    error: str | None = None
    attempts: int = 1
    cost: TrialCost = Field(default_factory=TrialCost)
    rungs: list[RungScore] = Field(default_factory=list, description="racing: each rung scored, in order")


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker_plan(spec: WorkerSpec):
    """This worker's memory plan, from its own resources (``workers.memory_plan``).

    The API planned the study with the limits it knew (settings, or this machine's);
    the worker plans again with what it has, keeping a tier the study forced. Raises
    ``DoesNotFit`` (the trial fails with the numbers and the fix) when it cannot.
    """
    from workers.lora import model_facts, open_models
    from workers.memory_plan import EvalFacts, WorkerLimits, detect_local_limits, eval_facts, plan_memory

    models = list(open_models(spec.sources, spec.base_model).values())  # adapters at their own size
    facts = [model_facts(m) for m in models]
    for m in models:
        m.close()
    device = "cuda" if spec.device.startswith("cuda") else "cpu"
    limits: WorkerLimits = detect_local_limits(device)
    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(spec.device))
        limits = WorkerLimits(device="cuda", device_bytes=int(free), host_bytes=limits.host_bytes)
    evaluation: EvalFacts | None = None
    batch = getattr(spec.evaluation, "batch_size", None)
    if isinstance(batch, int):
        evaluation = eval_facts(models[0].config, batch, None)
    method = spec.method or ("passthrough" if spec.base_model is None else "ties")
    return plan_memory(sources=facts, base=spec.base_model, method=method,
                       stacking_layers=spec.stacking_layers if method == "passthrough" else None,
                       candidate_dtype=spec.dtype, limits=limits, evaluation=evaluation,
                       tier=spec.tier, cache_task_vectors=spec.cache_task_vectors)


class TrialRunner:
    """Holds a study's sources, a resident candidate and an evaluator, for many trials."""

    def __init__(self, spec: WorkerSpec | dict[str, Any]):
        import torch

        from evaluators import registry
        from workers.candidate import CandidateBuilder

        self.spec = spec if isinstance(spec, WorkerSpec) else WorkerSpec.model_validate(spec)
        torch.set_num_threads(self.spec.threads)
        self.plan = worker_plan(self.spec)
        self.builder = CandidateBuilder(self.spec.sources, base=self.spec.base_model,
                                        device=self.spec.device, tier=self.plan.tier,
                                        dtype=self.spec.dtype,
                                        cache_task_vectors=self.plan.cache_task_vectors)
        self.evaluator = registry.create(self.spec.evaluation)
        self._tokenizer = None
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            ref = self.spec.tokenizer or self.spec.base_model or self.spec.sources[0]
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.builder.models[ref].path))
        return self._tokenizer

    def run(self, trial_id: int, recipe: Recipe | dict[str, Any],
            race: RaceTicket | None = None) -> TrialResult:
        """Build and score ``recipe`` (the object, used as it is, or its JSON, validated here:
        a recipe that does not validate fails the trial with the reason). With ``race``, score
        it rung by rung and stop it (``pruned``) where the ticket says it does not go on."""
        from evaluators.base import EvaluationError
        from search_spaces.recipe import Recipe

        timings = TrialTimings(started_at=time.time())
        try:
            rec = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
            start = time.perf_counter()
            model = self.builder.build(rec)
            timings.build_s = time.perf_counter() - start
            if race is not None:
                return self._race(trial_id, model, race, timings)
            start = time.perf_counter()
            result = self.evaluator.evaluate(model, self.tokenizer)
            timings.evaluate_s = time.perf_counter() - start
            timings.forward_s = result.timings.forward_s
            return self._scored(trial_id, "complete", result, timings, result.tokens)
        except EvaluationError as err:
            reason = f"evaluation failed: {err}"
        except Exception as err:  # a bad candidate fails its trial, never the worker
            reason = f"{type(err).__name__}: {err}"
            if not isinstance(err, ValueError):
                reason += "\n" + traceback.format_exc(limit=5)
        timings.finished_at = time.time()
        return TrialResult(trial_id=trial_id, state="failed", error=reason, timings=timings,
                           peak_memory_bytes=peak_memory_bytes(self.spec.device), worker=self.name)

    def _values(self, result: EvaluationResult) -> list[float]:
        from evaluators.fitness import fitness

        value = fitness(result, multi_objective=self.spec.multi_objective)
        return value if isinstance(value, list) else [value]

    def _scored(self, trial_id: int, state: Literal["complete", "pruned"], result: EvaluationResult,
                timings: TrialTimings, tokens: int, rungs: list[RungScore] | None = None) -> TrialResult:
        timings.finished_at = time.time()
        cost = TrialCost(examples=sum(result.n_examples.values()), tokens=tokens,
                         worker_seconds=timings.build_s + timings.evaluate_s)
        return TrialResult(
            trial_id=trial_id, state=state, values=self._values(result), scores=result.scores,
            metrics=result.metrics, timings=timings, cost=cost, rungs=rungs or [],
            peak_memory_bytes=peak_memory_bytes(self.spec.device), worker=self.name,
        )

    def _race(self, trial_id: int, model: Any, race: RaceTicket, timings: TrialTimings) -> TrialResult:
        """The candidate's rungs in order; after each but the last, the ticket decides."""
        rungs: list[RungScore] = []
        tokens = 0
        last = len(race.sizes) - 1
        for k, examples in enumerate(race.sizes):
            start = time.perf_counter()
            result = self.evaluator.evaluate_rung(model, self.tokenizer, examples, fresh=k == 0)
            timings.evaluate_s += time.perf_counter() - start
            timings.forward_s += result.timings.forward_s
            tokens += result.tokens
            values = self._values(result)
            rungs.append(RungScore(rung=k, examples=examples, values=values, scores=result.scores))
            if k < last and not race.goes_on(k, values[0]):
                return self._scored(trial_id, "pruned", result, timings, tokens, rungs)
        return self._scored(trial_id, "complete", result, timings, tokens, rungs)
