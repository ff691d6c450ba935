"""Encoding a recipe into a parameter space: the point whose decoded recipe merges to the
same model, or :class:`RecipeNotInSpace` saying why there is none.

Every tensor the engine would see is probed (``param_values.probes``): the value the
recipe gives it, under the engine's resolution rules, must agree with every other tensor
that shares its gene, and lie within that gene's range.
"""

from __future__ import annotations

import math
from typing import Any

from search_spaces import param_values as pv
from search_spaces.base import RecipeNotInSpace
from search_spaces.genes import GeneSet
from search_spaces.parameter_genes import EMB, GeneLayout
from search_spaces.recipe import Recipe
from search_spaces.sources import model_string


def encode_recipe(layout: GeneLayout, genes: GeneSet, recipe: Recipe) -> dict[str, float]:
    """The point of ``recipe`` in the space whose genes are ``genes`` (laid out by ``layout``)."""
    spec, info = layout.spec, layout.info
    if recipe.merge_method != spec.method:
        raise RecipeNotInSpace(
            f"the recipe merges with {recipe.merge_method}, this space with {spec.method}"
        )
    if recipe.models is None:
        raise RecipeNotInSpace("a parameter space expresses 'models' recipes, not 'slices'")
    want_base = model_string(spec.base_model) if spec.base_model is not None else None
    if info.needs_base and recipe.base_model != want_base:
        raise RecipeNotInSpace(
            f"the recipe's base_model is {recipe.base_model!r}, the space's {want_base!r}"
        )
    want = [model_string(m) for m in spec.models]
    by_model = {e.model: e for e in recipe.models}
    if len(by_model) != len(recipe.models) or set(by_model) != set(want):
        raise RecipeNotInSpace(
            f"the recipe merges models {[e.model for e in recipe.models]}, the space {want}"
        )
    check_fixed(layout, recipe)
    return _point(genes, _gene_hits(layout, recipe, want))


def _gene_hits(layout: GeneLayout, recipe: Recipe, want: list[str]) -> dict[str, list[tuple[float, str]]]:
    """Per gene name, the ``(value, tensor)`` of each probed tensor it covers."""
    spec, info = layout.spec, layout.info
    by_model = {e.model: e for e in recipe.models or []}
    hits: dict[str, list[tuple[float, str]]] = {}
    for model in layout.owners:
        entry = by_model[want[model]] if model is not None else None
        for param in layout.params:
            scopes = [entry.parameters if entry else None, recipe.parameters]
            for probe in pv.probes(spec.num_layers):
                pos = pv.position(probe, spec.num_layers)
                value = pv.resolve(param, scopes, probe, pos)
                if value is None:
                    value = info.defaults.get(param)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    owner = f"model {want[model]!r}" if model is not None else "the recipe"
                    raise RecipeNotInSpace(
                        f"{owner} has no numeric {param!r} for tensor {probe.name} (got {value!r})"
                    )
                scope = _scope_of(layout, probe)
                group = None if scope == EMB else layout.group_of(probe.layer or 0)
                name = layout.gene_name(model, scope, group, param)
                hits.setdefault(name, []).append((float(value), probe.name))
    return hits


def _scope_of(layout: GeneLayout, probe: pv.Probe) -> str:
    for flt, scope in layout.scopes():
        if pv.filter_matches(flt, probe):
            return scope
    raise AssertionError("the last scope has no filter and matches everything")


def _point(genes: GeneSet, hits: dict[str, list[tuple[float, str]]]) -> dict[str, float]:
    """One coordinate per gene: the value its tensors agree on (the center where none is set)."""
    point: dict[str, float] = {}
    for gene in genes:
        seen = hits.get(gene.name)
        if not seen:
            point[gene.name] = gene.coord_center
            continue
        v0, where0 = seen[0]
        for v, where in seen[1:]:
            if not math.isclose(v, v0, rel_tol=1e-9, abs_tol=1e-12):
                hint = (
                    "embeddings, final norm and head share one gene per model and parameter"
                    if gene.meta.get("scope") == "embeddings"
                    else "use a smaller granularity or module_filters that separate them"
                )
                raise RecipeNotInSpace(
                    f"the recipe gives '{gene.label}' two values ({v0} at {where0}, {v} at {where}) "
                    f"but the space has one gene there: {hint}"
                )
        if not gene.low - 1e-12 <= v0 <= gene.high + 1e-12:
            raise RecipeNotInSpace(
                f"'{gene.label}' is {v0} in the recipe, outside the space's [{gene.low}, {gene.high}]: "
                "widen the range in the space spec"
            )
        point[gene.name] = gene.coord(min(max(v0, gene.low), gene.high))
    return point


def check_fixed(layout: GeneLayout, recipe: Recipe) -> None:
    """The recipe's unsearched parameters equal the space's fixed ``parameters``."""
    spec = layout.spec
    searched = set(layout.searched_model_params) | set(layout.info.global_params)
    fixed = {k: v for k, v in recipe.parameters.items() if k not in searched}
    declaration = layout.info.declaration

    def setting_of(given: dict[str, Any], key: str) -> Any:  # unset: the method's default
        if key in given:
            return given[key]
        try:
            default = declaration.param(key).default
        except ValueError:
            return None
        return None if declaration.param(key).required else default

    for key in sorted(set(fixed) | set(spec.parameters)):
        given, wanted = setting_of(fixed, key), setting_of(dict(spec.parameters), key)
        if given != wanted:
            raise RecipeNotInSpace(
                f"the recipe sets {key}: {given!r}, the space fixes it to {wanted!r}; "
                "put the recipe's value in the space's parameters"
            )
    for entry in recipe.models or []:
        for key, value in entry.parameters.items():
            if key not in searched and value != spec.parameters.get(key):
                raise RecipeNotInSpace(
                    f"model {entry.model!r} sets {key}: {value!r}, which this space does not search; "
                    "put it in the space's parameters (it applies to every model)"
                )
