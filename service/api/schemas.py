"""Response models of the REST API: what the OpenAPI schema promises, exactly."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field

from service.cost import StudyCost
from service.db.models import Baseline, Study, StudyStatus, Trial, TrialState
from service.spec import Problem
from service.stored_study import StoredStudy

T = TypeVar("T")

_NOW = "2026-01-01T12:00:00Z"


class ErrorOut(BaseModel):
    """An error that is not about the study spec: ``detail`` says what is wrong and what to do."""

    detail: str = Field(examples=["no study 'a1b2c3d4e5f6' (GET /studies lists them)"])


class ProblemsOut(BaseModel):
    """A refused study spec (422): every problem, each with where, what and how to fix it."""

    detail: list[Problem]

    model_config = ConfigDict(json_schema_extra={"examples": [{"detail": [{
        "loc": ["sources", 1], "type": "model_not_found",
        "msg": "model 'v2-seed0/lang' not found under the allowed roots (/models). Close matches: language.",
        "fix": "give its path relative to a root, or its absolute path inside one"}]}]})


class ControllerHealthOut(BaseModel):
    """The study controller this API process runs (absent under ``evomerge serve --no-controller``)."""

    mode: Literal["process", "in-process"] = Field(
        description="process: a child process that `evomerge serve` supervises (the default); in-process: "
                    "a thread of the API process (`evomerge serve --controller in-process`)")
    running: bool = Field(description="whether the controller runs now (its process, or its thread)")
    pid: Union[int, None] = Field(None, description="its process id while it runs (mode process)")
    restarts: int = Field(0, description="how often it was started again after it exited or was killed")
    last_exit: Union[str, None] = Field(None, description="how its process last ended",
                                        examples=["killed by SIGKILL", "exit code 1"])
    up_since: Union[datetime, None] = Field(None, description="when its running process started",
                                            examples=[_NOW])
    next_start_in_s: Union[float, None] = Field(None, description="while it is down: when it starts again")


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"
    version: str = Field(examples=["0.1.0"])
    database: str = Field(description="the database backend", examples=["sqlite", "postgresql"])
    auth: bool = Field(description="whether requests need a bearer token")
    controller: Union[ControllerHealthOut, None] = None


class HealthDegradedOut(BaseModel):
    """The service answers but cannot do its work (503): every problem, one line each."""

    status: Literal["degraded"] = "degraded"
    detail: str = Field(description="the problems, joined",
                        examples=["the study controller is stalled since 2026-01-01 12:00:00 UTC: the disk "
                                  "holding the SQLite database is full (OperationalError): free space …"])
    problems: list[str] = Field(default_factory=list, description="what is wrong and what to do, one line "
                                "each (empty while the service is starting up)")
    version: Union[str, None] = Field(None, examples=["0.1.0"])
    database: Union[str, None] = Field(None, examples=["sqlite", "postgresql"])
    auth: Union[bool, None] = None
    controller: Union[ControllerHealthOut, None] = None


def submitted_spec(study: Study) -> dict[str, Any]:
    """The spec as submitted (the API stores the validated study, service.stored_study)."""
    return StoredStudy.from_row(study).spec


class StudyOut(BaseModel):
    """A study: its status and progress. ``spec`` is the spec as submitted."""

    id: str = Field(examples=["a1b2c3d4e5f6"])
    name: str = Field(examples=["zoo: xl addition by per-layer TIES"])
    status: StudyStatus
    owner: Union[str, None] = Field(
        description="the name of the token that submitted it ('local' without auth)")
    created_at: datetime
    updated_at: datetime
    trials_done: int = Field(description="complete trials")
    trials_failed: int
    max_trials: Union[int, None] = Field(description="the budget's max_trials (None: time budget only)")
    max_seconds: Union[float, None] = Field(description="the budget's max_seconds")
    elapsed_seconds: float
    best_trial_number: Union[int, None]
    best_value: Union[float, None] = Field(
        description="the best fitness so far (higher is better); None for a multi-objective study")
    multi_objective: bool = Field(
        False, description="its best is a Pareto front (GET /studies/{id}/front), not one trial")
    error: Union[str, None] = Field(description="why the study failed")
    status_reason: Union[str, None] = Field(
        None, description="why an unfinished study does not progress now (e.g. the controller is stalled "
                          "on a full disk), and what to do; None while all is well")
    warnings: list[str] = Field(default_factory=list, description="accepted at submission, but worth a look")
    spec: dict[str, Any] = Field(description="the study spec as submitted (docs/study-spec.md)")
    memory_plan: Union[dict[str, Any], None] = Field(
        None, description="what one worker needs, as validation planned it from the models' headers: `tier` "
        "(resident, streamed or mapped), `device_bytes`, `host_bytes`, `page_cache_bytes`, "
        "`moved_bytes_per_candidate`, `breakdown`, `limits`, `tiers` (each tier's needs and why it does or "
        "does not fit), `notes` (docs/workers.md, \"Memory: tiers and sizing a worker\"); None for a study "
        "stored before plans existed")
    cost: Union[StudyCost, None] = Field(
        None, description="what the study spent on evaluation (examples, tokens, worker-seconds), and what "
        "pruning and the score cache saved it, recounted from its trials and baselines with every result "
        "(docs/evaluation.md, \"Cost\"); None until its first result")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "a1b2c3d4e5f6", "name": "zoo: xl addition by per-layer TIES", "status": "running",
        "owner": "alice", "created_at": _NOW, "updated_at": _NOW, "trials_done": 42, "trials_failed": 0,
        "max_trials": 300, "max_seconds": 3600.0, "elapsed_seconds": 512.3, "best_trial_number": 37,
        "best_value": 0.61, "error": None, "warnings": [],
        "spec": {"name": "zoo: xl addition by per-layer TIES", "budget": {"max_trials": 300}},
        "memory_plan": {"tier": "resident", "device": "cpu", "candidate_dtype": "float32",
                        "device_bytes": 2_400_000, "host_bytes": 0, "page_cache_bytes": 0,
                        "moved_bytes_per_candidate": 1_100_000, "cache_task_vectors": False},
        "cost": {"spent": {"examples": 4200, "tokens": 1_350_000, "worker_seconds": 512.0, "trials": 42},
                 "saved_by_cache": {"examples": 0, "tokens": 0, "worker_seconds": 0.0, "trials": 0,
                                    "baselines": 0},
                 "saved_by_pruning": {"examples": 0, "worker_seconds": 0.0, "trials": 0},
                 "baselines": {"examples": 300, "tokens": 96_000, "worker_seconds": 30.5, "trials": 3},
                 "full_examples": 100}}]})

    @classmethod
    def of(cls, study: Study) -> StudyOut:
        stored = StoredStudy.from_row(study)
        spec = stored.spec
        budget = spec.get("budget") or {}
        return cls(
            id=study.id, name=study.name, status=study.status, owner=study.owner,
            created_at=study.created_at, updated_at=study.updated_at,
            trials_done=study.trials_done or 0, trials_failed=study.trials_failed or 0,
            max_trials=budget.get("max_trials"), max_seconds=budget.get("max_seconds"),
            elapsed_seconds=study.elapsed_seconds or 0.0, best_trial_number=study.best_trial_number,
            best_value=study.best_value, error=study.error, multi_objective=bool(spec.get("multi_objective")),
            warnings=stored.warnings, spec=spec, memory_plan=stored.memory_plan,
            cost=StudyCost.model_validate(study.cost) if isinstance(study.cost, dict) else None,
        )


class TrialOut(BaseModel):
    """One candidate: its point, recipe, scores and fitness."""

    number: int = Field(examples=[37])
    state: TrialState
    params: Union[dict[str, Any], list[Any], None] = Field(description="the optimizer's point")
    recipe: Union[dict[str, Any], None] = Field(description="the merge recipe (docs/recipe-format.md)")
    scores: Union[dict[str, Any], None] = Field(description="objective key -> score")
    metrics: Union[dict[str, Any], None]
    values: Union[list[Any], dict[str, Any], None] = Field(
        description="the fitness values told to the optimizer")
    fitness: Union[float, None] = Field(description="higher is better")
    failure_reason: Union[str, None]
    attempts: int
    timings: Union[dict[str, Any], None]
    worker: Union[str, None]
    examples: Union[int, None] = Field(None, description="examples scored (None: not finished)")
    tokens: Union[int, None] = Field(None, description="tokens through the model's forward passes")
    worker_seconds: Union[float, None] = Field(None, description="seconds on its worker: build + evaluate")
    cached: bool = Field(False, description="a score cache hit: its cost fields hold what it saved")
    rung: Union[int, None] = Field(None, description="racing: the last rung scored (None: not raced)")
    created_at: datetime
    started_at: Union[datetime, None]
    finished_at: Union[datetime, None]

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "number": 37, "state": "complete", "params": {"x0": 0.3}, "recipe": {"merge_method": "ties"},
        "scores": {"zoo_xl_add/exact_match": 0.61}, "metrics": None, "values": [0.61], "fitness": 0.61,
        "failure_reason": None, "attempts": 1, "timings": {"eval_s": 3.2}, "worker": "worker-0",
        "examples": 100, "tokens": 32_000, "worker_seconds": 3.4, "cached": False, "rung": None,
        "created_at": _NOW, "started_at": _NOW, "finished_at": _NOW}]})

    @classmethod
    def of(cls, trial: Trial) -> TrialOut:
        return cls(
            number=trial.number, state=trial.state, params=trial.params, recipe=trial.recipe,
            scores=trial.scores, metrics=trial.metrics, values=trial.values, fitness=trial.fitness,
            failure_reason=trial.failure_reason, attempts=trial.attempts or 0, timings=trial.timings,
            worker=trial.worker, examples=trial.examples, tokens=trial.tokens,
            worker_seconds=trial.worker_seconds, cached=bool(trial.cached), rung=trial.rung,
            created_at=trial.created_at, started_at=trial.started_at, finished_at=trial.finished_at,
        )


class TrialItemOut(TrialOut):
    """A trial in a list: as ``TrialOut``, but ``params`` and ``recipe`` (the large fields) are there only
    when the page asks for them (``include=recipe,params``); GET /studies/{id}/trials/{n} has them all."""

    params: Union[dict[str, Any], list[Any], None] = Field(
        None, description="the optimizer's point; only with include=params")
    recipe: Union[dict[str, Any], None] = Field(
        None, description="the merge recipe (docs/recipe-format.md); only with include=recipe")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "number": 37, "state": "complete", "scores": {"zoo_xl_add/exact_match": 0.61}, "metrics": None,
        "values": [0.61], "fitness": 0.61, "failure_reason": None, "attempts": 1, "timings": {"eval_s": 3.2},
        "worker": "worker-0", "examples": 100, "tokens": 32_000, "worker_seconds": 3.4, "cached": False,
        "rung": None, "created_at": _NOW, "started_at": _NOW, "finished_at": _NOW}]})


class TrialPage(BaseModel):
    """One page of a study's trials: ``items`` from ``offset`` (or after ``after``), ``total`` matching
    in all, and ``next_after``: the cursor of the next page (``?after=``), None on the last one."""

    items: list[TrialItemOut]
    total: int = Field(examples=[1])
    limit: int = Field(examples=[50])
    offset: int = Field(examples=[0])
    next_after: Union[int, None] = Field(
        None, examples=[49], description="with sort=number or -number: pass it as `after` for the next page; "
                                         "None when there is none (or for the other sorts)")


class BaselineOut(BaseModel):
    """A reference point: a source model alone (``source``), the uniform average (``uniform``),
    or plain task arithmetic (``task_arithmetic``), scored like a trial."""

    name: str = Field(examples=["source: v2-seed0/math"])
    kind: str = Field(examples=["source"])
    state: TrialState
    recipe: Union[dict[str, Any], None]
    scores: Union[dict[str, Any], None]
    values: Union[list[Any], None]
    fitness: Union[float, None]
    heldout_scores: Union[dict[str, Any], None] = Field(
        description="on the held-out split, if the spec has one")
    error: Union[str, None]
    examples: Union[int, None] = Field(None, description="examples scored on the search evaluation")
    tokens: Union[int, None] = Field(None, description="tokens through the model's forward passes")
    worker_seconds: Union[float, None] = Field(None, description="seconds on its worker: build + evaluate")
    cached: bool = Field(False, description="a score cache hit: its cost fields hold what it saved")

    @classmethod
    def of(cls, b: Baseline) -> BaselineOut:
        return cls(name=b.name, kind=b.kind, state=b.state, recipe=b.recipe, scores=b.scores,
                   values=b.values if isinstance(b.values, list) else None, fitness=b.fitness,
                   heldout_scores=b.heldout_scores, error=b.error, examples=b.examples, tokens=b.tokens,
                   worker_seconds=b.worker_seconds, cached=bool(b.cached))


class Page(BaseModel, Generic[T]):
    """One page of a list: ``items`` from ``offset``, ``total`` matching in all."""

    items: list[T]
    total: int = Field(examples=[1])
    limit: int = Field(examples=[50])
    offset: int = Field(examples=[0])
