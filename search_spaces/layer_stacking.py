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
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from search_spaces.base import RecipeNotInSpace, ResolvedSource, SearchSpace, SpaceProblem, SpaceSpecBase
from search_spaces.genes import Gene, Transform
from search_spaces.recipe import Recipe, Slice, SliceSource
from search_spaces.registry import register_space
from search_spaces.sources import ModelRef, model_string, source_letter
from search_spaces.stacking_segments import Segment, runs, segments

MAX_LAYERS = 100_000
MAX_REPEATS = 16
MAX_SCALE = 1000.0
MAX_STACK_SOURCES = 64
_LayerIndex = Annotated[int, Field(ge=0, le=MAX_LAYERS)]


def _check_layer_ranges(value: Any) -> Any:
    """A study form's ``layer_ranges``: each ``[start, end)`` non-empty (end exclusive)."""
    for r in value or []:
        if r is not None and not 0 <= r[0] < r[1]:
            raise ValueError(f"layer range {list(r)} must satisfy 0 <= start < end (end exclusive)")
    return value
INCLUDED, EXCLUDED = 0.75, 0.25  # what encode writes for a slot's include / priority gene


class StackSource(BaseModel):
    """A source model and the layers of it that enter the slots."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef
    num_layers: int = Field(ge=1, le=MAX_LAYERS,
                            description="the model's decoder layers (filled in by the service)")
    layer_range: tuple[int, int] | None = Field(
        default=None, description="[start, end) of the layers used; default all"
    )

    @model_validator(mode="after")
    def _range(self) -> StackSource:
        if self.layer_range is not None:
            a, b = self.layer_range
            if not 0 <= a < b <= self.num_layers:
                raise ValueError(
                    f"layer_range {list(self.layer_range)} of {model_string(self.model)!r} must satisfy "
                    f"0 <= start < end <= num_layers ({self.num_layers})"
                )
        return self

    @property
    def layers(self) -> range:
        a, b = self.layer_range or (0, self.num_layers)
        return range(a, b)


class ScaleSpec(BaseModel):
    """Per-slot scales of the residual contribution."""

    model_config = ConfigDict(extra="forbid")
    search: bool = Field(default=False, description="search a scale per slot or segment (default: every "
                         "scale is 1; searched scales drowned the search in bench/search_quality.py)")
    low: float = Field(default=0.5, ge=-MAX_SCALE, le=MAX_SCALE)
    high: float = Field(default=1.5, ge=-MAX_SCALE, le=MAX_SCALE)
    transform: Transform = Field(default="identity", description="'log' searches the scale's logarithm")

    @model_validator(mode="after")
    def _bounds(self) -> ScaleSpec:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or not 0 < self.low < self.high:
            raise ValueError(f"scales need 0 < low < high, got [{self.low}, {self.high}]")
        return self


class StackingSpaceSpec(SpaceSpecBase):
    """A layer-stacking search."""

    kind: Literal["stacking"] = "stacking"
    sources: list[StackSource] = Field(min_length=1, max_length=MAX_STACK_SOURCES)
    repeats: int = Field(default=2, ge=1, le=MAX_REPEATS,
                         description=f"r: how many times the source layers repeat, 1 … {MAX_REPEATS}")
    min_depth: int | None = Field(default=None, ge=1, le=MAX_LAYERS,
                                  description="fewest output layers (default 1)")
    max_depth: int | None = Field(default=None, ge=1, le=MAX_LAYERS,
                                  description="most output layers (default T)")
    base_model: ModelRef | None = Field(
        default=None, description="owner of embeddings, final norm and head (default: the first source)"
    )
    encoding: Literal["threshold", "ranked", "segments"] = Field(
        default="segments", description="segments: one run of layers per source and repeat (default); "
        "threshold: an include gene per slot; ranked: a priority per slot and a depth")
    scales: ScaleSpec = Field(default_factory=ScaleSpec)

    @model_validator(mode="after")
    def _consistent(self) -> StackingSpaceSpec:
        names = [model_string(s.model) for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"sources are listed twice: {dupes}; use repeats to reuse layers")
        slots = self.num_slots
        lo, hi = self.depth_bounds
        if hi > slots:
            raise ValueError(f"max_depth {hi} exceeds the {slots} slots (M × r)")
        if lo > hi:
            raise ValueError(f"min_depth {lo} exceeds max_depth {hi}")
        return self

    @property
    def num_slots(self) -> int:
        return self.repeats * sum(len(s.layers) for s in self.sources)

    @property
    def depth_bounds(self) -> tuple[int, int]:
        return self.min_depth or 1, self.max_depth or self.num_slots

    def base(self) -> ModelRef:
        return self.base_model if self.base_model is not None else self.sources[0].model


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

    def _declare_segments(self) -> list[Gene]:
        spec = self.spec
        genes: list[Gene] = []
        for seg in self.segments():
            n = len(seg.layers)
            where = (f"segment {seg.index} · model {source_letter(seg.source)} layers "
                     f"{seg.layers.start}–{seg.layers.stop - 1} · repeat {seg.repeat + 1}")
            meta = {"segment": seg.index, "model": source_letter(seg.source),
                    "model_ref": model_string(spec.sources[seg.source].model), "repeat": seg.repeat}
            genes.append(Gene(name=self.segment_gene(seg.index, "first"), low=0.0, high=float(n),
                              label=f"{where} · first layer", meta={**meta, "param": "first"}))
            genes.append(Gene(name=self.segment_gene(seg.index, "count"), low=0.0, high=float(n),
                              label=f"{where} · layers taken", meta={**meta, "param": "count"}))
            if spec.scales.search:
                genes.append(Gene(name=self.segment_gene(seg.index, "scale"), low=spec.scales.low,
                                  high=spec.scales.high, transform=spec.scales.transform,
                                  label=f"{where} · scale", meta={**meta, "param": "scale"}))
        return genes

    def _declare(self) -> list[Gene]:
        spec = self.spec
        if spec.encoding == "segments":
            return self._declare_segments()
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

    def _segment_runs(self, values: dict[str, float]) -> list[tuple[str, int, int, float | None]]:
        spec, segs = self.spec, self.segments()
        chosen = runs(segs, [values[self.segment_gene(s.index, "first")] for s in segs],
                      [values[self.segment_gene(s.index, "count")] for s in segs], spec.depth_bounds)
        out: list[tuple[str, int, int, float | None]] = []
        for k, offset, count in chosen:
            seg = segs[k]
            a = seg.layers.start + offset
            scale = values[self.segment_gene(k, "scale")] if spec.scales.search else None
            out.append((model_string(spec.sources[seg.source].model), a, a + count, scale))
        return out

    def _decode(self, values: dict[str, float]) -> Recipe:
        spec = self.spec
        slots = self.slots()
        runs: list[tuple[str, int, int, float | None]] = []  # model, start, end, scale
        if spec.encoding == "segments":
            runs = self._segment_runs(values)
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
    def _layers_of(self, recipe: Recipe) -> list[tuple[str, int, float]]:
        if recipe.merge_method != "passthrough" or recipe.slices is None:
            raise RecipeNotInSpace("a stacking space expresses passthrough recipes with 'slices'")
        base = model_string(self.spec.base())
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

    def _encode_segments(self, layers: list[tuple[str, int, float]]) -> dict[str, float]:
        """Each maximal run of consecutive layers of one model at one scale goes to the
        next segment of that model, in slot order."""
        spec, segs = self.spec, self.segments()
        models = [model_string(s.model) for s in spec.sources]
        run_list: list[list[Any]] = []  # model, first layer, end, scale
        for model, layer, scale in layers:
            last = run_list[-1] if run_list else None
            if last and last[0] == model and last[2] == layer and last[3] == scale:
                last[2] = layer + 1
            else:
                run_list.append([model, layer, layer + 1, scale])
        point: dict[str, float] = {}
        for seg in segs:  # left out unless a run is put there
            point[self.segment_gene(seg.index, "first")] = 0.5
            point[self.segment_gene(seg.index, "count")] = 0.0
            if spec.scales.search:
                gene = self.genes[self.segment_gene(seg.index, "scale")]
                neutral = 1.0 if gene.low <= 1.0 <= gene.high else gene.value(gene.coord_center)
                point[gene.name] = gene.coord(neutral)
        k = 0
        for i, (model, a, b, scale) in enumerate(run_list):
            while k < len(segs) and not (models[segs[k].source] == model and a in segs[k].layers
                                         and b <= segs[k].layers.stop):
                k += 1
            if k == len(segs):
                raise RecipeNotInSpace(
                    f"run {i} ({model!r} layers {a}–{b - 1}) has no segment after the previous run's: the "
                    f"recipe's runs are not in the order of the {len(segs)} segments (sources {models} "
                    f"repeated {spec.repeats}×); raise repeats or add the source")
            if spec.scales.search and not spec.scales.low <= scale <= spec.scales.high:
                raise RecipeNotInSpace(f"run {i} has scale {scale}, outside the space's "
                                       f"[{spec.scales.low}, {spec.scales.high}]")
            if not spec.scales.search and scale != 1.0:
                raise RecipeNotInSpace(f"run {i} has scale {scale}; this space searches no scales")
            point[self.segment_gene(k, "first")] = a - segs[k].layers.start + 0.5
            point[self.segment_gene(k, "count")] = float(b - a)
            if spec.scales.search:
                point[self.segment_gene(k, "scale")] = self.genes[self.segment_gene(k, "scale")].coord(scale)
            k += 1
        return point

    def encode(self, recipe: Recipe) -> dict[str, float]:
        spec = self.spec
        layers = self._layers_of(recipe)
        lo, hi = spec.depth_bounds
        if not lo <= len(layers) <= hi:
            raise RecipeNotInSpace(f"the recipe has {len(layers)} layers; the space allows {lo}–{hi}")
        if spec.encoding == "segments":
            return self._encode_segments(layers)
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
