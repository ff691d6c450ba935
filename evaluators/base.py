"""The evaluator contract: what a worker hands an evaluator and what it gets back.

Everything here is light (pydantic only): the API service imports these specs to
validate a study before any worker exists. Heavy imports (torch, lm_eval) live in the
evaluator implementations, inside the methods that need them.
"""

from __future__ import annotations

import math
import traceback
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds of an evaluation spec (docs/study-spec.md lists them with the study's other bounds).
MAX_OBJECTIVES = 32
MAX_LIMIT = 1_000_000  # examples per task
MAX_FEWSHOT = 64
MAX_BATCH_SIZE = 4096
MAX_WEIGHT = 1_000_000.0
MAX_SEED = 2**32 - 1
MAX_NAME = 200  # task, metric, split and objective names


class ObjectiveSpec(BaseModel):
    """One thing a candidate is scored on: a metric of a task, with its weight.

    ``metric`` is a metric name (``exact_match``) or ``metric,filter``
    (``exact_match,strict-match``) for tasks whose results go through several filters.
    """

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=MAX_NAME)
    metric: str = Field(min_length=1, max_length=MAX_NAME)
    weight: float = Field(default=1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT)
    higher_is_better: bool | None = None  # None: take the task's / metric's own direction
    # examples per task; a float < 1 is a fraction
    limit: int | float | None = Field(
        default=None, le=MAX_LIMIT, json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_LIMIT})
    num_fewshot: int | None = Field(default=None, ge=0, le=MAX_FEWSHOT)
    # score on this dataset split instead of the task's test split
    split: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)
    # the objective's key in results; default "task/metric"
    name: str | None = Field(default=None, min_length=1, max_length=MAX_NAME)

    @field_validator("limit")
    @classmethod
    def _positive_limit(cls, v: int | float | None) -> int | float | None:
        if v is None:
            return v
        if v <= 0:
            raise ValueError(f"limit must be positive (a count, or a fraction below 1), got {v}")
        if isinstance(v, float) and v >= 1:
            if not v.is_integer():
                raise ValueError(f"limit {v} is neither a count nor a fraction below 1")
            return int(v)
        return v

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"weight must be a finite number, got {v}")
        return v

    @property
    def key(self) -> str:
        return self.name or f"{self.task}/{self.metric}"


class EvaluationSpec(BaseModel):
    """How a study scores its candidates: which evaluator, on which objectives.

    ``options`` are the evaluator's own settings, checked against its ``Options``
    model by the registry (``evaluators.registry.validate_spec``).
    """

    model_config = ConfigDict(extra="forbid")

    evaluator: str = "lm_eval"
    objectives: list[ObjectiveSpec] = Field(min_length=1, max_length=MAX_OBJECTIVES)
    # picks the `limit` subset and few-shot examples: same for every candidate
    seed: int = Field(default=1234, ge=0, le=MAX_SEED)
    batch_size: int = Field(default=64, ge=1, le=MAX_BATCH_SIZE)
    subset: Literal["search", "holdout"] = "search"  # holdout: the examples `limit` left out
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_keys(self) -> EvaluationSpec:
        keys = [o.key for o in self.objectives]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(
                f"objectives {dupes} appear more than once; give repeated task/metric pairs "
                "distinct `name`s or remove the duplicates"
            )
        return self

    def holdout(self) -> EvaluationSpec:
        """The same spec scored on the examples the search did not see."""
        return self.model_copy(update={"subset": "holdout"})


class ObjectiveScore(BaseModel):
    """The measured value of one objective, with what fitness needs to use it."""

    key: str
    task: str
    metric: str
    value: float
    weight: float
    higher_is_better: bool


class Timings(BaseModel):
    """Where the seconds of one evaluation went."""

    total_s: float  # the whole evaluate() call
    forward_s: float  # inside the model's forward passes
    model_calls: int  # number of forward passes
    prepare_s: float = 0.0  # one-time set-up paid by this call (the first call of a worker)

    @property
    def overhead_s(self) -> float:
        """Time outside the forward passes and the one-time set-up."""
        return max(self.total_s - self.prepare_s - self.forward_s, 0.0)


