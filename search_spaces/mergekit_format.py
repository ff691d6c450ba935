"""Writing a recipe in mergekit's configuration format, where one exists.

Reading needs nothing special: evomerge's recipe schema is a superset of mergekit's.
Writing translates evomerge's additions: a stacking ``scale`` becomes mergekit's
passthrough ``scale`` parameter filtered to the output projections. What mergekit
cannot express (``rescale_mode: inverse_density``, a passthrough whose embeddings come
from a model outside its first and last slices) raises :class:`NotExpressible`.
"""

from __future__ import annotations

from typing import Any

import yaml

from search_spaces import merge_methods
from search_spaces.recipe import Recipe

# Substrings of the tensors that end a layer's residual branches, by family.
RESIDUAL_FILTERS = ("o_proj", "down_proj", "c_proj", "out_proj", "fc2", "dense_4h_to_h")


# Methods evomerge weighs per model and mergekit does not (it weighs the models equally).
EQUAL_WEIGHTS_ONLY = frozenset({"karcher"})


class NotExpressible(ValueError):
    """The recipe uses something mergekit's format has no way to say."""


def _check_params(params: dict[str, Any], where: str) -> None:
    if params.get("rescale_mode", "l1") != "l1":
        raise NotExpressible(
            f"{where}: rescale_mode {params['rescale_mode']!r} has no mergekit equivalent "
            "(mergekit always rescales by the L1 norm)"
        )


def _equal_weights_only(data: dict[str, Any], method: str) -> None:
    """Leave out the ``weight`` of a method mergekit weighs equally, when every model has
    the same one; refuse different weights."""
    entries = [e.setdefault("parameters", {}) for e in data.get("models", [])]
    entries += [s.setdefault("parameters", {}) for sl in data.get("slices", []) for s in sl["sources"]]
    given = [p["weight"] for p in entries if "weight" in p]
    if given and (len(given) < len(entries) or any(w != given[0] for w in given)):
        raise NotExpressible(f"{method}: mergekit weighs every model equally; this recipe's models have "
                             "different weights (an evomerge addition)")
    scopes = [data.get("parameters", {}), *(sl.get("parameters", {}) for sl in data.get("slices", []))]
    for params in [*scopes, *entries]:
        params.pop("weight", None)


def _lora_refs(data: dict[str, Any], recipe: Recipe) -> None:
    """mergekit names a PEFT LoRA adapter over its base ``base+adapter`` (it merges the adapter
    into the base first, as evomerge composes it): write each adapter source so."""
    from search_spaces.lora_adapter import is_adapter_folder

    entries = [*data.get("models", []), *(s for sl in data.get("slices", []) for s in sl["sources"])]
    for entry in entries:
        if not is_adapter_folder(entry["model"]):
            continue
        base = recipe.base_model
        if base is None or "+" in base or "+" in entry["model"]:
            raise NotExpressible(f"LoRA adapter {entry['model']!r}: mergekit names an adapter 'base+adapter' "
                                 "(no base_model here, or a '+' in a path)")
        entry["model"] = f"{base}+{entry['model']}"


def to_mergekit_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a mergekit configuration mapping."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    data.pop("seed", None)
    _lora_refs(data, recipe)
    _check_params(data.get("parameters", {}), "parameters")
    for entry in data.get("models", []):
        _check_params(entry.get("parameters", {}), f"model {entry['model']}")
    if recipe.slices is not None and recipe.is_stacking() and recipe.base_model:
        edges = {recipe.slices[0].sources[0].model, recipe.slices[-1].sources[0].model}
        if edges != {recipe.base_model}:
            raise NotExpressible(
                "mergekit's passthrough takes embeddings from the first slice's model and the "
                "head from the last slice's; this recipe takes both from base_model "
                f"{recipe.base_model!r}"
            )
        data.pop("base_model", None)
    declaration = merge_methods.find(recipe.merge_method)
    if (declaration is not None and declaration.base_is_input and not recipe.is_stacking()
            and recipe.models is not None and recipe.base_model not in {m.model for m in recipe.models}):
        # evomerge merges the models listed (linear, karcher); mergekit would add an unlisted
        # base_model as one more input
        data.pop("base_model", None)
    if recipe.merge_method in EQUAL_WEIGHTS_ONLY:
        _equal_weights_only(data, recipe.merge_method)
    for sl in data.get("slices", []):
        _check_params(sl.get("parameters", {}), "slice")
        for src in sl["sources"]:
            scale = src.pop("scale", None)
            if scale is not None and scale != 1:
                params = src.setdefault("parameters", {})
                if "scale" in params:
                    raise NotExpressible("a slice source has both 'scale' and a scale parameter")
                params["scale"] = [
                    *({"filter": f, "value": scale} for f in RESIDUAL_FILTERS),
                    {"value": 1.0},
                ]
    for key in ("models", "slices"):
        for item in data.get(key, []):
            if not item.get("parameters"):
                item.pop("parameters", None)
            for src in item.get("sources", []):
                if not src.get("parameters"):
                    src.pop("parameters", None)
    if not data.get("parameters"):
        data.pop("parameters", None)
    return data


def to_mergekit_yaml(recipe: Recipe) -> str:
    header = ""
    declaration = merge_methods.find(recipe.merge_method)
    if declaration is not None and declaration.random:
        header = (
            f"# {recipe.merge_method} draws random masks: mergekit's draws differ from "
            f"evomerge's (seed {recipe.seed}), so its output will differ in the dropped entries.\n"
        )
    return header + yaml.safe_dump(to_mergekit_dict(recipe), sort_keys=False)
