"""The optimizer interface: ``ask(n) -> points``, ``tell(point_id, result)``.

A point is a dict gene name -> float in the optimizer's coordinates (within each gene's
``[coord_low, coord_high]``; ``space.decode`` turns it into a recipe). Every point has
a stable integer ``id`` (the Optuna trial number, or pycma's own counter kept in its
state) so the service can tell a result back later, even after a restart.

Use is asynchronous: ``ask`` may be called again before earlier points are told, and
results may come back in any order. A result is a number (single objective), a
sequence of numbers (one per direction), or :class:`Failure` — a candidate that could
not be built or scored. A failure is never told to an optimizer as a made-up score; a
non-finite value counts as a failure.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from search_spaces.genes import GeneSet
from search_spaces.recipe import Recipe

Direction = Literal["maximize", "minimize"]
# How an optimizer's state outlives the process (:attr:`Optimizer.persistence`):
# "state": ``state()`` bytes, saved by the caller and handed back to ``create(state=...)``;
# "storage": kept in the storage handed to ``create(storage=..., study_name=...)`` (an Optuna storage).
Persistence = Literal["state", "storage"]


class OptimizerError(ValueError):
    """Misuse of an optimizer (unknown point, told twice, wrong number of values)."""


@dataclass(frozen=True)
class Point:
    """A proposal: ``id`` to tell its result back, ``params`` gene -> coordinate."""

    id: int
    params: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)  # e.g. the CMA-ES generation


@dataclass(frozen=True)
class Failure:
    """The candidate could not be merged or scored; ``reason`` is for people."""

    reason: str = ""


@dataclass(frozen=True)
class Pruned:
    """Racing stopped the candidate after rung ``rung`` of ``rungs`` (0-based; the last rung is
    full fidelity), where it scored ``values``: a partial score, never to be read as a full one.
    Each optimizer says how it takes this (:meth:`Optimizer._tell_pruned`)."""

    values: tuple[float, ...]
    rung: int
    rungs: int


Result = Union[float, Sequence[float], Failure, Pruned, None]


# Bounds of an optimizer spec (docs/study-spec.md lists them with the study's other bounds).
MAX_POPULATION = 1024  # CMA-ES / NSGA-II population
MAX_SEED = 2**32 - 1  # what numpy's and Optuna's samplers take
MAX_DIRECTIONS = 32  # one per objective
MAX_OPTIONS = 32


class OptimizerSpec(BaseModel):
    """How to search: which optimizer, its seed and its few knobs."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="optuna-cmaes", max_length=64,
                      description="see search_spaces.optimizers.names()")
    seed: int = Field(default=0, ge=0, le=MAX_SEED,
                      description="the same spec and seed give the same proposals")
    directions: list[Direction] = Field(
        default_factory=lambda: ["maximize"], min_length=1, max_length=MAX_DIRECTIONS,
        description="one per objective; more than one needs a multi-objective optimizer (nsga2)",
    )
    population_size: int | None = Field(
        default=None, ge=2, le=MAX_POPULATION,
        description=f"CMA-ES / NSGA-II population, 2 … {MAX_POPULATION} (default: the library's)"
    )
    sigma0: float | None = Field(
        default=None, gt=0, le=1, description="CMA-ES initial step, as a fraction of each gene's range"
    )
    x0: Recipe | None = Field(default=None, description="start from this recipe (encoded by the space)")
    options: dict[str, Any] = Field(default_factory=dict, max_length=MAX_OPTIONS,
                                    description="optimizer-specific options")

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from search_spaces import optimizers

        optimizers.get(value)  # raises with the known names
        return value

    @property
    def multi_objective(self) -> bool:
        return len(self.directions) > 1


def option(spec: OptimizerSpec, name: str, default: Any, kind: type, low: float | None = None,
           high: float | None = None) -> Any:
    """``spec.options[name]`` (or ``default``) checked for its type and bounds; an
    :class:`OptimizerError` says what is wrong. ``kind`` is bool, int, float or str."""
    value = spec.options.get(name, default)
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise OptimizerError(f"options.{name} of {spec.name} must be a {kind.__name__}, got {value!r}")
    if kind in (int, float) and not (math.isfinite(value) and (low is None or value >= low)
                                     and (high is None or value <= high)):
        raise OptimizerError(f"options.{name} of {spec.name} must lie in [{low}, {high}], got {value!r}")
    return value