class EvaluationResult(BaseModel):
    """The scores of one candidate."""

    objectives: list[ObjectiveScore]
    metrics: dict[str, dict[str, float]]  # task -> "metric,filter" -> value (numeric ones)
    n_examples: dict[str, int]  # task -> examples scored
    timings: Timings
    tokens: int = 0  # tokens through the model's forward passes (prompts, continuations, generated)

    @property
    def scores(self) -> dict[str, float]:
        """Objective key -> raw metric value."""
        return {o.key: o.value for o in self.objectives}


class EvaluationError(Exception):
    """A failed evaluation: the trial fails with ``reason``; it never becomes a score.

    Raised for a crashed evaluation (``detail`` holds the traceback) and for a metric
    that came out NaN or infinite.
    """

    def __init__(self, reason: str, *, task: str | None = None, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.task = task
        self.detail = detail

    def __reduce__(self):  # keep task/detail when pickled (Ray sends exceptions across processes)
        return (_rebuild_error, (self.reason, self.task, self.detail))

    def __str__(self) -> str:
        return f"[{self.task}] {self.reason}" if self.task else self.reason


def _rebuild_error(reason: str, task: str | None, detail: str | None) -> EvaluationError:
    return EvaluationError(reason, task=task, detail=detail)


@contextmanager
def failures_as_evaluation_errors() -> Iterator[None]:
    """Turn any crash inside into an ``EvaluationError`` carrying the traceback."""
    try:
        yield
    except EvaluationError:
        raise
    except Exception as err:
        raise EvaluationError(f"{type(err).__name__}: {err}", detail=traceback.format_exc()) from err


class SpecError(ValueError):
    """A study's evaluation spec that cannot work (unknown task, metric, option)."""


@dataclass(frozen=True)
class PathOption:
    """An evaluator option whose values name files or folders on the server.

    The service checks every such value against the allowed roots (symlinks followed) before
    any evaluator sees the spec, and hands the evaluator the real path: what a user sends never
    makes an evaluator read outside the roots.
    """

    key: str  # the option's key in ``EvaluationSpec.options``
    holds: Literal["list", "mapping"]  # a list of paths, or a mapping of names to paths
    # task_dir: a folder of lm-eval task YAML (or ``evomerge:NAME``, a packaged one), audited
    # before it is loaded; file: a file the evaluator reads
    points_to: Literal["task_dir", "file"]
    what: str  # how a refusal names one value, e.g. "text file"


class Evaluator(ABC):
    """Scores in-memory models. One instance per worker: set-up is paid once.

    Subclasses set ``name`` and ``Options`` (and ``path_options`` when an option names files
    on the server) and register with ``@evaluators.registry.register``. ``__init__`` must not
    load models or touch the accelerator; the first ``evaluate`` may do one-time preparation
    (building tasks).
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    path_options: ClassVar[tuple[PathOption, ...]] = ()

    def __init__(self, spec: EvaluationSpec) -> None:
        self.spec = spec
        self.options = self.Options.model_validate(spec.options)

    @classmethod
    def validate(cls, spec: EvaluationSpec) -> EvaluationSpec:
        """Check a spec without a model; return it with metrics and directions resolved.

        Raises ``SpecError`` saying what is wrong and how to fix it.
        """
        cls.Options.model_validate(spec.options)
        return spec

    def prepare(self, model: Any, tokenizer: Any) -> float:
        """Pay the one-time set-up now (else the first ``evaluate`` does); returns seconds."""
        return 0.0

    # Racing (multi-fidelity): whether ``evaluate_rung`` scores nested prefixes of the examples
    supports_rungs: ClassVar[bool] = False

    def evaluate_rung(self, model: Any, tokenizer: Any, examples: int, *, fresh: bool) -> EvaluationResult:
        """Score ``model`` on the first ``examples`` of each task's seeded order of its search
        examples (all of them where a task has fewer), reusing what earlier rungs of the same
        candidate scored unless ``fresh`` (a new candidate: rung 0). The examples of a smaller
        rung are always a prefix of a larger one's, the same for every candidate.
        """
        raise NotImplementedError(f"the {self.name} evaluator does not score rungs (racing)")

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any) -> EvaluationResult:
        """Score ``model`` (an in-memory ``PreTrainedModel``) as it is now.

        Raises ``EvaluationError`` when the evaluation fails or yields a non-finite metric.
        """
