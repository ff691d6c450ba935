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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

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


@dataclass(frozen=True)
class ResolvedSource:
    """A study's model as the service resolved it, for a space to fill its derived fields:
    ``spec_ref`` (how the space's spec names it: a path, hub id or study reference),
    ``ref`` (how workers name it), ``num_layers``, and where and how the study wrote it
    (``loc``, ``given``: for messages)."""

    spec_ref: Any
    ref: str
    num_layers: int
    loc: tuple[Any, ...]
    given: str


class SpaceProblem(ValueError):
    """A space cannot be filled in from the study's models: ``loc`` (in the study), the
    message, the fix and a problem type, as validation reports them."""

    def __init__(self, loc: list[Any], msg: str, fix: str, type_: str) -> None:
        super().__init__(msg)
        self.loc, self.msg, self.fix, self.type = loc, msg, fix, type_


# What a space that does not fill in its own derived fields gets, by the field's name.
_DERIVED_VALUES = {
    "models": lambda sources, base: [m.spec_ref for m in sources],
    "base_model": lambda sources, base: base.spec_ref if base is not None else None,
    "num_layers": lambda sources, base: (base or sources[0]).num_layers,
}


class SearchSpace(ABC):
    """A space of recipes. Subclasses set ``kind``, ``spec_class`` and ``derived_fields`` and
    implement ``_declare``, ``_decode``, ``encode`` and ``sources``.

    What the service must know of a kind is declared here, not tested by kind name: the class
    attributes below (defaults: what the service did for a kind it did not know), and the
    methods :meth:`merge_method` and :meth:`stacked_layers`.
    """

    kind: ClassVar[str]
    spec_class: ClassVar[type[SpaceSpecBase]]
    #: The fields of ``spec_class`` that the service fills in from the study's models (the model
    #: lists, layer counts): a study's ``space`` leaves them out. None: not declared, and the
    #: service does not run the space.
    derived_fields: ClassVar[tuple[str, ...] | None] = None
    #: What the study's models must share, checked at submission: "tensors" (the same tensor
    #: names and shapes: models fine-tuned from one base) or "layers" (one architecture and
    #: width, layers that fit into one another; layer counts may differ).
    compatibility: ClassVar[Literal["tensors", "layers"]] = "layers"
    #: The study's ``base_model`` is the base that workers form task vectors against (loaded
    #: first). False: the base only lends parts (stacking: embeddings and head) or is absent.
    task_vector_base: ClassVar[bool] = False
    #: A decoded recipe merges to a model with its sources' shapes, so a study built on a
    #: trial of this space may be validated against a source before that trial is exported.
    keeps_source_shapes: ClassVar[bool] = False
    #: How people see a recipe of this space (``service.recipe_view``): "parameter" (per-layer
    #: panels of a ``models`` recipe) or "stacking" (the layer path of a ``slices`` recipe);
    #: None: chosen by the recipe's shape.
    recipe_view: ClassVar[str | None] = None
    #: The study's ``base_model`` may also be one of its sources (stacking: a base that lends
    #: its embeddings may contribute layers too); then it is checked as a source.
    base_may_be_source: ClassVar[bool] = False
    #: Fields of the user's form that are not in ``spec_class`` (``derive`` reads them from the
    #: form): name -> (annotation, pydantic ``Field``); validation runs in the annotation.
    form_fields: ClassVar[dict[str, tuple[Any, Any]]] = {}

    @classmethod
    def derive(cls, data: dict[str, Any], form: Any, sources: list[ResolvedSource],
               base: ResolvedSource | None) -> dict[str, Any]:
        """The full spec: the user's ``data`` (``form``: as the user gave it) with the derived
        fields filled in from the study's models; :class:`SpaceProblem` when they cannot be.
        By default each declared derived field by its name (models, base_model, num_layers)."""
        unknown = [f for f in cls.derived_fields or () if f not in _DERIVED_VALUES]
        if unknown:
            raise SpaceProblem(["space", "kind"], f"space kind {cls.kind!r} derives {', '.join(unknown)} "
                               "from the study's models, which the service cannot fill in",
                               f"a space's derived fields are among: {', '.join(_DERIVED_VALUES)}, or "
                               "the space fills them in itself (SearchSpace.derive)", "unknown_space_kind")
        data.update({f: _DERIVED_VALUES[f](sources, base) for f in cls.derived_fields or ()})
        return data

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

    @classmethod
    def example_spec(cls, models: list[str], num_layers: int) -> dict[str, Any]:
        """A small valid spec over ``models`` (the first one the base where the space takes
        one), each with ``num_layers`` layers: what the contract tests (tests/test_space_contract.py)
        build the space from. Every registered space provides one."""
        raise NotImplementedError(f"space kind {cls.kind!r} declares no example_spec")

    # ---- what the service reads (defaults for a space that merges a ``models`` recipe) ------
    def merge_method(self) -> str:
        """The merge method of this space's recipes (what a worker's memory plan sizes): the
        spec's ``method`` where it has one, else that of the recipe at the centre."""
        method = getattr(self.spec, "method", None)
        return str(method if method is not None else self.decode(self.center()).merge_method)

    def stacked_layers(self) -> int | None:
        """The most decoder layers a candidate can have when the space stacks layers (a
        worker sizes its candidate by it); None: a candidate has its base's layers."""
        return None

    # ---- shared --------------------------------------------------------------------
    def decode(self, point: Mapping[str, float]) -> Recipe:
        """The recipe of a point; refuses points outside the space (:class:`InvalidPoint`)."""
        return self._decode(self.genes.values(self.genes.check(point)))

    def center(self) -> dict[str, float]:
        """The middle of the box."""
        return self.genes.center()

    def start(self) -> dict[str, float] | None:
        """Where a search starts when its spec gives no ``optimizer.x0`` (gene values): a
        space declares a natural first candidate here (task arithmetic for a parameter
        space, the base's own layers for stacking). None: the optimizer's own start
        (the middle of the box for CMA-ES)."""
        return None

    def start_sigma(self) -> float | None:
        """CMA-ES's first step around :meth:`start` (a fraction of each gene's range) when
        the spec gives no ``sigma0``; None: the optimizer's default (1/6)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "summary": self.summary(),
            "dimension": self.dimension,
            "genes": self.genes.describe(),
        }