class Optimizer(ABC):
    """One optimizer over a :class:`GeneSet`. Subclasses set ``names`` and implement
    ``_ask_one`` and ``_tell``; they declare how they persist and what budget they need
    (the class attributes below), which the service reads instead of knowing optimizers by name."""

    names: ClassVar[tuple[str, ...]]
    multi_objective: ClassVar[bool] = False
    known_options: ClassVar[frozenset[str]] = frozenset()
    # "state": the caller saves ``state()`` with every ask and tell, in the same transaction as
    # the trial it belongs to, and continues with ``create(state=...)`` (None: a fresh start; an
    # optimizer whose ``state()`` is None, the default, keeps nothing and starts afresh);
    # "storage": every ask and tell is written to the storage given to ``create``, apart from the
    # caller's records, so that after a crash :meth:`untold` lists the points to reconcile.
    persistence: ClassVar[Persistence] = "state"
    # A budget below ``trials_per_gene`` × d trials (d: the space's genes) draws a warning at
    # submission (:meth:`budget_warning`); 0: any budget will do.
    trials_per_gene: ClassVar[int] = 0
    budget_note: ClassVar[str] = ""  # why, for that warning: what the optimizer needs
    # Whether a space's declared start (SearchSpace.start) is its first point when the spec
    # gives no x0; random search, a baseline, samples the box from its first point
    uses_space_start: ClassVar[bool] = True

    def __init__(self, spec: OptimizerSpec, genes: GeneSet, x0: Mapping[str, float] | None = None):
        if spec.multi_objective and not self.multi_objective:
            raise OptimizerError(
                f"{spec.name} optimizes one objective; {len(spec.directions)} directions were given: "
                "use nsga2 (or optuna-tpe / random) for a multi-objective study"
            )
        unknown = set(spec.options) - self.known_options
        if unknown:
            raise OptimizerError(
                f"{spec.name} has no option(s) {sorted(unknown)}; it takes: "
                f"{', '.join(sorted(self.known_options)) or 'none'}"
            )
        self.spec = spec
        self.genes = genes
        self.x0 = genes.check(x0) if x0 is not None else None

    @classmethod
    def create(cls, spec: OptimizerSpec, genes: GeneSet, x0: Mapping[str, float] | None = None,
               **context: Any) -> Optimizer:
        """Build from the registry's context (``storage``, ``study_name``, ``state``);
        subclasses take the parts they use."""
        return cls(spec, genes, x0)

    # ---- interface -----------------------------------------------------------------
    def ask(self, n: int = 1) -> list[Point]:
        """``n`` new points; may be called again before earlier ones are told."""
        if n < 1:
            raise OptimizerError(f"ask(n) needs n >= 1, got {n}")
        return [self._ask_one() for _ in range(n)]

    def tell(self, point_id: int, result: Result) -> None:
        """The result of a point: its value(s), or :class:`Failure` (``None`` too)."""
        if isinstance(result, Pruned):
            partial = self._values(list(result.values))
            if partial is None:
                self._tell(int(point_id), None)
            else:
                self._tell_pruned(int(point_id), Pruned(tuple(partial), result.rung, result.rungs))
            return
        values = self._values(result)
        self._tell(int(point_id), values)

    def state(self) -> bytes | None:
        """The optimizer's full state, for optimizers that keep it themselves (pycma);
        ``None`` where the storage holds it (Optuna)."""
        return None

    def untold(self) -> list[int]:
        """Ids of points the storage holds as asked and never told. Only a ``"storage"``
        optimizer has any to report: its storage is written apart from the caller's records,
        so a crash can fall between the two (a ``"state"`` optimizer is saved with them)."""
        return []

    def progress(self) -> dict[str, Any]:
        """A few numbers for the dashboard (generation, step size, pending points)."""
        return {}

    @classmethod
    def budget_warning(cls, max_trials: int, dimension: int) -> str | None:
        """Why ``max_trials`` trials over ``dimension`` genes may be too few, or None."""
        if cls.trials_per_gene <= 0 or max_trials >= cls.trials_per_gene * dimension:
            return None
        return (f"{cls.budget_note}; with d = {dimension} genes, {max_trials} trials may end before it "
                "converges (a coarser granularity lowers d)")

    # ---- for subclasses ------------------------------------------------------------
    @abstractmethod
    def _ask_one(self) -> Point: ...

    @abstractmethod
    def _tell(self, point_id: int, values: list[float] | None) -> None:
        """``values`` is None for a failure, else one finite value per direction."""

    def _tell_pruned(self, point_id: int, pruned: Pruned) -> None:
        """A candidate racing stopped early. By default it is told as no result at all (a
        failure): an optimizer that can rank it below the candidates that went further says
        how (pycma, Optuna's pruned trials)."""
        self._tell(point_id, None)

    def _values(self, result: Result) -> list[float] | None:
        if result is None or isinstance(result, Failure):
            return None
        values = [float(result)] if isinstance(result, numbers.Real) else [float(v) for v in result]
        if len(values) != len(self.spec.directions):
            raise OptimizerError(
                f"got {len(values)} value(s) for a study with {len(self.spec.directions)} direction(s)"
            )
        if not all(math.isfinite(v) for v in values):
            return None  # NaN / inf: the candidate failed, it is not a score
        return values

    def _minimizing(self, values: list[float]) -> float:
        """The single objective as a value to minimize."""
        v = values[0]
        return -v if self.spec.directions[0] == "maximize" else v
