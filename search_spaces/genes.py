"""Genes: the one declaration a search space makes of what it searches.

A :class:`Gene` has a machine name (the key of a point, and the Optuna parameter
name), value bounds, a transform, a human label ("layers 4–7 · model B · density") and
structured ``meta`` (which layers, model, parameter) for the dashboard. The optimizers'
distributions, the decoding into a recipe, and the labels all derive from it.

Coordinates. A point maps gene names to floats in the *optimizer's coordinates*:
``coord = value`` for the ``identity`` transform and ``coord = ln(value)`` for ``log``.
Every optimizer searches the box ``[coord_low, coord_high]`` of each gene, so CMA-ES
works on a log scale where one was declared, whatever the backend.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

Transform = Literal["identity", "log"]


class InvalidPoint(ValueError):
    """A point that is not in the space: a missing or unknown gene, or out of bounds."""


class Gene(BaseModel):
    """One searched number."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1)
    low: float = Field(description="smallest value (in value space, before the transform)")
    high: float = Field(description="largest value")
    transform: Transform = "identity"
    label: str = Field(description="what a person reads on the dashboard")
    meta: dict[str, Any] = Field(default_factory=dict, description="structured facts for plots")

    @model_validator(mode="after")
    def _bounds(self) -> Gene:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low >= self.high:
            raise ValueError(f"gene {self.name!r}: need finite low < high, got [{self.low}, {self.high}]")
        if self.transform == "log" and self.low <= 0:
            raise ValueError(f"gene {self.name!r}: a log-scaled gene needs low > 0, got {self.low}")
        return self

    @property
    def coord_low(self) -> float:
        return self.coord(self.low)

    @property
    def coord_high(self) -> float:
        return self.coord(self.high)

    @property
    def coord_center(self) -> float:
        return (self.coord_low + self.coord_high) / 2

    def coord(self, value: float) -> float:
        """Optimizer coordinate of a value."""
        return math.log(value) if self.transform == "log" else float(value)

    def value(self, coord: float) -> float:
        """Value of an optimizer coordinate (clipped into the bounds against rounding)."""
        v = math.exp(coord) if self.transform == "log" else float(coord)
        return min(max(v, self.low), self.high)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "low": self.low,
            "high": self.high,
            "transform": self.transform,
            **({"meta": self.meta} if self.meta else {}),
        }


class GeneSet:
    """An ordered, named collection of genes with the vector views optimizers need."""

    def __init__(self, genes: Iterable[Gene]):
        self._genes = list(genes)
        self._index: dict[str, int] = {}
        for i, g in enumerate(self._genes):
            if g.name in self._index:
                raise ValueError(f"gene name {g.name!r} is declared twice")
            self._index[g.name] = i
        if not self._genes:
            raise ValueError("a search space needs at least one gene")

    def __len__(self) -> int:
        return len(self._genes)

    def __iter__(self) -> Iterator[Gene]:
        return iter(self._genes)

    def __getitem__(self, name: str) -> Gene:
        return self._genes[self._index[name]]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    @property
    def names(self) -> list[str]:
        return [g.name for g in self._genes]

    @property
    def lows(self) -> np.ndarray:
        return np.array([g.coord_low for g in self._genes], dtype=float)

    @property
    def highs(self) -> np.ndarray:
        return np.array([g.coord_high for g in self._genes], dtype=float)

    def center(self) -> dict[str, float]:
        return {g.name: g.coord_center for g in self._genes}

    def check(self, point: Mapping[str, float], *, tol: float = 1e-9) -> dict[str, float]:
        """The point as plain floats in gene order; refuses missing, unknown, non-finite
        and out-of-bounds coordinates (a relative ``tol`` of the range is clipped)."""
        missing = [n for n in self._index if n not in point]
        unknown = [n for n in point if n not in self._index]
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing genes {missing[:5]}{' …' if len(missing) > 5 else ''}")
            if unknown:
                parts.append(f"unknown genes {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
            raise InvalidPoint(
                f"point does not match the space ({'; '.join(parts)}); the space has "
                f"{len(self)} genes, see space.describe()"
            )
        out: dict[str, float] = {}
        for g in self._genes:
            c = float(point[g.name])
            lo, hi = g.coord_low, g.coord_high
            slack = tol * (hi - lo)
            if not math.isfinite(c) or c < lo - slack or c > hi + slack:
                raise InvalidPoint(
                    f"gene {g.name!r} ({g.label}) = {c} is outside its bounds [{lo}, {hi}]"
                    + (" (log coordinates)" if g.transform == "log" else "")
                )
            out[g.name] = min(max(c, lo), hi)
        return out

    def values(self, point: Mapping[str, float]) -> dict[str, float]:
        """Gene values (transforms applied) of a checked point."""
        return {g.name: g.value(point[g.name]) for g in self._genes}

    def to_array(self, point: Mapping[str, float]) -> np.ndarray:
        return np.array([float(point[n]) for n in self.names], dtype=float)

    def from_array(self, x: Iterable[float]) -> dict[str, float]:
        xs = [float(v) for v in x]
        if len(xs) != len(self):
            raise InvalidPoint(f"vector of length {len(xs)} for a space of {len(self)} genes")
        return dict(zip(self.names, xs))

    def normalize(self, point: Mapping[str, float]) -> np.ndarray:
        """Coordinates mapped to the unit cube (the frame sigma0 is given in)."""
        return (self.to_array(point) - self.lows) / (self.highs - self.lows)

    def denormalize(self, z: Iterable[float]) -> dict[str, float]:
        lows, highs = self.lows, self.highs
        x = np.clip(lows + np.asarray(list(z), dtype=float) * (highs - lows), lows, highs)
        return self.from_array(x)

    def describe(self) -> list[dict[str, Any]]:
        return [g.describe() for g in self._genes]
