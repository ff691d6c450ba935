"""The study spec itself: which models to merge, how, scored on what, for how long."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evaluators.base import MAX_LIMIT, MAX_OBJECTIVES, EvaluationSpec
from search_spaces.optimizers.base import OptimizerSpec
from service.spec.bounds import (
    MAX_BUDGET_EXAMPLES,
    MAX_HELDOUT_TOP_K,
    MAX_PARALLELISM,
    MAX_SECONDS,
    MAX_SOURCES,
    MAX_TRIALS,
    MAX_WORKER_SECONDS,
)
from service.spec.examples import DEMO_EXAMPLE, MULTI_OBJECTIVE_EXAMPLE
from service.spec.fidelity import FidelitySpec
from service.spec.forms import SourceRef, SpaceForm, space_form_union, sync_space_forms
from service.spec.problems import Problem, StudyValidationError
from service.spec.pydantic_errors import problems_from_pydantic
from service.spec.text import parse_text
from service.spec_limits import MAX_NAME_CHARS, MAX_SEED, control_characters, shape_problems


class HeldoutSpec(BaseModel):
    """Re-score the best trials at the end, on examples the search never saw."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(default=3, ge=1, le=MAX_HELDOUT_TOP_K, description="how many of the best trials")
    tasks: dict[str, str] | None = Field(
        default=None, max_length=MAX_OBJECTIVES,
        description="search task -> held-out task (e.g. zoo_xl_add: zoo_xl_add_heldout), one entry per "
        "objective task; omitted: the examples each task's `limit` left out",
    )
    limit: int | float | None = Field(
        default=None, ge=0, le=MAX_LIMIT, json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_LIMIT},
        description=f"examples per named held-out task, up to {MAX_LIMIT}, or a fraction below 1 "
        "(default: all of them)"
    )

    @model_validator(mode="after")
    def _limit_needs_tasks(self) -> HeldoutSpec:
        if self.limit is not None and self.tasks is None:
            raise ValueError(
                "heldout.limit applies to named held-out tasks (heldout.tasks); without them the held-out "
                "examples are those the search's limit left out: remove heldout.limit"
            )
        odd_float = isinstance(self.limit, float) and self.limit >= 1 and not self.limit.is_integer()
        if self.limit is not None and (self.limit <= 0 or odd_float):
            raise ValueError(f"heldout.limit {self.limit} must be a count or a fraction below 1")
        return self


