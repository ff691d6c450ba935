"""The parameter space (PS): per-layer-group merge coefficients.

For each layer group (``granularity`` layers; ``None`` gives one global group) and each
source model: a weight and, for methods that sparsify, a density. Optionally separate
genes per module filter (``module_filters: [attention, mlp]``), and separate genes for
the tensors outside the layers (embeddings, final norm, head). SLERP has one ``t`` per
layer group instead.

The decoded recipe is a ``models`` recipe. A parameter is a scalar when there is one
group, else a list of exactly ``num_layers`` values (the engine gives each layer its own
value from such a list); with module filters or embedding genes it is a filtered list::

    weight:
      - {filter: embeddings, value: 0.4}      # embed_tokens, lm_head
      - {filter: model.norm., value: 0.4}     # the final norm (by name; see final_norm_filters)
      - {filter: ln_f., value: 0.4}
      - {filter: attention, value: [...]}     # one entry per module filter
      - {value: [...]}                        # everything else in the layers

Non-layer tensors sit at ``t = 0`` in the engine, so without embedding genes they take
layer 0's values. Layer norms are category ``norms`` like the final norm, so the final
norm is matched by name substrings instead.
"""

from __future__ import annotations

import math
from typing import Any

from search_spaces import param_values as pv
from search_spaces.base import RecipeNotInSpace, SearchSpace
from search_spaces.genes import Gene
from search_spaces.parameter_space_spec import METHODS, MethodInfo, ParameterSpaceSpec, filter_tag
from search_spaces.recipe import ConditionalParameter, ModelEntry, Recipe
from search_spaces.registry import register_space
from search_spaces.sources import ModelRef, model_string, source_letter

__all__ = ["METHODS", "MethodInfo", "ParameterSpace", "ParameterSpaceSpec"]

_EMB = "emb"
_LAYERS = "layers"


