"""The ``segments`` encoding of a layer-stacking space: one contiguous run of layers per
(repeat, source), as mergekit's passthrough slices are written.

Each segment ``k`` (source ``s`` in repeat ``r``, in slot order) has a ``first`` gene in
``[0, n)`` (floored: the first layer taken, as an offset into the source's layers) and
a ``count`` gene in ``[0, n]`` (rounded: how many consecutive layers; 0 leaves the
segment out), and with searched scales one ``scale`` gene for the whole run. The stack
is the non-empty runs in slot order.

Why: whole frankenmerges are a few contiguous runs; with one include bit per slot a
search must flip every bit of a run together, and a run's worth shows only once all of
them are in. Here a run is two numbers, so a stack of ``m`` runs is ``2m`` numbers
whatever the depth (8 numbers for two 4-layer sources repeated twice, against 16
include bits).

Depth bounds are met deterministically: too shallow, segments are lengthened in slot
order; too deep, they are shortened from the last.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search_spaces.base import RecipeNotInSpace
from search_spaces.genes import Gene
from search_spaces.sources import model_string, source_letter

if TYPE_CHECKING:
    from search_spaces.layer_stacking import LayerStackingSpace


@dataclass(frozen=True)
class Segment:
    index: int
    source: int
    repeat: int
    layers: range  # the layers the source contributes (its layer_range)


def segments(layers_per_source: list[range], repeats: int) -> list[Segment]:
    out: list[Segment] = []
    for rep in range(repeats):
        for si, layers in enumerate(layers_per_source):
            out.append(Segment(len(out), si, rep, layers))
    return out


def runs(segs: list[Segment], first: list[float], count: list[float],
         depth: tuple[int, int]) -> list[tuple[int, int, int]]:
    """``(segment index, first offset, layers)`` of each segment after rounding and the
    depth repair (0 layers: left out)."""
    starts, counts = [], []
    for seg, f, c in zip(segs, first, count):
        n = len(seg.layers)
        a = min(max(math.floor(f), 0), n - 1)
        starts.append(a)
        counts.append(min(max(math.floor(c + 0.5), 0), n - a))
    lo, hi = depth
    total = sum(counts)
    for k, seg in enumerate(segs):  # too shallow: lengthen in slot order, then start earlier
        if total >= lo:
            break
        grow = min(lo - total, len(seg.layers) - starts[k] - counts[k])
        counts[k] += grow
        total += grow
        back = min(lo - total, starts[k])
        starts[k] -= back
        counts[k] += back
        total += back
    for k in reversed(range(len(segs))):  # too deep: shorten from the last
        if total <= hi:
            break
        cut = min(total - hi, counts[k])
        counts[k] -= cut
        total -= cut
    return [(k, starts[k], counts[k]) for k in range(len(segs)) if counts[k] > 0]


# ---- the segments encoding of a LayerStackingSpace ----------------------------------
def declare_genes(space: LayerStackingSpace) -> list[Gene]:
    """The genes of a segments-encoded space: first, count (and scale) per segment."""
    spec = space.spec
    genes: list[Gene] = []
    for seg in space.segments():
        n = len(seg.layers)
        where = (f"segment {seg.index} · model {source_letter(seg.source)} layers "
                 f"{seg.layers.start}–{seg.layers.stop - 1} · repeat {seg.repeat + 1}")
        meta = {"segment": seg.index, "model": source_letter(seg.source),
                "model_ref": model_string(spec.sources[seg.source].model), "repeat": seg.repeat}
        genes.append(Gene(name=space.segment_gene(seg.index, "first"), low=0.0, high=float(n),
                          label=f"{where} · first layer", meta={**meta, "param": "first"}))
        genes.append(Gene(name=space.segment_gene(seg.index, "count"), low=0.0, high=float(n),
                          label=f"{where} · layers taken", meta={**meta, "param": "count"}))
        if spec.scales.search:
            genes.append(Gene(name=space.segment_gene(seg.index, "scale"), low=spec.scales.low,
                              high=spec.scales.high, transform=spec.scales.transform,
                              label=f"{where} · scale", meta={**meta, "param": "scale"}))
    return genes


def decode_runs(space: LayerStackingSpace,
                values: dict[str, float]) -> list[tuple[str, int, int, float | None]]:
    """``(model, first layer, end, scale)`` of each run the genes choose."""
    spec, segs = space.spec, space.segments()
    chosen = runs(segs, [values[space.segment_gene(s.index, "first")] for s in segs],
                  [values[space.segment_gene(s.index, "count")] for s in segs], spec.depth_bounds)
    out: list[tuple[str, int, int, float | None]] = []
    for k, offset, count in chosen:
        seg = segs[k]
        a = seg.layers.start + offset
        scale = values[space.segment_gene(k, "scale")] if spec.scales.search else None
        out.append((model_string(spec.sources[seg.source].model), a, a + count, scale))
    return out


def encode_runs(space: LayerStackingSpace, layers: list[tuple[str, int, float]]) -> dict[str, float]:
    """Each maximal run of consecutive layers of one model at one scale goes to the
    next segment of that model, in slot order."""
    spec, segs = space.spec, space.segments()
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
        point[space.segment_gene(seg.index, "first")] = 0.5
        point[space.segment_gene(seg.index, "count")] = 0.0
        if spec.scales.search:
            gene = space.genes[space.segment_gene(seg.index, "scale")]
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
        point[space.segment_gene(k, "first")] = a - segs[k].layers.start + 0.5
        point[space.segment_gene(k, "count")] = float(b - a)
        if spec.scales.search:
            point[space.segment_gene(k, "scale")] = space.genes[space.segment_gene(k, "scale")].coord(scale)
        k += 1
    return point
