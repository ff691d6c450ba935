"""The parameter space's spec, and what it makes of each merge method.

A method has a parameter space when its declaration (``search_spaces.merge_methods``)
names searchable parameters: per-model ones (weight, density) get genes per source
model, global ones (slerp's t) one set of genes; the method's other parameters may be
fixed in the spec's ``parameters``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from search_spaces import merge_methods
from search_spaces.base import SpaceSpecBase
from search_spaces.method_declaration import MethodDeclaration
from search_spaces.sources import ModelRef, model_string

MAX_COEFFICIENT = 1000.0  # |bounds| of the weight, density and t ranges
MAX_FIXED = 1_000_000  # |a fixed parameter|
Scalar = Union[bool, Annotated[int, Field(ge=-MAX_FIXED, le=MAX_FIXED)],
               Annotated[float, Field(ge=-MAX_FIXED, le=MAX_FIXED)], Annotated[str, Field(max_length=200)]]
Coefficient = Annotated[float, Field(ge=-MAX_COEFFICIENT, le=MAX_COEFFICIENT)]

DEFAULT_FINAL_NORM_FILTERS = ["model.norm.", "ln_f.", "norm_f."]


@dataclass(frozen=True)
class MethodInfo:
    """What a parameter-space search makes of one method's declaration."""

    declaration: MethodDeclaration

    @property
    def model_params(self) -> tuple[str, ...]:
        """Searched per source model."""
        return self.declaration.searched_model_params

    @property
    def global_params(self) -> tuple[str, ...]:
        """Searched once (slerp's t)."""
        return self.declaration.searched_global_params

    @property
    def fixed(self) -> tuple[str, ...]:
        """May be fixed in the spec's ``parameters``."""
        return self.declaration.fixed_params

    @property
    def needs_base(self) -> bool:
        return self.declaration.needs_base

    @property
    def exactly_one_model(self) -> bool:
        return self.declaration.exactly_one_model

    @property
    def defaults(self) -> dict[str, Any]:
        """The engine's defaults of the searched parameters that have one (density: 1)."""
        searched = (*self.model_params, *self.global_params)
        return {n: self.declaration.param(n).default for n in searched
                if not self.declaration.param(n).required}


class _SpaceMethods(Mapping[str, MethodInfo]):
    """The methods that have a parameter space, by name, in declaration order: read from
    the method registry each time, so a method registered later is here too."""

    def __getitem__(self, name: str) -> MethodInfo:
        declaration = merge_methods.find(name) if isinstance(name, str) else None
        if declaration is None or not declaration.searchable:
            raise KeyError(name)
        return MethodInfo(declaration)

    def __iter__(self) -> Iterator[str]:
        return iter([d.name for d in merge_methods.declarations() if d.searchable])

    def __len__(self) -> int:
        return sum(1 for _ in self)


METHODS: Mapping[str, MethodInfo] = _SpaceMethods()


