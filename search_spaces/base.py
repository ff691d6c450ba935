"""The search-space interface and what every space's spec shares.

A space is built from a pydantic spec (discriminated by ``kind``) and declares its genes
once (:mod:`search_spaces.genes`). From that declaration come:

- ``space.genes``: names, bounds and transforms (the optimizers' distributions),
- ``space.decode(point) -> Recipe``: what a worker merges,
- ``space.encode(recipe) -> point``: the point of a recipe the space can express (to
  start a search from a user's recipe),
- ``space.describe()``: the human summary (dimension, genes with labels).

The spec carries everything the space needs to know about the models (layer counts,
as ``num_layers``): a space never reads weights. The service fills the layer counts in
from the models' configs when a study is submitted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from search_spaces.genes import Gene, GeneSet, InvalidPoint
from search_spaces.recipe import Recipe
from search_spaces.sources import ModelRef

__all__ = ["Gene", "GeneSet", "InvalidPoint", "RecipeNotInSpace", "SearchSpace", "SpaceSpecBase"]


# The most genes a space may have (docs/study-spec.md): beyond it no optimizer here learns
# anything within a budget, and CMA-ES's d × d covariance alone would outgrow the API's memory.
MAX_GENES = 4096
MAX_SEED = 2**32 - 1


class RecipeNotInSpace(ValueError):
    """``encode`` was given a recipe this space cannot express; the message says why."""


class SpaceSpecBase(BaseModel):
    """Fields every space spec has: its ``kind`` and the recipe settings it passes on."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    dtype: str | None = Field(default=None, max_length=16, description="dtype the inputs are read in")
    out_dtype: str | None = Field(default=None, max_length=16, description="dtype of the merged model")
    tokenizer_source: str | None = Field(default=None, max_length=4096, description="'base' or one model")
    merge_seed: int = Field(default=0, ge=0, le=MAX_SEED,
                            description="the recipe's seed (DARE / DELLA masks)")

    def recipe_fields(self) -> dict[str, Any]:
        """The recipe's top-level settings that come from the spec, not from genes."""
        return {
            "dtype": self.dtype,
            "out_dtype": self.out_dtype,
            "tokenizer_source": self.tokenizer_source,
            "seed": self.merge_seed,
        }


class SearchSpace(ABC):
    """A space of recipes. Subclasses set ``kind``, ``spec_class`` and ``derived_fields`` and
    implement ``_declare``, ``_decode``, ``encode`` and ``sources``."""

    kind: ClassVar[str]
    spec_class: ClassVar[type[SpaceSpecBase]]
    #: The fields of ``spec_class`` that the service fills in from the study's models (the model
    #: lists, layer counts): a study's ``space`` leaves them out. None: not declared, and the
    #: service does not run the space.
    derived_fields: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, spec: SpaceSpecBase | Mapping[str, Any]):
        if not isinstance(spec, self.spec_class):
            spec = self.spec_class.model_validate(
                spec.model_dump() if isinstance(spec, BaseModel) else dict(spec)
            )
        self.spec = spec
        planned = self.planned_dimension()
        if planned > MAX_GENES:
            raise ValueError(
                f"this space would have {planned} genes, more than {MAX_GENES}: search coarser "
                "(a larger granularity, fewer module filters, fewer repeats or a layer range)"
            )
        self.genes = GeneSet(self._declare())

    @property
    def dimension(self) -> int:
        return len(self.genes)

    # ---- what subclasses provide ---------------------------------------------------
    @abstractmethod
    def planned_dimension(self) -> int:
        """How many genes ``_declare`` will make, computed from the spec alone (cheap: it is
        checked against MAX_GENES before any gene is built)."""

    @abstractmethod
    def _declare(self) -> list[Gene]:
        """The genes, in a stable order."""

    @abstractmethod
    def _decode(self, values: dict[str, float]) -> Recipe:
        """The recipe for gene *values* (transforms applied, within bounds)."""

    @abstractmethod
    def encode(self, recipe: Recipe) -> dict[str, float]:
        """The point (optimizer coordinates) whose decoded recipe merges to the same
        model as ``recipe``; raises :class:`RecipeNotInSpace` saying why not."""

    @abstractmethod
    def sources(self) -> list[ModelRef]:
        """Every model a decoded recipe may name (for validation and resolution)."""

    @abstractmethod
    def summary(self) -> str:
        """One line for people: what is searched and how many genes."""

    # ---- shared --------------------------------------------------------------------
    def decode(self, point: Mapping[str, float]) -> Recipe:
        """The recipe of a point; refuses points outside the space (:class:`InvalidPoint`)."""
        return self._decode(self.genes.values(self.genes.check(point)))

    def center(self) -> dict[str, float]:
        """The middle of the box: the default start of a search."""
        return self.genes.center()

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "summary": self.summary(),
            "dimension": self.dimension,
            "genes": self.genes.describe(),
        }
