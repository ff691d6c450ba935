"""Exact magnitude histograms of task vectors: where a trim's threshold lies, without a
sorted copy (``MagnitudeHistogram``), and the exact values of one bin (``BinDetail``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


def _bits_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


@dataclass
class BinDetail:
    """The exact values in one histogram bin: each value's low bits (``subs``,
    ascending) and how many entries hold it."""

    subs: torch.Tensor
    counts: torch.Tensor

    @classmethod
    def from_chunks(cls, per_chunk: list[tuple[torch.Tensor, torch.Tensor]]) -> BinDetail:
        """From each chunk's (low bits, counts) of the bin's entries."""
        subs = torch.cat([p[0] for p in per_chunk]) if per_chunk else torch.empty(0, dtype=torch.int64)
        counts = torch.cat([p[1] for p in per_chunk]) if per_chunk else torch.empty(0, dtype=torch.int64)
        unique, inverse = torch.unique(subs, return_inverse=True)
        totals = torch.zeros(unique.numel(), dtype=torch.int64).index_add_(0, inverse, counts.long())
        return cls(unique.to(torch.int32), totals.to(torch.int32))

    @property
    def nbytes(self) -> int:
        return 8 * self.subs.numel()


class MagnitudeHistogram:
    """Exact counts of a task vector's float32 magnitudes in narrow bins.

    A non-negative float's bit pattern orders as the float does, so dropping its low
    ``shift`` bits gives bins of relative width 2^(shift - 23): 2^-14 to start with
    (magnitudes below 2^-30 share the first bin, above 2^10 the last). Only occupied
    bins are kept, each with its count, lowest and highest value; a task vector that
    occupies more than ``MAX_OCCUPIED`` bins gets coarser ones (3 bits at a time), so a
    histogram stays under 1.3 MB (a bf16 task vector of 11M entries occupies about 33k
    bins: 0.7 MB). A worker keeps one per task vector (``TensorInputs.magnitude_histogram``),
    built at first use. For any trim it names the bin that holds the threshold and how
    many entries lie above it, exactly.

    A bin of one value gives the threshold with no pass at all. Task vectors of bf16 or
    fp16 sources are made of few distinct values (tens of thousands in 11M entries), so
    when the histogram is built, a second pass finds the exact values of its bins of
    several values (``refine``: kept in ``exact_bits``, up to ``MAX_REFINED`` values); then
    every trim of that task vector is read off the histogram, with no pass over the
    tensor. Float32 task vectors have too many values for that: a crowded bin is
    resolved by one counting pass (kept in ``details`` for later candidates), a sparse
    bin's few entries are gathered.
    """

    FINE = 9
    MAX_OCCUPIED = 1 << 16
    MAX_DETAILS = 256  # bins resolved to exact values by a candidate, kept per task vector
    MAX_REFINED = 1 << 16  # values that ``refine`` keeps, at most (8 bytes each)

    def __init__(self) -> None:
        self.shift = self.FINE
        self.first, self.bins = self._range(self.shift)
        self._dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (
            torch.zeros(self.bins, dtype=torch.int64), torch.full((self.bins,), math.inf),
            torch.full((self.bins,), -math.inf))
        self.ids = self.counts = self.lows = self.highs = self.from_top = torch.empty(0)
        self.n = 0
        self.details: dict[int, BinDetail] = {}
        self.exact_bits = self.exact_counts = torch.empty(0, dtype=torch.int32)

    @staticmethod
    def _range(shift: int) -> tuple[int, int]:
        first = _float_bits(2.0**-30) >> shift
        return first, (_float_bits(2.0**10) >> shift) - first + 1

    def add(self, mag: torch.Tensor) -> None:
        assert self._dense is not None, "a compacted histogram takes no more entries"
        counts, lows, highs = self._dense
        values = mag.reshape(-1).float().cpu()
        index = ((values.view(torch.int32) >> self.shift) - self.first).clamp_(0, self.bins - 1).long()
        counts += torch.bincount(index, minlength=self.bins)
        lows.scatter_reduce_(0, index, values, "amin")
        highs.scatter_reduce_(0, index, values, "amax")
        self.n += values.numel()

    def compact(self) -> None:
        """Keep the occupied bins only (coarser bins if there are too many)."""
        if self._dense is None:
            return
        counts, lows, highs = self._dense
        self._dense = None
        ids = torch.nonzero(counts).squeeze(1)
        counts, lows, highs = counts[ids], lows[ids], highs[ids]
        while ids.numel() > self.MAX_OCCUPIED:
            first, _ = self._range(self.shift + 3)
            coarse = ((ids + self.first) >> 3) - first
            ids, inverse = torch.unique_consecutive(coarse, return_inverse=True)
            counts = torch.zeros(ids.numel(), dtype=torch.int64).index_add_(0, inverse, counts)
            lows = torch.full((ids.numel(),), math.inf).scatter_reduce_(0, inverse, lows, "amin")
            highs = torch.full((ids.numel(),), -math.inf).scatter_reduce_(0, inverse, highs, "amax")
            self.shift += 3
            self.first, self.bins = self._range(self.shift)
        self.ids, self.counts = ids.to(torch.int32), counts.to(torch.int32)
        self.lows, self.highs = lows, highs
        self.from_top = torch.flip(counts, [0]).cumsum(0).to(torch.int32)

    def at(self, k: int) -> tuple[int, int, int]:
        """``(position, bin, above)``: where the k-th largest magnitude lies."""
        self.compact()
        top = int(torch.searchsorted(self.from_top, torch.tensor(k, dtype=torch.int32)))
        p = self.ids.numel() - 1 - top
        return p, int(self.ids[p]), (int(self.from_top[top - 1]) if top > 0 else 0)

    def bounds(self, j: int) -> tuple[float, float]:
        """Bin ``j``'s ``[lo, hi)``."""
        lo = 0.0 if j == 0 else _bits_float((j + self.first) << self.shift)
        hi = math.inf if j == self.bins - 1 else _bits_float((j + 1 + self.first) << self.shift)
        return lo, hi

    def resolvable(self, j: int) -> bool:
        """Whether bin ``j`` can be resolved to exact values by its low bits (not the
        clamped first and last bins)."""
        return 0 < j < self.bins - 1

    def resolve(self, k: int) -> float | None:
        """The k-th largest magnitude exactly, if its bin holds one value or its values
        are known (``exact_bits``, ``details``), else None."""
        p, j, above = self.at(k)
        if bool(self.lows[p] == self.highs[p]):
            return float(self.lows[p])
        detail = self._refined_bin(j)
        if detail is None:
            detail = self.details.get(j)
            if detail is None:
                return None
            self.details[j] = self.details.pop(j)  # most recently used last
        from_top = torch.flip(detail.counts, [0]).cumsum(0)
        top = int(torch.searchsorted(from_top, torch.tensor(k - above, dtype=from_top.dtype)))
        sub = int(detail.subs[detail.subs.numel() - 1 - top])
        return _bits_float(((j + self.first) << self.shift) | sub)

    def keep_detail(self, j: int, detail: BinDetail) -> None:
        self.details[j] = detail
        while len(self.details) > self.MAX_DETAILS:
            self.details.pop(next(iter(self.details)))

    def multi_valued(self) -> torch.Tensor:
        """The bins (indices) that hold several values and can be refined."""
        self.compact()
        several = self.lows != self.highs
        inner = (self.ids > 0) & (self.ids < self.bins - 1)
        return self.ids[several & inner].long()

    def refine_table(self) -> torch.Tensor | None:
        """For a refining pass: per bin index, True for the bins to refine (None: none)."""
        bins = self.multi_valued()
        if not bins.numel():
            return None
        table = torch.zeros(self.bins, dtype=torch.bool)
        table[bins] = True
        return table

    def refine(self, bits: torch.Tensor, counts: torch.Tensor) -> None:
        """Keep the exact values (float32 bit patterns, ascending, with their counts)
        of the bins of several values: two flat tensors, not an object per bin (a
        worker keeps one histogram per task vector, thousands of bins each)."""
        self.exact_bits, self.exact_counts = bits.to(torch.int32), counts.to(torch.int32)

    @property
    def refined(self) -> bool:
        return self.exact_bits.numel() > 0

    def _refined_bin(self, j: int) -> BinDetail | None:
        """Bin ``j``'s exact values from the refined ones, if it was refined."""
        if not self.refined:
            return None
        edges = torch.tensor([(j + self.first) << self.shift, (j + 1 + self.first) << self.shift],
                             dtype=torch.int64)
        i0, i1 = torch.searchsorted(self.exact_bits.long(), edges).tolist()
        if i0 == i1:
            return None
        low = self.exact_bits[i0:i1] & ((1 << self.shift) - 1)
        return BinDetail(low, self.exact_counts[i0:i1])

    @property
    def nbytes(self) -> int:
        parts = (self.ids, self.counts, self.lows, self.highs, self.from_top) + (self._dense or ())
        return (sum(t.numel() * t.element_size() for t in parts)
                + sum(d.nbytes for d in self.details.values()) + 8 * self.exact_bits.numel())

    def bracket(self, k: int) -> tuple[float, float, int]:
        """``(lo, hi, above)``: the k-th largest magnitude lies in ``[lo, hi)`` and
        ``above`` entries lie at or above ``hi``."""
        _p, j, above = self.at(k)
        lo, hi = self.bounds(j)
        return lo, hi, above
