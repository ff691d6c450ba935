"""What the controller holds in memory for one active study, rebuilt from the database.

A :class:`StudyRuntime` is a cache: the validated spec (re-validated from ``Study.spec``),
its search space, its optimizer (kept where the optimizer declares: Optuna's storage, or
pycma's bytes in ``Study.optimizer_state``; service/controller/optimizer_store.py) and the
trials this process has in flight. Losing it loses nothing: a new controller builds it again
from the rows (principle 3 of docs/DESIGN).

Imports stay light at module level: the optimizers (Optuna, pycma) and workers (Ray,
torch) are imported inside the functions that build them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from service.stored_study import StoredStudy
from service.validation import ValidatedStudy, validate_study

if TYPE_CHECKING:
    from search_spaces.base import SearchSpace
    from search_spaces.recipe import Recipe
    from service.controller.optimizer_store import OptimizerStore
    from service.controller.race_board import RaceBoard
    from service.cost import StudyCost
    from service.score_cache import ScoreCacheContext
    from service.settings import Settings
    from service.spec import StudySpec
    from workers.trial import WorkerSpec


@dataclass
class HeldoutRun:
    """The end-of-study re-scoring in progress: trial row id -> trial number."""

    pool: Any
    pending: dict[int, int] = field(default_factory=dict)
    queue: list[tuple[int, Any]] = field(default_factory=list)  # (trial row id, recipe) not yet submitted


@dataclass
class StudyRuntime:
    """An active study as this process knows it (everything here is derived from rows)."""

    study_id: str
    validated: ValidatedStudy
    space: SearchSpace
    store: OptimizerStore  # the study's optimizer, and where its state is kept
    pool_key: str
    elapsed_base: float  # Study.elapsed_seconds when this runtime started counting
    next_number: int
    used: int = 0  # trials counting towards max_trials: rows at open + rows inserted since
    counting_since: float | None = None  # monotonic time since which elapsed grows
    in_flight: dict[int, int] = field(default_factory=dict)  # trial row id -> number
    heldout: HeldoutRun | None = None
    baselines: list[tuple[int, Any]] = field(default_factory=list)  # (baseline id, recipe) to dispatch
    paths: dict[str, str] = field(default_factory=dict)  # other studies' models: placeholder -> folder
    paused: bool = False
    last_saved: float = field(default_factory=time.monotonic)
    worker: WorkerSpec | None = None  # the search workers' spec, validated once (the scheduler's)
    cost: StudyCost | None = None  # the last recount of its cost (service/cost.py); None: not yet read
    # the score cache's digests (service/score_cache.py), taken at the first dispatch, and the keys of
    # the candidates in flight; None: not yet taken
    score_cache: ScoreCacheContext | None = None
    race: RaceBoard | None = None  # a raced study's rung values (service/controller/race_board.py)

    @overload
    def resolve(self, recipe: Recipe) -> Recipe: ...
    @overload
    def resolve(self, recipe: dict[str, Any]) -> dict[str, Any]: ...

    def resolve(self, recipe: Recipe | dict[str, Any]) -> Recipe | dict[str, Any]:
        """A recipe with other studies' placeholders replaced by their export folders.

        A :class:`Recipe` stays an object (a trial's recipe, straight from the space's ``decode``);
        the JSON form (a baseline's, service.baselines) comes back as JSON."""
        if not self.paths:
            return recipe
        from search_spaces.recipe import Recipe
        from search_spaces.sources import resolve_sources

        if isinstance(recipe, Recipe):
            return resolve_sources(recipe, self.paths)
        return resolve_sources(Recipe.model_validate(recipe), self.paths).model_dump(mode="json")

    @property
    def spec(self) -> StudySpec:
        return self.validated.spec

    @property
    def parallelism(self) -> int:
        return self.validated.spec.parallelism

    def elapsed(self) -> float:
        """Seconds this study has been running (paused time excluded), across restarts."""
        if self.counting_since is None:
            return self.elapsed_base
        return self.elapsed_base + (time.monotonic() - self.counting_since)

    def count(self, running: bool) -> None:
        """Start or stop the elapsed-time clock (paused studies do not use their budget)."""
        if running and self.counting_since is None:
            self.counting_since = time.monotonic()
        elif not running and self.counting_since is not None:
            self.elapsed_base = self.elapsed()
            self.counting_since = None


def validate_stored(spec: Any, settings: Settings, paths: dict[str, str] | None = None) -> ValidatedStudy:
    """Validate a stored ``Study.spec`` again (models may have moved since it was submitted).

    The API stores the whole validated study (its ``spec`` key holds what the user
    submitted); a bare study spec is accepted too.
    """
    spec = StoredStudy.load(spec).spec
    if not paths:
        return validate_study(spec, settings)
    return validate_study(spec, settings, resolve_study_ref=lambda ref: paths[ref.placeholder()])


def worker_spec_data(validated: ValidatedStudy, settings: Settings, *,
                     heldout: bool = False, paths: dict[str, str] | None = None) -> dict[str, Any]:
    """The fields of ``workers.trial.WorkerSpec`` for this study on this server (``paths``:
    another study's model placeholder -> its export folder, service.study_refs): with the
    memory plan validation made (``dtype``, ``tier``, ``cache_task_vectors``, ``memory_plan``)."""
    data = dict(validated.worker_spec)
    if paths:
        data["sources"] = [paths.get(s, s) for s in data["sources"]]
        for key in ("base_model", "tokenizer"):
            if data.get(key):
                data[key] = paths.get(data[key], data[key])
    if heldout:
        assert validated.heldout_evaluation is not None
        data["evaluation"] = validated.heldout_evaluation.model_dump(mode="json")
    data["threads"] = settings.worker_threads
    data["device"] = "cuda" if settings.worker_num_gpus > 0 else "cpu"
    return data


def build_worker_spec(validated: ValidatedStudy, settings: Settings, *,
                heldout: bool = False, paths: dict[str, str] | None = None) -> WorkerSpec:
    """:func:`worker_spec_data` as a ``workers.trial.WorkerSpec``: the one validation of a
    pool's spec. The object is what crosses to the actors (Ray pickles it; they do not
    validate it again)."""
    from workers.trial import WorkerSpec

    return WorkerSpec.model_validate(worker_spec_data(validated, settings, heldout=heldout, paths=paths))


def pool_key(worker_spec: dict[str, Any]) -> str:
    """Studies share a pool when their whole worker spec is the same.

    A worker's evaluator is built once from the spec's ``evaluation``, so two studies over
    the same sources but scored differently cannot share actors (they would be scored
    with the first study's tasks); the key is therefore the full spec, not only the
    sources (``WorkerSpec.source_key``). The memory plan's report (``memory_plan``) is left
    out: what a worker does with memory is in ``dtype``, ``tier`` and ``cache_task_vectors``,
    and the report's numbers (the limits it was planned with) may differ between two
    validations of the same study.
    """
    return json.dumps({k: v for k, v in worker_spec.items() if k != "memory_plan"}, sort_keys=True,
                      default=str)