def filter_tag(flt: str) -> str:
    """A module filter as a gene-name part (letters, digits, underscores)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", flt).strip("_") or "f"


MAX_LAYERS = 100_000
MAX_GRANULARITY = 1024  # layers per gene group
MAX_FILTERS = 16  # module filters, final-norm filters, fixed parameters


class ParameterSpaceSpec(SpaceSpecBase):
    """A parameter-space search: which method, which models, how fine the genes are."""

    kind: Literal["parameter"] = "parameter"
    method: str = Field(description="merge method: " + ", ".join(METHODS))
    base_model: ModelRef | None = Field(
        default=None, description="the model the others were fine-tuned from (all methods but linear)"
    )
    models: list[ModelRef] = Field(min_length=1, description="the source models that get genes")
    num_layers: int = Field(ge=1, le=MAX_LAYERS,
                            description="decoder layers of the models (filled in by the service)")
    granularity: int | None = Field(
        default=None, ge=1, le=MAX_GRANULARITY,
        description=f"layers per gene group, 1 … {MAX_GRANULARITY}; None: one group for all layers"
    )
    module_filters: list[str] = Field(
        default_factory=list, max_length=MAX_FILTERS,
        description="separate genes per filter (a category such as attention / mlp, or a name substring)",
    )
    embedding_genes: bool = Field(
        default=True, description="separate genes for embeddings, final norm and head"
    )
    final_norm_filters: list[str] = Field(
        default_factory=lambda: list(DEFAULT_FINAL_NORM_FILTERS), max_length=MAX_FILTERS,
        description="name substrings that identify the final norm (it follows the embedding genes)",
    )
    weight_range: tuple[Coefficient, Coefficient] = Field(
        default=(0.0, 1.0), description="range of the weight genes (default: the method's; "
        "[-0.5, 3] for task-vector methods, [0, 1] otherwise)")
    negative_weights: bool = Field(default=False, description="allow weight_range to go below 0")
    search_density: bool = Field(default=True, description="search densities (else fixed or default)")
    density_range: tuple[Coefficient, Coefficient] = (0.1, 1.0)
    t_range: tuple[Coefficient, Coefficient] = (0.0, 1.0)
    parameters: dict[str, Scalar] = Field(
        default_factory=dict, max_length=MAX_FILTERS,
        description="fixed method parameters (normalize, lambda, gamma, …)"
    )

    @model_validator(mode="before")
    @classmethod
    def _method_defaults(cls, data: Any) -> Any:
        """What the method declares for a search, where the spec is silent: the weight
        range (negative weights allowed with it) and fixed parameters (TIES and DELLA:
        normalize off). A stored spec carries them explicitly, so a later change of the
        declared defaults never changes a study's space."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            return data
        info = METHODS.get(data["method"])
        if info is None:
            return data
        declaration = info.declaration
        data = dict(data)
        if "weight_range" not in data:
            data["weight_range"] = list(declaration.search_weight_range)
            if declaration.search_weight_range[0] < 0 and "negative_weights" not in data:
                data["negative_weights"] = True
        given = data.get("parameters")
        if declaration.search_parameters and (given is None or isinstance(given, dict)):
            data["parameters"] = {**declaration.search_parameters, **(given or {})}
        return data

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in METHODS:
            import difflib

            close = difflib.get_close_matches(value, METHODS, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(
                f"method {value!r} has no parameter space{hint}; choose one of {', '.join(METHODS)}"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ParameterSpaceSpec:
        info = METHODS[self.method]
        if info.needs_base and self.base_model is None:
            raise ValueError(f"{self.method} needs base_model: the model the others were fine-tuned from")
        if info.exactly_one_model and len(self.models) != 1:
            raise ValueError(
                f"{self.method} interpolates the base with exactly one other model; got {len(self.models)}"
            )
        declared, count = info.declaration, len(self.models)
        if count < declared.min_models or count > (declared.max_models or count):
            most = f" and at most {declared.max_models}" if declared.max_models else ""
            raise ValueError(f"{self.method} takes at least {declared.min_models}{most} models; got {count}")
        names = [model_string(m) for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models are listed twice: {dupes}")
        # a method that sets its base apart (all but linear, karcher) never merges it as a model
        if (not info.declaration.base_is_input and self.base_model is not None
                and model_string(self.base_model) in names):
            raise ValueError(
                f"base_model {model_string(self.base_model)!r} is also in models: the base is not a "
                f"searched input of {self.method}; remove it from models"
            )
        _check_range("weight_range", self.weight_range)
        if self.weight_range[0] < 0 and not self.negative_weights:
            raise ValueError(
                f"weight_range {list(self.weight_range)} allows negative weights: set "
                "negative_weights: true to confirm, or raise the lower bound to 0"
            )
        _check_range("density_range", self.density_range, 0.0, 1.0)
        _check_range("t_range", self.t_range, 0.0, 1.0)
        seen_tags: dict[str, str] = {}
        for f in self.module_filters:
            if not f or f == "*":
                raise ValueError(
                    "a module filter must be a category or a tensor-name substring, not empty or '*'"
                )
            if f == "embeddings" and self.embedding_genes:
                raise ValueError(
                    "module filter 'embeddings' duplicates the embedding genes: drop it or set "
                    "embedding_genes: false"
                )
            if filter_tag(f) in seen_tags:
                raise ValueError(f"module filters {seen_tags[filter_tag(f)]!r} and {f!r} are the same filter")
            seen_tags[filter_tag(f)] = f
        allowed = set(info.fixed) | (set() if self.search_density else {"density"})
        searched = {p for p in info.model_params if p != "density" or self.search_density}
        for key in self.parameters:
            if key in searched or key in info.global_params:
                raise ValueError(f"parameter {key!r} is searched by this space; remove it from parameters")
            if key not in allowed:
                takes = ", ".join(sorted(allowed)) or "none"
                raise ValueError(f"{self.method} has no fixed parameter {key!r}; it takes: {takes}")
        return self


def _check_range(name: str, rng: tuple[float, float], lo: float = -MAX_COEFFICIENT,
                 hi: float = MAX_COEFFICIENT) -> None:
    a, b = rng
    if not (math.isfinite(a) and math.isfinite(b)) or a >= b:
        raise ValueError(f"{name} {list(rng)} must be two finite numbers, low < high")
    if a < lo or b > hi:
        raise ValueError(f"{name} {list(rng)} must lie within [{lo}, {hi}]")
