"""The gene layout of a parameter space: which genes exist, what each is called, which
tensors each one covers, and how gene values become a recipe parameter.

A gene is named ``[model.]where[.filter].param``: ``A.L0-3.attn.weight`` (model A,
layers 0–3, the attention module filter), ``all.t`` (slerp's t, one global layer group),
``B.emb.density`` (model B's embeddings, final norm and head). :mod:`parameter_space`
decodes and :mod:`parameter_space_encode` encodes through these names.
"""

from __future__ import annotations

from typing import Any

from search_spaces.genes import Gene
from search_spaces.parameter_space_spec import METHODS, MethodInfo, ParameterSpaceSpec, filter_tag
from search_spaces.recipe import ConditionalParameter
from search_spaces.sources import model_string, source_letter

EMB = "emb"  # scope key of the genes for embeddings, final norm and head
LAYERS = "layers"  # scope key of the genes for the layer tensors no module filter takes


class GeneLayout:
    """The genes of one :class:`ParameterSpaceSpec`, computed from the spec alone."""

    def __init__(self, spec: ParameterSpaceSpec) -> None:
        self.spec = spec

    # ---- structure -----------------------------------------------------------------
    @property
    def info(self) -> MethodInfo:
        return METHODS[self.spec.method]

    @property
    def searched_model_params(self) -> tuple[str, ...]:
        return tuple(p for p in self.info.model_params if p != "density" or self.spec.search_density)

    @property
    def params(self) -> tuple[str, ...]:
        """The parameters that have genes: the per-model ones, else the global ones."""
        return self.searched_model_params or self.info.global_params

    @property
    def owners(self) -> list[int | None]:
        """Whose genes: each source model's index, or None for the one global set."""
        return [None] if not self.searched_model_params else list(range(len(self.spec.models)))

    def _group_size(self) -> int:
        n = self.spec.num_layers
        return min(self.spec.granularity or n, n)

    def groups(self) -> list[tuple[int, int]]:
        """Layer groups as ``[start, end)`` ranges."""
        n, k = self.spec.num_layers, self._group_size()
        return [(a, min(a + k, n)) for a in range(0, n, k)]

    def group_of(self, layer: int) -> int:
        return layer // self._group_size()

    def scopes(self) -> list[tuple[str | None, str]]:
        """The filtered-list structure of a decoded parameter, first match wins:
        ``(filter, scope key)``; the scope key names the genes that fill it."""
        out: list[tuple[str | None, str]] = []
        if self.spec.embedding_genes:
            out.append(("embeddings", EMB))
            out += [(f, EMB) for f in self.spec.final_norm_filters]
        out += [(f, f) for f in self.spec.module_filters]
        out.append((None, LAYERS))
        return out

    def layer_scopes(self) -> list[str]:
        return [*self.spec.module_filters, LAYERS]

    def gene_name(self, model: int | None, scope: str, group: int | None, param: str) -> str:
        parts = [] if model is None else [source_letter(model)]
        if scope == EMB:
            parts.append("emb")
        else:
            groups = self.groups()
            a, b = groups[group or 0]
            parts.append("all" if len(groups) == 1 else (f"L{a}" if b - a == 1 else f"L{a}-{b - 1}"))
            if scope != LAYERS:
                parts.append(filter_tag(scope))
        parts.append(param)
        return ".".join(parts)

    def value_range(self, param: str) -> tuple[float, float]:
        ranges = {"weight": self.spec.weight_range, "density": self.spec.density_range,
                  "t": self.spec.t_range}
        if param in ranges:
            return ranges[param]
        declared = self.info.declaration.param(param)  # a plugin's own searchable parameter
        if declared.minimum is None or declared.maximum is None:
            raise ValueError(f"{self.spec.method}: searchable parameter {param!r} declares no "
                             "minimum and maximum, so it has no range to search")
        return (declared.minimum, declared.maximum)

    # ---- declaration ---------------------------------------------------------------
    def planned_dimension(self) -> int:
        n, k = self.spec.num_layers, self._group_size()
        owners = len(self.spec.models) if self.searched_model_params else 1
        genes_per_param = len(self.layer_scopes()) * -(-n // k) + int(self.spec.embedding_genes)
        per_owner = len(self.params) * genes_per_param
        return owners * per_owner

    def declare(self) -> list[Gene]:
        """The genes, in a stable order: by owner, scope, parameter, layer group."""
        genes: list[Gene] = []
        groups = self.groups()
        for model in self.owners:
            who = "" if model is None else f"model {source_letter(model)} · "
            for scope in self.layer_scopes():
                what = "" if scope == LAYERS else f"{scope} · "
                for param in self.params:
                    for gi, (a, b) in enumerate(groups):
                        where = (
                            "all layers" if len(groups) == 1
                            else f"layer {a}" if b - a == 1 else f"layers {a}–{b - 1}"
                        )
                        genes.append(self._gene(model, scope, gi, param, f"{where} · {what}{who}{param}",
                                                layers=[a, b - 1]))
            if self.spec.embedding_genes:
                for param in self.params:
                    genes.append(self._gene(model, EMB, None, param,
                                            f"embeddings, final norm, head · {who}{param}", layers=None))
        return genes

    def _gene(self, model: int | None, scope: str, group: int | None, param: str, label: str,
              layers: list[int] | None) -> Gene:
        low, high = self.value_range(param)
        meta: dict[str, Any] = {"param": param, "scope": "embeddings" if scope == EMB else scope}
        if layers is not None:
            meta["layers"] = layers
            # one model's parameter in every layer group: a coarse search moves them together
            meta["tie"] = f"{'' if model is None else source_letter(model)}.{scope}.{param}"
        if model is not None:
            meta["model"] = source_letter(model)
            meta["model_ref"] = model_string(self.spec.models[model])
        return Gene(name=self.gene_name(model, scope, group, param), low=low, high=high,
                    label=label, meta=meta)

    # ---- decoding ------------------------------------------------------------------
    def setting(self, values: dict[str, float], model: int | None, param: str) -> Any:
        """The recipe value of ``param`` (for source ``model``, or global) from gene values:
        a scalar, a per-layer list, or a filtered list of those (module docstring of
        :mod:`search_spaces.parameter_space`)."""
        groups = self.groups()

        def per_layer(scope: str) -> float | list[float]:
            if len(groups) == 1:
                return values[self.gene_name(model, scope, 0, param)]
            return [
                values[self.gene_name(model, scope, self.group_of(layer), param)]
                for layer in range(self.spec.num_layers)
            ]

        scopes = self.scopes()
        if len(scopes) == 1:
            return per_layer(LAYERS)
        items = []
        for flt, scope in scopes:
            value = values[self.gene_name(model, EMB, None, param)] if scope == EMB else per_layer(scope)
            items.append(ConditionalParameter(filter=flt, value=value))
        return items
