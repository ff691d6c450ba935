"""The layer-stacking space's spec: its sources, repeats, depth bounds, encoding and
scales (the space itself: :mod:`search_spaces.layer_stacking`)."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from search_spaces.base import SpaceSpecBase
from search_spaces.genes import Transform
from search_spaces.sources import ModelRef, model_string

MAX_LAYERS = 100_000
MAX_REPEATS = 16
MAX_SCALE = 1000.0
MAX_STACK_SOURCES = 64
_LayerIndex = Annotated[int, Field(ge=0, le=MAX_LAYERS)]


def _check_layer_ranges(value: Any) -> Any:
    """A study form's ``layer_ranges``: each ``[start, end)`` non-empty (end exclusive)."""
    for r in value or []:
        if r is not None and not 0 <= r[0] < r[1]:
            raise ValueError(f"layer range {list(r)} must satisfy 0 <= start < end (end exclusive)")
    return value


class StackSource(BaseModel):
    """A source model and the layers of it that enter the slots."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    num_layers: int = Field(ge=1, le=MAX_LAYERS,
                            description="the model's decoder layers (filled in by the service)")
    layer_range: tuple[int, int] | None = Field(
        default=None, description="[start, end) of the layers used; default all"
    )

    @model_validator(mode="after")
    def _range(self) -> StackSource:
        if self.layer_range is not None:
            a, b = self.layer_range
            if not 0 <= a < b <= self.num_layers:
                raise ValueError(
                    f"layer_range {list(self.layer_range)} of {model_string(self.model)!r} must satisfy "
                    f"0 <= start < end <= num_layers ({self.num_layers})"
                )
        return self

    @property
    def layers(self) -> range:
        a, b = self.layer_range or (0, self.num_layers)
        return range(a, b)


class ScaleSpec(BaseModel):
    """Per-slot scales of the residual contribution."""

    model_config = ConfigDict(extra="forbid")
    search: bool = Field(default=False, description="search a scale per slot or segment (default: every "
                         "scale is 1; searched scales drowned the search in bench/search_quality.py)")
    low: float = Field(default=0.5, ge=-MAX_SCALE, le=MAX_SCALE)
    high: float = Field(default=1.5, ge=-MAX_SCALE, le=MAX_SCALE)
    transform: Transform = Field(default="identity", description="'log' searches the scale's logarithm")

    @model_validator(mode="after")
    def _bounds(self) -> ScaleSpec:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or not 0 < self.low < self.high:
            raise ValueError(f"scales need 0 < low < high, got [{self.low}, {self.high}]")
        return self


class StackingSpaceSpec(SpaceSpecBase):
    """A layer-stacking search."""

    kind: Literal["stacking"] = "stacking"
    sources: list[StackSource] = Field(min_length=1, max_length=MAX_STACK_SOURCES)
    repeats: int = Field(default=2, ge=1, le=MAX_REPEATS,
                         description=f"r: how many times the source layers repeat, 1 … {MAX_REPEATS}")
    min_depth: int | None = Field(default=None, ge=1, le=MAX_LAYERS,
                                  description="fewest output layers (default 1)")
    max_depth: int | None = Field(default=None, ge=1, le=MAX_LAYERS,
                                  description="most output layers (default T)")
    base_model: ModelRef | None = Field(
        default=None, description="owner of embeddings, final norm and head (default: the first source)"
    )
    encoding: Literal["threshold", "ranked", "segments"] = Field(
        default="segments", description="segments: one run of layers per source and repeat (default); "
        "threshold: an include gene per slot; ranked: a priority per slot and a depth")
    scales: ScaleSpec = Field(default_factory=ScaleSpec)

    @model_validator(mode="after")
    def _consistent(self) -> StackingSpaceSpec:
        names = [model_string(s.model) for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources are listed twice: {dupes}; use repeats to reuse layers")
        slots = self.num_slots
        lo, hi = self.depth_bounds
        if hi > slots:
            raise ValueError(f"max_depth {hi} exceeds the {slots} slots (M × r)")
        if lo > hi:
            raise ValueError(f"min_depth {lo} exceeds max_depth {hi}")
        return self

    @property
    def num_slots(self) -> int:
        return self.repeats * sum(len(s.layers) for s in self.sources)

    @property
    def depth_bounds(self) -> tuple[int, int]:
        return self.min_depth or 1, self.max_depth or self.num_slots

    def base(self) -> ModelRef:
        return self.base_model if self.base_model is not None else self.sources[0].model
