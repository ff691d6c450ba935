"""Layer stacking (DFS, the data-flow space of Akiba et al. 2024).

The ``M`` layers of the sources, in order (source 0's layers, then source 1's, …), are
repeated ``r`` times, giving ``T = M × r`` slots. The genome holds, per slot, whether the
slot is included and the scale of its residual contribution. The decoded recipe is a
``passthrough`` recipe whose layers are the included slots in slot order, each with its
scale; embeddings, final norm and head come from ``base_model``.

Encodings (both continuous, so CMA-ES and TPE search them directly):

- ``threshold`` (default): one gene ``u ∈ [0, 1]`` per slot, included when ``u > 0.5``
  — the paper's indicator as the threshold of a real gene. The distance from 0.5 is the
  optimizer's confidence, which the depth repair uses: with fewer than ``min_depth``
  slots included, the excluded slots with the highest ``u`` are added; with more than
  ``max_depth``, the included ones with the lowest ``u`` are dropped. Deterministic.
- ``ranked``: one priority per slot plus a ``depth`` gene; the ``round(depth)`` slots
  of highest priority are included. Every point is feasible without repair and the
  depth is searched explicitly, at the price of coupling all slots through the ranking.
- ``segments``: one contiguous run of layers per source and repeat (a first layer, a
  length and a scale): mergekit's slices as genes (:mod:`search_spaces.stacking_segments`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Union

from pydantic import AfterValidator, Field

from search_spaces.base import RecipeNotInSpace, ResolvedSource, SearchSpace, SpaceProblem
from search_spaces.genes import Gene
from search_spaces.layer_stacking_spec import (
    MAX_STACK_SOURCES,
    StackingSpaceSpec,
    _check_layer_ranges,
    _LayerIndex,
)
from search_spaces.recipe import Recipe, Slice, SliceSource
from search_spaces.registry import register_space
from search_spaces.sources import ModelRef, model_string, source_letter
from search_spaces.stacking_segments import Segment, declare_genes, decode_runs, encode_runs, segments

INCLUDED, EXCLUDED = 0.75, 0.25  # what encode writes for a slot's include / priority gene



def recipe_layers(recipe: Recipe, base: str) -> list[tuple[str, int, float]]:
    """``(model, layer, scale)`` of each output layer of a passthrough recipe whose
    embeddings and head come from ``base``; RecipeNotInSpace says why a recipe is not one."""
    if recipe.merge_method != "passthrough" or recipe.slices is None:
        raise RecipeNotInSpace("a stacking space expresses passthrough recipes with 'slices'")
    edges = {recipe.slices[0].sources[0].model, recipe.slices[-1].sources[0].model}
    if recipe.base_model != base and not (recipe.base_model is None and edges == {base}):
        owner = recipe.base_model or "its first/last slices"
        raise RecipeNotInSpace(
            f"the recipe takes embeddings and head from {owner!r}, the space from {base!r}"
        )
    if recipe.parameters:
        raise RecipeNotInSpace(
            f"the recipe sets parameters {sorted(recipe.parameters)}; a stacking space uses scale only"
        )
    layers: list[tuple[str, int, float]] = []
    for i, sl in enumerate(recipe.slices):
        if len(sl.sources) != 1 or sl.parameters or sl.base_model or sl.sources[0].parameters:
            raise RecipeNotInSpace(
                f"slice {i} has several sources, parameters or a base_model: a stacking space "
                "expresses one source per slice with an optional scale"
            )
        src = sl.sources[0]
        scale = 1.0 if src.scale is None else float(src.scale)
        layers += [(src.model, layer, scale) for layer in range(*src.layer_range)]
    return layers


@dataclass(frozen=True)
class Slot:
    index: int
    source: int
    layer: int
    repeat: int


@register_space
class LayerStackingSpace(SearchSpace):
    """Which slots of the repeated source layers to stack, and their scales."""

    kind = "stacking"
    spec_class = StackingSpaceSpec
    derived_fields = ("sources", "base_model")
    compatibility = "layers"  # sources of one architecture and width; layer counts may differ
    task_vector_base = False  # the base only lends embeddings, final norm and head
    keeps_source_shapes = False  # the depth changes: a study built on a trial needs its export
    recipe_view = "stacking"
    base_may_be_source = True
    form_fields: ClassVar[dict[str, tuple[Any, Any]]] = {"layer_ranges": (
        Annotated[Union[list[Union[tuple[_LayerIndex, _LayerIndex], None]], None],
                  AfterValidator(_check_layer_ranges)],
        Field(default=None, max_length=MAX_STACK_SOURCES,
              description="one entry per source: [start, end) of the layers it contributes, or null "
              "for all of them"),
    )}

    @classmethod
    def derive(cls, data: dict[str, Any], form: Any, sources: list[ResolvedSource],
               base: ResolvedSource | None) -> dict[str, Any]:
        """Each source with its layer count and the user's layer range (``layer_ranges``)."""
        ranges = getattr(form, "layer_ranges", None)
        if ranges is not None and len(ranges) != len(sources):
            raise SpaceProblem(["space", "layer_ranges"],
                               f"layer_ranges has {len(ranges)} entries for {len(sources)} sources",
                               "give one entry per source, in the order of sources (null: all its layers)",
                               "layer_ranges_mismatch")
        data.update(
            sources=[{"model": m.spec_ref, "num_layers": m.num_layers,
                      "layer_range": ranges[i] if ranges else None} for i, m in enumerate(sources)],
            base_model=base.spec_ref if base else None,
        )
        return data
    spec: StackingSpaceSpec

    @classmethod
    def example_spec(cls, models: list[str], num_layers: int) -> dict[str, Any]:
        """Every layer of each model, twice, with a scale per slot."""
        return {"kind": cls.kind, "base_model": models[0], "repeats": 2,
                "sources": [{"model": m, "num_layers": num_layers} for m in models]}

    def merge_method(self) -> str:
        return "passthrough"

    def stacked_layers(self) -> int | None:
        return self.spec.depth_bounds[1]

    def slots(self) -> list[Slot]:
        out: list[Slot] = []
        for rep in range(self.spec.repeats):
            for si, src in enumerate(self.spec.sources):
                out.extend(Slot(len(out), si, layer, rep) for layer in src.layers)
        return out

    def gene_name(self, k: int, role: str) -> str:
        """The name of slot k's gene: role is include, priority or scale."""
        width = len(str(self.spec.num_slots - 1))
        return f"s{k:0{width}d}.{role}"

    def planned_dimension(self) -> int:
        per_slot = 2 if self.spec.scales.search else 1
        if self.spec.encoding == "segments":
            return len(self.segments()) * (per_slot + 1)
        return self.spec.num_slots * per_slot + int(self.spec.encoding == "ranked")

    def segments(self) -> list[Segment]:
        return segments([s.layers for s in self.spec.sources], self.spec.repeats)

    def segment_gene(self, k: int, role: str) -> str:
        """The name of segment k's gene: role is first, count or scale."""
        width = len(str(len(self.segments()) - 1))
        return f"g{k:0{width}d}.{role}"

    def _declare(self) -> list[Gene]:
        spec = self.spec
        if spec.encoding == "segments":
            return declare_genes(self)
        genes: list[Gene] = []
        role = "include" if spec.encoding == "threshold" else "priority"
        for slot in self.slots():
            where = (
                f"slot {slot.index} · model {source_letter(slot.source)} layer {slot.layer} · "
                f"repeat {slot.repeat + 1}"
            )
            meta = {
                "slot": slot.index,
                "model": source_letter(slot.source),
                "model_ref": model_string(spec.sources[slot.source].model),
                "layer": slot.layer,
                "repeat": slot.repeat,
            }
            genes.append(Gene(name=self.gene_name(slot.index, role), low=0.0, high=1.0,
                              label=f"{where} · {role}", meta={**meta, "param": role}))
            if spec.scales.search:
                genes.append(Gene(name=self.gene_name(slot.index, "scale"), low=spec.scales.low,
                                  high=spec.scales.high, transform=spec.scales.transform,
                                  label=f"{where} · scale", meta={**meta, "param": "scale"}))
        if spec.encoding == "ranked":
            lo, hi = spec.depth_bounds
            genes.append(Gene(name="depth", low=lo - 0.5, high=hi + 0.5, label="output depth (layers)",
                              meta={"param": "depth"}))
        return genes

    # ---- decode --------------------------------------------------------------------
    def chosen_slots(self, values: dict[str, float]) -> list[int]:
        """Indices of the included slots, in slot order, depth constraints applied."""
        spec = self.spec
        lo, hi = spec.depth_bounds
        n = spec.num_slots
        if spec.encoding == "ranked":
            prio = [values[self.gene_name(k, "priority")] for k in range(n)]
            depth = min(max(math.floor(values["depth"] + 0.5), lo), hi)
            return sorted(sorted(range(n), key=lambda k: (-prio[k], k))[:depth])
        u = [values[self.gene_name(k, "include")] for k in range(n)]
        chosen = {k for k in range(n) if u[k] > 0.5}
        if len(chosen) < lo:  # add the excluded slots closest to being included
            extra = sorted((k for k in range(n) if k not in chosen), key=lambda k: (-u[k], k))
            chosen.update(extra[: lo - len(chosen)])
        elif len(chosen) > hi:  # drop the included slots closest to being excluded
            weakest = sorted(chosen, key=lambda k: (u[k], k))
            chosen.difference_update(weakest[: len(chosen) - hi])
        return sorted(chosen)

    def _decode(self, values: dict[str, float]) -> Recipe:
        spec = self.spec
        slots = self.slots()
        runs: list[tuple[str, int, int, float | None]] = []  # model, start, end, scale
        if spec.encoding == "segments":
            runs = decode_runs(self, values)
        for k in (self.chosen_slots(values) if spec.encoding != "segments" else []):
            slot = slots[k]
            model = model_string(spec.sources[slot.source].model)
            scale = values[self.gene_name(k, "scale")] if spec.scales.search else None
            if runs and runs[-1][0] == model and runs[-1][2] == slot.layer and runs[-1][3] == scale:
                m, a, _, s = runs[-1]
                runs[-1] = (m, a, slot.layer + 1, s)
            else:
                runs.append((model, slot.layer, slot.layer + 1, scale))
        return Recipe(
            merge_method="passthrough",
            base_model=model_string(spec.base()),
            slices=[
                Slice(sources=[SliceSource(model=m, layer_range=(a, b), scale=s)]) for m, a, b, s in runs
            ],
            **spec.recipe_fields(),
        )

    # ---- encode --------------------------------------------------------------------
    def encode(self, recipe: Recipe) -> dict[str, float]:
        spec = self.spec
        layers = recipe_layers(recipe, model_string(self.spec.base()))
        lo, hi = spec.depth_bounds
        if not lo <= len(layers) <= hi:
            raise RecipeNotInSpace(f"the recipe has {len(layers)} layers; the space allows {lo}–{hi}")
        if spec.encoding == "segments":
            return encode_runs(self, layers)
        slots = self.slots()
        models = [model_string(s.model) for s in spec.sources]
        chosen: dict[int, float] = {}
        k = 0
        for i, (model, layer, scale) in enumerate(layers):
            while k < len(slots) and (models[slots[k].source], slots[k].layer) != (model, layer):
                k += 1
            if k == len(slots):
                raise RecipeNotInSpace(
                    f"output layer {i} ({model!r} layer {layer}) has no slot after the previous layer's: "
                    f"the recipe's layers are not in the order of the {spec.num_slots} slots "
                    f"(sources {models} repeated {spec.repeats}×); raise repeats or add the source"
                )
            if spec.scales.search and not spec.scales.low <= scale <= spec.scales.high:
                raise RecipeNotInSpace(
                    f"output layer {i} has scale {scale}, outside the space's "
                    f"[{spec.scales.low}, {spec.scales.high}]"
                )
            if not spec.scales.search and scale != 1.0:
                raise RecipeNotInSpace(f"output layer {i} has scale {scale}; this space searches no scales")
            chosen[k] = scale
            k += 1
        point: dict[str, float] = {}
        role = "include" if spec.encoding == "threshold" else "priority"
        for slot in slots:
            point[self.gene_name(slot.index, role)] = INCLUDED if slot.index in chosen else EXCLUDED
            if spec.scales.search:
                gene = self.genes[self.gene_name(slot.index, "scale")]
                default = 1.0 if gene.low <= 1.0 <= gene.high else gene.value(gene.coord_center)
                point[gene.name] = gene.coord(chosen.get(slot.index, default))
        if spec.encoding == "ranked":
            point["depth"] = float(len(layers))
        return point

    def start(self) -> dict[str, float] | None:
        """The base model's own layers, in order, at scale 1 (its identity path), when the
        base is a source and the depth bounds allow it: the search starts from the model
        it grows (PS then DFS: the best parameter-space merge) and adds or drops slots."""
        spec = self.spec
        base = model_string(spec.base())
        own = next((s for s in spec.sources if model_string(s.model) == base), None)
        if own is None:
            return None
        recipe = Recipe(merge_method="passthrough", base_model=base,
                        slices=[Slice(sources=[SliceSource(model=base, layer_range=(own.layers.start,
                                                                                  own.layers.stop))])],
                        **spec.recipe_fields())
        try:
            return self.encode(recipe)
        except RecipeNotInSpace:
            return None

    # ---- description ---------------------------------------------------------------
    def sources(self) -> list[ModelRef]:
        refs: list[ModelRef] = [s.model for s in self.spec.sources]
        base = self.spec.base()
        if model_string(base) not in {model_string(r) for r in refs}:
            refs.insert(0, base)
        return refs

    def summary(self) -> str:
        spec = self.spec
        m = sum(len(s.layers) for s in spec.sources)
        lo, hi = spec.depth_bounds
        scales = (
            f", scales in [{spec.scales.low}, {spec.scales.high}]"
            + (" (log)" if spec.scales.transform == "log" else "")
            if spec.scales.search else ""
        )
        return (
            f"layer stacking of M={m} layers from {len(spec.sources)} model(s) × r={spec.repeats} = "
            f"{spec.num_slots} slots, depth {lo}–{hi}, {spec.encoding} encoding{scales}: "
            f"{self.dimension} genes"
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["models"] = {source_letter(i): model_string(s.model) for i, s in enumerate(self.spec.sources)}
        out["base_model"] = model_string(self.spec.base())
        out["slots"] = [
            {"slot": s.index, "model": source_letter(s.source), "layer": s.layer, "repeat": s.repeat}
            for s in self.slots()
        ]
        return out
