"""The recipe: what a merge is, independent of how it is executed.

A recipe is the contract between a search space (which decodes a point into one), the
merge engine (`evomerge merge`) and the workers that build candidates in memory. It is a
plain pydantic model with no torch import.

Its YAML form is a superset of mergekit's configuration format, so a mergekit YAML runs
as it is. evomerge's additions are few and named:

- ``seed``: makes the random methods (DARE, DELLA) deterministic.
- ``scale`` on a slice source: scales each copied layer's residual contribution (the
  attention and MLP output projections) for layer stacking.
- ``parameters.rescale_mode`` (DARE / DELLA): ``l1`` (mergekit's rule, default) or
  ``inverse_density`` (the DARE paper's 1/p rule).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = Union[bool, int, float, str]


class ConditionalParameter(BaseModel):
    """A value that applies to the tensors a filter matches.

    ``filter`` is a module category (``attention``, ``mlp``, ``embeddings``, ``norms``,
    ``other``) or, as in mergekit, a substring of the tensor name (``self_attn``). No
    filter (or ``*``) matches every tensor.
    """

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: ParameterValue


# A parameter is a scalar, a per-layer list (interpolated across layers like mergekit's
# gradients), or a list of filtered values.
ParameterValue = Union[Scalar, list[Scalar], list[ConditionalParameter]]
ConditionalParameter.model_rebuild()

Parameters = dict[str, ParameterValue]


class ModelEntry(BaseModel):
    """One input model of a parameter-space merge, with its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: Parameters = Field(default_factory=dict)


class SliceSource(BaseModel):
    """A layer range ``[start, end)`` of one model."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: Parameters = Field(default_factory=dict)
    scale: float | None = Field(
        default=None,
        description="evomerge: scale of each layer's residual contribution (stacking).",
    )

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(
                f"layer_range {list(value)} must satisfy 0 <= start < end (end exclusive)"
            )
        return value


class Slice(BaseModel):
    """Output layers built from equally long ranges of one or more sources."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Parameters = Field(default_factory=dict)

    @model_validator(mode="after")
    def _same_length(self) -> Slice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            raise ValueError(
                "every source of a slice must span the same number of layers; got "
                + ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            )
        return self


class Recipe(BaseModel):
    """A merge recipe: a parameter-space merge (``models``) or a layer-wise one
    (``slices``, e.g. passthrough layer stacking)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: Parameters = Field(default_factory=dict)
    dtype: str | None = Field(
        default=None, description="dtype the inputs are read in (mergekit's meaning)."
    )
    out_dtype: str | None = Field(default=None, description="dtype of the written model.")
    tokenizer_source: str | None = Field(
        default=None, description="'base', a model of the recipe, or omitted (base, else first)."
    )
    chat_template: str | None = None
    seed: int = Field(default=0, description="evomerge: seed of the random methods.")

    @model_validator(mode="after")
    def _one_layout(self) -> Recipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("a recipe needs exactly one of 'models' or 'slices'")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty: list at least one input model")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty: list at least one slice")
        if self.tokenizer_source == "union":
            raise ValueError(
                "tokenizer_source 'union' is not supported: use 'base' or one model's path"
            )
        return self

    # ---- convenience -------------------------------------------------------------
    def referenced_models(self) -> list[str]:
        """Every model the recipe names, in first-seen order."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for entry in self.models or []:
            seen[entry.model] = None
        for sl in self.slices or []:
            if sl.base_model:
                seen[sl.base_model] = None
            for src in sl.sources:
                seen[src.model] = None
        return list(seen)

    def with_models_renamed(self, rename: Callable[[str], str]) -> Recipe:
        """A copy in which every model reference ``m`` becomes ``rename(m)``."""
        data = self.model_copy(deep=True)
        if data.base_model is not None:
            data.base_model = rename(data.base_model)
        if data.tokenizer_source not in (None, "base"):
            data.tokenizer_source = rename(data.tokenizer_source)
        for entry in data.models or []:
            entry.model = rename(entry.model)
        for sl in data.slices or []:
            if sl.base_model is not None:
                sl.base_model = rename(sl.base_model)
            for src in sl.sources:
                src.model = rename(src.model)
        return data

    def is_stacking(self) -> bool:
        return self.merge_method == "passthrough"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True, exclude_defaults=False)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls.model_validate(_normalise_mergekit(data))

    @classmethod
    def from_text(cls, text: str) -> Recipe:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError("a recipe must be a YAML/JSON mapping with a 'merge_method' key")
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        return cls.from_text(Path(path).read_text())


def _normalise_mergekit(data: dict[str, Any]) -> dict[str, Any]:
    """Accept mergekit's spellings that our schema writes differently."""
    data = dict(data)
    if "modules" in data:
        raise ValueError(
            "mergekit 'modules' (multi-module models) are not supported: "
            "use 'models' or 'slices'"
        )
    if "tokenizer" in data:
        raise ValueError(
            "mergekit 'tokenizer' (vocabulary merging) is not supported: "
            "use tokenizer_source with models that share a tokenizer"
        )
    for entry in data.get("models") or []:
        if isinstance(entry, dict) and entry.get("parameters") is None:
            entry.pop("parameters", None)
    for sl in data.get("slices") or []:
        if isinstance(sl, dict) and sl.get("parameters") is None:
            sl.pop("parameters", None)
        for src in (sl.get("sources") or []) if isinstance(sl, dict) else []:
            if isinstance(src, dict) and src.get("parameters") is None:
                src.pop("parameters", None)
    if data.get("parameters") is None:
        data.pop("parameters", None)
    return data


# ---- what a parameter value means for one tensor (shared by the merge engine and
# the search spaces' ``encode``, so both read a recipe the same way) ------------------
def interpolate(values: Sequence[Any], pos: Fraction | float) -> Any:
    """A per-layer list read at relative depth ``pos`` (mergekit's gradient rule)."""
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(pos * (len(values) - 1))]
    scaled = pos * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = float(scaled - i0)
    if frac == 0.0:
        return values[i0]
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate_setting(setting: Any, matches: Callable[[str | None], bool], pos: Fraction | float) -> Any:
    """Value of one setting at relative depth ``pos`` for a tensor that ``matches`` the
    filters it matches (None: no filtered value applies)."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if isinstance(setting, dict) and "value" in setting:
        setting = [ConditionalParameter.model_validate(setting)]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(v, (bool, int, float, str)) for v in setting):
            return interpolate(setting, pos)
        for cond in setting:
            if isinstance(cond, dict):
                cond = ConditionalParameter.model_validate(cond)
            if matches(cond.filter):
                return evaluate_setting(cond.value, matches, pos)
        return None
    raise ValueError(f"unexpected parameter value {setting!r}")


def resolve_setting(name: str, scopes: Sequence[dict[str, Any] | None],
                    matches: Callable[[str | None], bool], pos: Fraction | float) -> Any:
    """First value of ``name`` found in ``scopes`` (most specific first), else None."""
    for scope in scopes:
        if scope and name in scope:
            value = evaluate_setting(scope[name], matches, pos)
            if value is not None:
                return value
    return None


def dump_json(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), indent=2)
