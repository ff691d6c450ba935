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
