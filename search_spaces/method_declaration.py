"""What a merge method is, written without its arithmetic.

A :class:`MethodDeclaration` holds every fact about a merge method that something other
than its arithmetic needs: its parameters, whether it needs a base, whether it draws
random masks, how the engine may split its work, and which of its parameters a
parameter-space search gives genes. The parameter space, the memory planner, the
mergekit writer, the export card and the merge engine all read it; the implementation
(in ``workers.methods``) reads its facts from it too, so each fact is written once.

Torch-free: the API process plans and validates studies with these declarations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class _Required:
    """The default of a parameter that has none (the recipe must give it)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class MergeError(ValueError):
    """A merge cannot proceed; the message names the model, tensor and parameter."""


@dataclass(frozen=True)
class ParamSpec:
    """A declared parameter: its type, default, valid range and meaning."""

    name: str
    kind: type
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""
    start: float | None = None  # where a search starts this parameter (None: its default)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def search_start(self) -> float | None:
        """Where a search starts: ``start``, else a numeric default, else None (the
        middle of the searched range)."""
        if self.start is not None:
            return self.start
        numeric = isinstance(self.default, (int, float)) and not isinstance(self.default, bool)
        return float(self.default) if self.kind is float and numeric else None

    def check(self, value: Any, where: str) -> Any:
        """Coerce and validate one resolved value; ``where`` names model and tensor."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"parameter {self.name!r} {where}: expected true/false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise MergeError(
                    f"parameter {self.name!r} {where}: {value!r} is not one of {list(self.choices or [])}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeError(f"parameter {self.name!r} {where}: expected a number, got {value!r}")
        value = self.kind(value)
        if not math.isfinite(value):
            raise MergeError(f"parameter {self.name!r} {where}: {value} is not a finite number")
        if self.minimum is not None and value < self.minimum:
            raise MergeError(
                f"parameter {self.name!r} {where}: {value} is below the minimum {self.minimum}"
            )
        if self.maximum is not None and value > self.maximum:
            raise MergeError(
                f"parameter {self.name!r} {where}: {value} is above the maximum {self.maximum}"
            )
        return value

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.kind.__name__,
            "default": None if self.required else self.default,
            "required": self.required,
            "range": [self.minimum, self.maximum],
            "help": self.help,
        }


@dataclass(frozen=True)
class MethodDeclaration:
    """Every fact about one merge method but its arithmetic.

    ``implementation`` is where the arithmetic lives, ``"module:Class"`` (a
    ``workers.methods.MergeMethod`` subclass decorated with ``@implements(name)``).
    ``searchable`` names the parameters a parameter-space search gives genes (per model
    when they are model parameters, once when global); a method with none has no
    parameter space. The other parameters may be fixed in a parameter-space spec.
    """

    name: str
    implementation: str
    description: str = ""
    reference: str = ""
    global_params: tuple[ParamSpec, ...] = ()
    model_params: tuple[ParamSpec, ...] = ()
    searchable: tuple[str, ...] = ()
    needs_base: bool = True
    base_is_input: bool = False  # linear: the base, if listed, is an ordinary input
    min_models: int = 1  # non-base inputs
    max_models: int | None = None
    random: bool = False  # draws random masks from the recipe's seed
    # selects entries by a magnitude threshold over the whole tensor: a worker keeps a
    # magnitude histogram per task vector (workers.sparsify.MagnitudeHistogram)
    trims_by_magnitude: bool = False
    forms_task_vectors: bool = False  # works on source − base: a task-vector cache helps it
    # the output at each entry depends only on the inputs at that entry and on per-tensor
    # facts found first: the engine merges the tensor a block of rows at a time, in a
    # small float32 workspace (workers.tensor_merge)
    chunked: bool = False
    # each chunk is one fused kernel (workers.kernels) whose temporaries stay in
    # registers: it takes big chunks (CHUNK_ELEMENTS); an eager one (random draws, row
    # ranks) takes chunks that its temporaries keep in the CPU's cache
    fused: bool = False
    # What a parameter-space search of this method uses unless its spec says otherwise:
    # the range of the weight genes and fixed values of other parameters (a search of
    # TIES adds the weighted task vectors: normalize off, see docs/search-spaces.md)
    search_weight_range: tuple[float, float] = (0.0, 1.0)
    search_parameters: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"merge method {self.name!r}"
        module, _, cls = self.implementation.partition(":")
        if not module or not cls:
            raise ValueError(f"{where}: implementation {self.implementation!r} is not 'module:Class'")
        names = [p.name for p in (*self.global_params, *self.model_params)]
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: a parameter is declared twice in {names}")
        for p in self.searchable:
            spec = self.param(p)
            if spec.kind is not float:
                raise ValueError(f"{where}: searchable parameter {p!r} must be a float parameter")
        if self.fused and not self.chunked:
            raise ValueError(f"{where}: a fused method is chunked")
        if (self.forms_task_vectors or self.trims_by_magnitude) and not self.needs_base:
            raise ValueError(f"{where}: task vectors need a base")
        if self.min_models < 1 or (self.max_models is not None and self.max_models < self.min_models):
            raise ValueError(f"{where}: min_models {self.min_models}, max_models {self.max_models}")
        lo, hi = self.search_weight_range
        if not lo < hi:
            raise ValueError(f"{where}: search_weight_range {self.search_weight_range} needs low < high")
        for key, value in self.search_parameters.items():
            if key not in self.fixed_params:
                raise ValueError(f"{where}: search_parameters sets {key!r}, which is not a fixed parameter")
            self.param(key).check(value, "in search_parameters")

    def param(self, name: str) -> ParamSpec:
        for spec in (*self.global_params, *self.model_params):
            if spec.name == name:
                return spec
        raise ValueError(f"merge method {self.name!r} has no parameter {name!r}")

    # ---- what a parameter-space search makes of it ---------------------------------
    @property
    def searched_model_params(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.model_params if p.name in self.searchable)

    @property
    def searched_global_params(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.global_params if p.name in self.searchable)

    @property
    def fixed_params(self) -> tuple[str, ...]:
        """The parameters a parameter-space spec may fix (globals first)."""
        return tuple(p.name for p in (*self.global_params, *self.model_params)
                     if p.name not in self.searchable)

    @property
    def exactly_one_model(self) -> bool:
        return self.min_models == self.max_models == 1

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "reference": self.reference,
            "needs_base": self.needs_base,
            "random": self.random,
            "chunked": self.chunked,
            "global": [p.describe() for p in self.global_params],
            "per_model": [p.describe() for p in self.model_params],
            "search_defaults": {"weight_range": list(self.search_weight_range),
                                "parameters": dict(self.search_parameters)},
        }