@register_space
class ParameterSpace(SearchSpace):
    """Per-layer-group weights / densities (or SLERP t) of a parameter-space merge."""

    kind = "parameter"
    spec_class = ParameterSpaceSpec
    derived_fields = ("models", "base_model", "num_layers")
    spec: ParameterSpaceSpec

    # ---- structure -----------------------------------------------------------------
    @property
    def info(self) -> MethodInfo:
        return METHODS[self.spec.method]

    @property
    def searched_model_params(self) -> tuple[str, ...]:
        return tuple(p for p in self.info.model_params if p != "density" or self.spec.search_density)

    def groups(self) -> list[tuple[int, int]]:
        """Layer groups as ``[start, end)`` ranges."""
        n = self.spec.num_layers
        k = min(self.spec.granularity or n, n)
        return [(a, min(a + k, n)) for a in range(0, n, k)]

    def _group_of(self, layer: int) -> int:
        return layer // min(self.spec.granularity or self.spec.num_layers, self.spec.num_layers)

    def _scopes(self) -> list[tuple[str | None, str]]:
        """The filtered-list structure of a decoded parameter, first match wins:
        ``(filter, scope key)``; the scope key names the genes that fill it."""
        out: list[tuple[str | None, str]] = []
        if self.spec.embedding_genes:
            out.append(("embeddings", _EMB))
            out += [(f, _EMB) for f in self.spec.final_norm_filters]
        out += [(f, f) for f in self.spec.module_filters]
        out.append((None, _LAYERS))
        return out

    def _layer_scopes(self) -> list[str]:
        return [*self.spec.module_filters, _LAYERS]

    def _gene_name(self, model: int | None, scope: str, group: int | None, param: str) -> str:
        parts = [] if model is None else [source_letter(model)]
        if scope == _EMB:
            parts.append("emb")
        else:
            groups = self.groups()
            a, b = groups[group or 0]
            parts.append("all" if len(groups) == 1 else (f"L{a}" if b - a == 1 else f"L{a}-{b - 1}"))
            if scope != _LAYERS:
                parts.append(filter_tag(scope))
        parts.append(param)
        return ".".join(parts)

    def _range(self, param: str) -> tuple[float, float]:
        ranges = {"weight": self.spec.weight_range, "density": self.spec.density_range,
                  "t": self.spec.t_range}
        if param in ranges:
            return ranges[param]
        declared = self.info.declaration.param(param)  # a plugin's own searchable parameter
        if declared.minimum is None or declared.maximum is None:
            raise ValueError(f"{self.spec.method}: searchable parameter {param!r} declares no "
                             "minimum and maximum, so it has no range to search")
        return (declared.minimum, declared.maximum)

    def planned_dimension(self) -> int:
        n = self.spec.num_layers
        k = min(self.spec.granularity or n, n)
        owners = len(self.spec.models) if self.searched_model_params else 1
        params = len(self.searched_model_params or self.info.global_params)
        per_owner = params * (len(self._layer_scopes()) * -(-n // k) + int(self.spec.embedding_genes))
        return owners * per_owner

    def _declare(self) -> list[Gene]:
        genes: list[Gene] = []
        groups = self.groups()
        owners: list[int | None] = (
            [None] if not self.searched_model_params else list(range(len(self.spec.models)))
        )
        params = self.searched_model_params or self.info.global_params
        for model in owners:
            who = "" if model is None else f"model {source_letter(model)} · "
            for scope in self._layer_scopes():
                what = "" if scope == _LAYERS else f"{scope} · "
                for param in params:
                    for gi, (a, b) in enumerate(groups):
                        where = (
                            "all layers" if len(groups) == 1
                            else f"layer {a}" if b - a == 1 else f"layers {a}–{b - 1}"
                        )
                        genes.append(self._gene(model, scope, gi, param, f"{where} · {what}{who}{param}",
                                                layers=[a, b - 1]))
            if self.spec.embedding_genes:
                for param in params:
                    genes.append(self._gene(model, _EMB, None, param,
                                            f"embeddings, final norm, head · {who}{param}", layers=None))
        return genes

    def _gene(self, model: int | None, scope: str, group: int | None, param: str, label: str,
              layers: list[int] | None) -> Gene:
        low, high = self._range(param)
        meta: dict[str, Any] = {"param": param, "scope": "embeddings" if scope == _EMB else scope}
        if layers is not None:
            meta["layers"] = layers
        if model is not None:
            meta["model"] = source_letter(model)
            meta["model_ref"] = model_string(self.spec.models[model])
        return Gene(name=self._gene_name(model, scope, group, param), low=low, high=high,
                    label=label, meta=meta)

    # ---- decode --------------------------------------------------------------------
    def _setting(self, values: dict[str, float], model: int | None, param: str) -> Any:
        groups = self.groups()

        def per_layer(scope: str) -> float | list[float]:
            if len(groups) == 1:
                return values[self._gene_name(model, scope, 0, param)]
            return [
                values[self._gene_name(model, scope, self._group_of(layer), param)]
                for layer in range(self.spec.num_layers)
            ]

        scopes = self._scopes()
        if len(scopes) == 1:
            return per_layer(_LAYERS)
        items = []
        for flt, scope in scopes:
            value = values[self._gene_name(model, _EMB, None, param)] if scope == _EMB else per_layer(scope)
            items.append(ConditionalParameter(filter=flt, value=value))
        return items

    def _decode(self, values: dict[str, float]) -> Recipe:
        spec = self.spec
        entries = [
            ModelEntry(
                model=model_string(m),
                parameters={p: self._setting(values, i, p) for p in self.searched_model_params},
            )
            for i, m in enumerate(spec.models)
        ]
        parameters: dict[str, Any] = dict(spec.parameters)
        for p in self.info.global_params:
            parameters[p] = self._setting(values, None, p)
        return Recipe(
            merge_method=spec.method,
            base_model=model_string(spec.base_model) if spec.base_model is not None else None,
            models=entries,
            parameters=parameters,
            **spec.recipe_fields(),
        )

    # ---- encode --------------------------------------------------------------------
    def _scope_of(self, probe: pv.Probe) -> str:
        for flt, scope in self._scopes():
            if pv.filter_matches(flt, probe):
                return scope
        raise AssertionError("the last scope has no filter and matches everything")

    def encode(self, recipe: Recipe) -> dict[str, float]:
        spec, info = self.spec, self.info
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
        by_model = {e.model: e for e in recipe.models}
        want = [model_string(m) for m in spec.models]
        if len(by_model) != len(recipe.models) or set(by_model) != set(want):
            raise RecipeNotInSpace(
                f"the recipe merges models {[e.model for e in recipe.models]}, the space {want}"
            )
        self._check_fixed(recipe)

        hits: dict[str, list[tuple[float, str]]] = {}
        owners: list[int | None] = (
            [None] if not self.searched_model_params else list(range(len(spec.models)))
        )
        for model in owners:
            entry = by_model[want[model]] if model is not None else None
            for param in self.searched_model_params or info.global_params:
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
                    scope = self._scope_of(probe)
                    group = None if scope == _EMB else self._group_of(probe.layer or 0)
                    name = self._gene_name(model, scope, group, param)
                    hits.setdefault(name, []).append((float(value), probe.name))

        point: dict[str, float] = {}
        for gene in self.genes:
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

    def _check_fixed(self, recipe: Recipe) -> None:
        searched = set(self.searched_model_params) | set(self.info.global_params)
        fixed = {k: v for k, v in recipe.parameters.items() if k not in searched}
        for key in sorted(set(fixed) | set(self.spec.parameters)):
            if fixed.get(key) != self.spec.parameters.get(key):
                raise RecipeNotInSpace(
                    f"the recipe sets {key}: {fixed.get(key)!r}, the space fixes it to "
                    f"{self.spec.parameters.get(key)!r}; put the recipe's value in the space's parameters"
                )
        for entry in recipe.models or []:
            for key, value in entry.parameters.items():
                if key not in searched and value != self.spec.parameters.get(key):
                    raise RecipeNotInSpace(
                        f"model {entry.model!r} sets {key}: {value!r}, which this space does not search; "
                        "put it in the space's parameters (it applies to every model)"
                    )

    # ---- description ---------------------------------------------------------------
    def sources(self) -> list[ModelRef]:
        return ([self.spec.base_model] if self.spec.base_model is not None else []) + list(self.spec.models)

    def summary(self) -> str:
        spec = self.spec
        groups = self.groups()
        k = groups[0][1] - groups[0][0]
        parts = [
            f"{spec.method} of {len(spec.models)} model(s)",
            "one global layer group" if len(groups) == 1 else f"{len(groups)} layer groups of {k} layers",
        ]
        if spec.module_filters:
            parts.append("separate genes for " + ", ".join(spec.module_filters))
        if spec.embedding_genes:
            parts.append("embedding genes")
        return f"{'; '.join(parts)}: {self.dimension} genes"

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["models"] = {source_letter(i): model_string(m) for i, m in enumerate(self.spec.models)}
        if self.spec.base_model is not None:
            out["base_model"] = model_string(self.spec.base_model)
        out["layer_groups"] = [[a, b - 1] for a, b in self.groups()]
        return out
