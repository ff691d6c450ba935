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

The gene layout (names, groups, ranges, decoding of values) is
:mod:`search_spaces.parameter_genes`; encoding a recipe is
:mod:`search_spaces.parameter_space_encode`.
"""

from __future__ import annotations

from typing import Any

from search_spaces.base import ResolvedSource, SearchSpace, SpaceProblem
from search_spaces.genes import Gene
from search_spaces.parameter_genes import GeneLayout
from search_spaces.parameter_space_encode import encode_recipe
from search_spaces.parameter_space_spec import METHODS, MethodInfo, ParameterSpaceSpec
from search_spaces.recipe import ModelEntry, Recipe
from search_spaces.registry import register_space
from search_spaces.sources import ModelRef, model_string, source_letter

__all__ = ["METHODS", "MethodInfo", "ParameterSpace", "ParameterSpaceSpec"]


START_SIGMA = 0.25  # CMA-ES's first step from the start, as a fraction of each gene's range


@register_space
class ParameterSpace(SearchSpace):
    """Per-layer-group weights / densities (or SLERP t) of a parameter-space merge."""

    kind = "parameter"
    spec_class = ParameterSpaceSpec
    derived_fields = ("models", "base_model", "num_layers")
    compatibility = "tensors"  # models fine-tuned from one base: identical tensor names and shapes
    task_vector_base = True  # the study's base is the base of the task vectors
    keeps_source_shapes = True
    recipe_view = "parameter"
    spec: ParameterSpaceSpec

    @classmethod
    def derive(cls, data: dict[str, Any], form: Any, sources: list[ResolvedSource],
               base: ResolvedSource | None) -> dict[str, Any]:
        """The sources merged against the base, layer by layer of the base."""
        info = METHODS[data["method"]]
        if info.needs_base and base is None:
            raise SpaceProblem(["base_model"], f"{data['method']} merges task vectors against a base: "
                               "base_model is missing", "set base_model to the model the sources were "
                               "fine-tuned from (or use method: linear)", "missing_base_model")
        if not info.declaration.base_is_input and base is not None:
            for m in sources:
                if m.ref == base.ref:
                    raise SpaceProblem(list(m.loc), f"{m.given!r} is the base model; the base is not a "
                                       "merged source", "remove it from sources (it stays base_model)",
                                       "base_among_sources")
        data.update(models=[m.spec_ref for m in sources], base_model=base.spec_ref if base else None,
                    num_layers=(base or sources[0]).num_layers)
        return data

    @classmethod
    def example_spec(cls, models: list[str], num_layers: int) -> dict[str, Any]:
        """TIES over the models after the first (the base), two layers a gene, attention apart."""
        return {"kind": cls.kind, "method": "ties", "base_model": models[0], "models": list(models[1:]),
                "num_layers": num_layers, "granularity": 2, "module_filters": ["attention"]}

    # ---- structure -----------------------------------------------------------------
    @property
    def layout(self) -> GeneLayout:
        """The genes of this space's spec (a view of the spec: cheap to make)."""
        return GeneLayout(self.spec)

    @property
    def info(self) -> MethodInfo:
        return METHODS[self.spec.method]

    @property
    def searched_model_params(self) -> tuple[str, ...]:
        return self.layout.searched_model_params

    def groups(self) -> list[tuple[int, int]]:
        """Layer groups as ``[start, end)`` ranges."""
        return self.layout.groups()

    def planned_dimension(self) -> int:
        return self.layout.planned_dimension()

    def _declare(self) -> list[Gene]:
        return self.layout.declare()

    # ---- decode / encode -----------------------------------------------------------
    def _decode(self, values: dict[str, float]) -> Recipe:
        spec, layout = self.spec, self.layout
        entries = [
            ModelEntry(
                model=model_string(m),
                parameters={p: layout.setting(values, i, p) for p in layout.searched_model_params},
            )
            for i, m in enumerate(spec.models)
        ]
        parameters: dict[str, Any] = dict(spec.parameters)
        for p in self.info.global_params:
            parameters[p] = layout.setting(values, None, p)
        return Recipe(
            merge_method=spec.method,
            base_model=model_string(spec.base_model) if spec.base_model is not None else None,
            models=entries,
            parameters=parameters,
            **spec.recipe_fields(),
        )

    def encode(self, recipe: Recipe) -> dict[str, float]:
        return encode_recipe(self.layout, self.genes, recipe)

    def start_sigma(self) -> float:
        """0.25 of each range (about 0.9 weight units in [-0.5, 3]): from task arithmetic a
        search must reach far, e.g. to drop a harmful expert from +1 to 0; with 1/6 one of 3
        seeds stalled on the distractor zoo, and 0.25 beat 0.3 by about 2 points on two of
        four zoo variants and tied on the others (bench/search_quality.py, docs/benchmarks.md)."""
        return START_SIGMA

    def start(self) -> dict[str, float]:
        """Each parameter where its declaration starts a search (weights 1: task
        arithmetic; densities at their default 1; slerp's t at 0.5), within the range."""
        declaration = self.info.declaration
        point: dict[str, float] = {}
        for gene in self.genes:
            first = declaration.param(gene.meta["param"]).search_start
            value = gene.value(gene.coord_center) if first is None else min(max(first, gene.low), gene.high)
            point[gene.name] = gene.coord(value)
        return point

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