class Budget(BaseModel):
    """When the study stops: after ``max_trials`` trials, ``max_seconds`` of wall clock,
    ``max_worker_seconds`` of worker time or ``max_examples`` scored, whichever first (the cost
    budgets count the trials' cost, service/cost.py: cache hits are free, baselines not counted)."""

    model_config = ConfigDict(extra="forbid")
    # bounds enforced by the validators below (their messages say what to do instead)
    max_trials: int | None = Field(default=None, description=f"1 … {MAX_TRIALS}",
                                   json_schema_extra={"minimum": 1, "maximum": MAX_TRIALS})
    max_seconds: float | None = Field(
        default=None, description=f"wall-clock seconds, up to {MAX_SECONDS:.0f}",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_SECONDS})
    max_worker_seconds: float | None = Field(
        default=None, description="seconds on workers (building and scoring), summed over the workers, up "
        f"to {MAX_WORKER_SECONDS:.0f}",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_WORKER_SECONDS})
    max_examples: int | None = Field(
        default=None, description=f"examples scored, summed over the trials and tasks, 1 … "
        f"{MAX_BUDGET_EXAMPLES}",
        json_schema_extra={"minimum": 1, "maximum": MAX_BUDGET_EXAMPLES})

    @field_validator("max_trials")
    @classmethod
    def _trials(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_TRIALS:
            raise ValueError(
                f"max_trials {v} is outside 1 … {MAX_TRIALS}: "
                + ("a study needs at least one trial" if v < 1 else
                   "run successive studies instead, each starting from the previous best (optimizer.x0)")
            )
        return v

    @field_validator("max_seconds")
    @classmethod
    def _seconds(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 < v <= MAX_SECONDS):
            raise ValueError(
                f"max_seconds {v} is outside (0, {MAX_SECONDS:.0f}] (30 days): give a positive, finite "
                "number of seconds"
            )
        return v

    @field_validator("max_worker_seconds")
    @classmethod
    def _worker_seconds(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 < v <= MAX_WORKER_SECONDS):
            raise ValueError(
                f"max_worker_seconds {v} is outside (0, {MAX_WORKER_SECONDS:.0f}] (64 workers for 30 days): "
                "give a positive, finite number of seconds"
            )
        return v

    @field_validator("max_examples")
    @classmethod
    def _examples(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_BUDGET_EXAMPLES:
            raise ValueError(
                f"max_examples {v} is outside 1 … {MAX_BUDGET_EXAMPLES}: "
                + ("a study needs at least one example scored" if v < 1 else
                   "run successive studies instead, each starting from the previous best (optimizer.x0)")
            )
        return v

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if all(v is None for v in (self.max_trials, self.max_seconds, self.max_worker_seconds,
                                   self.max_examples)):
            raise ValueError("the budget is empty: set max_trials, max_seconds, max_worker_seconds or "
                             "max_examples (any of them; the first reached stops the study)")
        return self


class WorkerOptions(BaseModel):
    """How the study's workers hold the models in memory (docs/workers.md, "Memory: tiers and
    sizing a worker"). Validation plans the memory from the models' headers and refuses a study
    that no tier can hold."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of the candidate (the one resident model); auto: the space's "
        "out_dtype, else the base's own dtype. Merging is done in float32 either way")
    tier: Literal["auto", "resident", "streamed", "mapped"] = Field(
        default="auto", description="where the sources live: resident (on the compute device), streamed "
        "(pinned host memory, copied per tensor: GPU workers only), mapped (read through the page cache); "
        "auto: the fastest that fits")
    cache_task_vectors: bool = Field(
        default=False, description="keep the float32 task vectors on the device between candidates when the "
        "resident tier has room for them (faster; else they are formed per chunk)")




class StudySpec(BaseModel):
    """A study: which models to merge, how, scored on what, for how long."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [DEMO_EXAMPLE, MULTI_OBJECTIVE_EXAMPLE]},
    )

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS,
                      description="for people: shown on the dashboard (no control characters)")
    sources: list[SourceRef] = Field(
        min_length=1, max_length=MAX_SOURCES,
        description="the models merged: folders under the server's model roots (absolute, or relative to "
        "a root), hub ids 'org/name' the server allows, or {study: <id>, trial: best} for another "
        "study's model",
    )
    base_model: SourceRef | None = Field(
        default=None,
        description="parameter space: the model the sources were fine-tuned from (all methods but "
        "linear); stacking: the owner of embeddings, final norm and head (default: the first source)",
    )
    space: SpaceForm = Field(description="what is searched; `kind` picks parameter or stacking")
    evaluation: EvaluationSpec = Field(description="how candidates are scored (docs/evaluation.md)")
    multi_objective: bool = Field(
        default=False,
        description="search the Pareto front of the objectives (weights ignored) instead of their weighted "
        "sum; needs nsga2, optuna-tpe or random",
    )
    heldout: HeldoutSpec | None = Field(
        default=None, description="re-score the best trials on held-out examples when the study ends"
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="how points are proposed")
    budget: Budget = Field(description="when the study stops")
    fidelity: FidelitySpec | None = Field(
        default=None, description="race candidates over growing rungs of examples and stop the weak ones "
        "early (asynchronous successive halving; docs/evaluation.md, 'Racing'); default: every candidate "
        "is scored on every example of its limit")
    parallelism: int = Field(default=1, ge=1, le=MAX_PARALLELISM, description="candidates scored at once")
    trial_timeout_seconds: float | None = Field(
        default=None, ge=1, le=7 * 24 * 3600.0,
        description="a trial's deadline, from when its worker is ready: past it the worker is replaced and "
        "the trial run again (an attempt); default: 5 × the longest completed trial, at least 60 s, and "
        "3600 s until one completed; a new worker's first trial gets 600 s more (docs/workers.md)",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seeds the optimizer: the same spec and seed "
                      "give the same proposals")
    trust_remote_code: bool = Field(
        default=False, description="allow models that ship their own code; refused unless the server "
        "enables it (EVOMERGE_TRUST_REMOTE_CODE)",
    )
    worker: WorkerOptions = Field(
        default_factory=WorkerOptions,
        description="the candidate's dtype and the workers' memory tier (default: planned from the models)")

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        bad = control_characters(value)
        if bad:
            raise ValueError(f"the name contains control characters ({', '.join(bad[:5])}): remove them")
        if not value.strip():
            raise ValueError("the name is blank")
        return value

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_data(cls, data: Any) -> StudySpec:
        """Validate parsed data; raises :class:`StudyValidationError`."""
        if not isinstance(data, Mapping):
            raise StudyValidationError([Problem(
                loc=[], msg=f"a study spec is a mapping of fields, got {type(data).__name__}",
                fix="write the spec as a YAML mapping or a JSON object (docs/study-spec.md has examples)",
                type="spec_not_a_mapping",
            )])
        _follow_space_registry()
        shape = shape_problems(data)
        if shape:
            raise StudyValidationError([Problem(loc=loc, msg=msg, fix=fix, type="spec_shape")
                                        for loc, msg, fix in shape])
        try:
            # strict, through JSON: `true` is no count and "5" no number, while a JSON array
            # still fills a tuple (pydantic's strict Python mode would refuse that)
            return cls.model_validate_json(json.dumps(dict(data), allow_nan=True), strict=True)
        except ValidationError as err:
            raise StudyValidationError(problems_from_pydantic(err)) from None

    @classmethod
    def from_text(cls, text: str | bytes) -> StudySpec:
        """Parse a spec written in YAML or JSON (JSON is YAML); raises :class:`StudyValidationError`."""
        return cls.from_data(parse_text(text))

    @classmethod
    def from_file(cls, path: str | Path) -> StudySpec:
        return cls.from_text(Path(path).read_text(encoding="utf-8"))

    def to_yaml(self) -> str:
        """The spec as YAML, without the fields left at their defaults."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["space"] = {"kind": self.space.kind, **data.get("space", {})}  # type: ignore[union-attr]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _follow_space_registry() -> None:
    """Let ``space`` take exactly the kinds registered now: the field is re-typed when a space was
    registered or removed since it was typed (a plugin registered at run time)."""
    sync_space_forms()
    forms = space_form_union()
    if StudySpec.model_fields["space"].annotation != forms:
        StudySpec.model_fields["space"].annotation = forms
        StudySpec.model_rebuild(force=True)
