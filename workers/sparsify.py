"""Sparsification of task vectors: magnitude (TIES), random (DARE), magnitude with
outliers removed (Model Breadcrumbs) and magnitude-ranked random (DELLA).

``rescale`` restores the dropped mass: ``l1`` matches the kept tensor's L1 norm to the
original's (mergekit's rule); ``inverse_density`` divides each kept entry by its keep
probability (the DARE and DELLA papers' rule, unbiased in expectation).

A tensor is sparsified a chunk at a time (``workers.tensor_merge``): a
:class:`Sparsifier` per input carries what needs the whole tensor — the magnitude
window of a trim (:class:`WindowSearch` finds it exactly, with no sorted copy), the L1
rescale factor, the random generator — and applies it chunk after chunk. Temporaries
come from a :class:`Workspace`, so a search that merges thousands of candidates reuses
the same buffers instead of paying fresh allocations (and their page faults).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

RESCALE_MODES = ("l1", "inverse_density")


class Workspace:
    """Reusable scratch tensors, one per role, dtype and device.

    A role's buffer grows to the largest request and is viewed at the shape asked for,
    so a merge of many tensor shapes holds one buffer per role, not one per shape.
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor | tuple[int, ...], dtype: torch.dtype | None = None,
            device: torch.device | None = None) -> torch.Tensor:
        if isinstance(like, torch.Tensor):
            shape, dtype, device = tuple(like.shape), dtype or like.dtype, device or like.device
        else:
            shape = tuple(like)
        assert dtype is not None and device is not None
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        n = 1
        for d in shape:
            n *= d
        key = (role, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return buf[:n].view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


_FRESH = Workspace(reuse=False)


SAMPLE_SIZE = 1 << 16


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a flat tensor, in about four linear passes.

    A fixed-seed sample brackets the answer; only the values inside the bracket are
    selected exactly. Falls back to a full selection when the bracket misses.
    """
    n = mag.numel()
    if n <= 4 * SAMPLE_SIZE:
        return torch.kthvalue(mag, n - k + 1).values
    g = torch.Generator(device="cpu").manual_seed(n)
    sample = mag[torch.randint(n, (SAMPLE_SIZE,), generator=g).to(mag.device)].float()
    keep = k / n
    margin = 5.0 * (keep * (1 - keep) / SAMPLE_SIZE) ** 0.5 + 1.0 / SAMPLE_SIZE
    qs = torch.tensor([max(0.0, 1 - keep - margin), min(1.0, 1 - keep + margin)], device=sample.device)
    lo, hi = (v.to(mag.dtype) for v in torch.quantile(sample, qs))
    above = int((mag > hi).sum())
    band = mag[(mag >= lo) & (mag <= hi)]
    need = k - above
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(mag, n - k + 1).values


def window_mask(delta: torch.Tensor, start: int, count: int, ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask (1.0 kept / 0.0 dropped, in ``delta``'s dtype) of the magnitude window of
    ranks ``[start, start + count)``, from the whole tensor at once: every entry whose
    magnitude lies between the ``(start + count)``-th largest and (``start > 0``) the
    ``(start + 1)``-th largest, both included.

    Entries tied with an edge are all kept, so a window keeps at least ``count``
    entries: TIES' own rule (its reference code keeps ``|delta| >= the k-th value``),
    and the one rule that a merge done a chunk at a time can apply with no count of
    the ties before each chunk. Without ties (float32 task vectors) it keeps exactly
    ``count``. The reference for :class:`Window`. Masks are floats because mixing
    boolean and float tensors is several times slower than float arithmetic on CPUs.
    """
    mask = ws.get("mask", delta)
    if count <= 0:
        return mask.zero_()
    mag = torch.abs(delta, out=ws.get("mag", delta))
    flat_mag = mag.view(-1)
    torch.ge(mag, kth_largest(flat_mag, start + count), out=mask)
    if start > 0:
        mask.mul_(torch.le(mag, kth_largest(flat_mag, start + 1), out=ws.get("mask2", delta)))
    return mask


def top_k_mask(delta: torch.Tensor, k: int, ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask of the ``k`` largest-magnitude entries (and any tied with the k-th)."""
    return window_mask(delta, 0, k, ws)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest; ties by position)."""
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(rows.dtype)


# ---- trimming a tensor merged in chunks ------------------------------------------------
@dataclass
class Window:
    """The magnitude window of ranks ``[start, start + count)`` as two bounds, found from
    the whole tensor by :class:`WindowSearch` and applied chunk by chunk: ``lo``, the
    ``(start + count)``-th largest magnitude, and ``hi``, the ``(start + 1)``-th
    (``start > 0``), both included (the rule of :func:`window_mask`, which it equals)."""

    start: int
    count: int
    n: int
    lo: torch.Tensor | None = None  # None: every entry is kept
    hi: torch.Tensor | None = None

    def bounds(self) -> tuple[float, float]:
        """The kept magnitudes' ``[lo, hi]`` (``lo`` = inf: nothing finite is kept)."""
        if self.count <= 0:
            return math.inf, math.inf
        lo = -math.inf if self.lo is None else float(self.lo)
        return lo, math.inf if self.hi is None else float(self.hi)

    def mask(self, mag: torch.Tensor, ws: Workspace = _FRESH) -> torch.Tensor:
        """Mask (1.0 kept / 0.0 dropped) of a chunk's magnitudes."""
        out = ws.get("mask", mag)
        if self.count <= 0:
            return out.zero_()
        if self.lo is None:
            return out.fill_(1)
        torch.ge(mag, self.lo, out=out)
        if self.hi is not None:
            out.mul_(torch.le(mag, self.hi, out=ws.get("mask2", mag)))
        return out


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


class WindowSearch:
    """Finds a :class:`Window`'s edge values exactly, without sorting or storing the
    magnitudes.

    An exact :class:`MagnitudeHistogram` of the tensor's magnitudes (built once per
    task vector and kept) names the narrow bin each edge lies in and how many entries
    lie above it; where the bin's values are not known, one pass over the chunks
    gathers the entries of that bin (``observe``, given each chunk's ``extract(lo,
    hi)``: its magnitudes in ``[lo, hi)``, or all of them for ``(None, None)``), and an
    exact selection among them finishes. Small tensors skip the histogram: every
    magnitude is gathered.
    """

    def __init__(self, n: int, start: int, count: int,
                 histogram: Callable[[], MagnitudeHistogram] | None = None):
        self.n, self.start, self.count = n, start, count
        self.targets = [] if count <= 0 or (count >= n and start == 0) else (
            [start + count] + ([start + 1] if start > 0 else []))
        self.small = n <= 4 * SAMPLE_SIZE or histogram is None
        self.histogram = None if self.small else histogram()  # type: ignore[misc]
        self.brackets: list[tuple[float, float] | None] = []
        self.above = [0] * len(self.targets)
        self.known: list[float | None] = []
        self.bands: list[list[torch.Tensor]] = [[] for _ in self.targets]
        self.lookup()

    def lookup(self) -> None:
        """Read what the histogram knows (again, after bins were resolved)."""
        self.brackets, self.known = [], []
        for t, k in enumerate(self.targets):
            if self.histogram is None:
                self.brackets.append(None)
                self.known.append(None)
                continue
            lo, hi, self.above[t] = self.histogram.bracket(k)
            self.brackets.append((lo, hi))
            self.known.append(self.histogram.resolve(k))

    def unresolved_bins(self) -> list[int]:
        """Bins to resolve to exact values (``BinDetail``) before this search is known."""
        if self.histogram is None:
            return []
        # a bin of a few entries is cheaper to gather (``observe``) than to count by value
        crowded = self.n // 1024
        wanted: list[int] = []
        for t, k in enumerate(self.targets):
            if self.known[t] is None:
                p, j, _above = self.histogram.at(k)
                if self.histogram.resolvable(j) and int(self.histogram.counts[p]) > crowded:
                    wanted.append(j)
        return list(dict.fromkeys(wanted))

    @property
    def needed(self) -> bool:
        return bool(self.targets)

    @property
    def needs_pass(self) -> bool:
        """Whether some edge must be found among its bin's entries (``observe``)."""
        return any(k is None for k in self.known)

    def observe(self, extract: Callable[[float | None, float | None], torch.Tensor]) -> None:
        """One chunk, in order; ``extract(lo, hi)`` gives its magnitudes in ``[lo, hi)``
        (flat), or all of them for ``(None, None)``."""
        for t, bracket in enumerate(self.brackets):
            if self.known[t] is None:
                self.bands[t].append(extract(None, None) if bracket is None else extract(*bracket))

    def finish(self, whole: Callable[[], torch.Tensor]) -> Window:
        """The window; ``whole()`` gives every magnitude, flat, if a bracket missed."""
        window = Window(self.start, self.count, self.n)
        if not self.targets:
            window.count = min(self.count, self.n) if self.count > 0 else 0
            return window
        found: list[torch.Tensor] = []
        for t, k in enumerate(self.targets):
            known = self.known[t]
            if known is not None:  # read off the histogram
                found.append(torch.tensor(known))
                continue
            band = torch.cat(self.bands[t]) if self.bands[t] else torch.empty(0)
            need = k - self.above[t]
            if 1 <= need <= band.numel():
                found.append(torch.kthvalue(band, band.numel() - need + 1).values)
            else:  # no histogram, or its bracket missed: select from every magnitude
                found.append(kth_largest(whole(), k))
        self.bands = []
        window.lo = found[0]
        if self.start > 0:
            window.hi = found[1]
        return window


@dataclass
class Sparsifier:
    """How one input's task vector is sparsified in one tensor, chunk by chunk.

    Built by a task-vector method's ``prepare``, which also finds what needs the whole
    tensor: the magnitude window of a trim, the L1 rescale factor. Per chunk it gives
    the merge kernel either bounds on the magnitude (``bounds``) or an explicit mask
    (``keep``: random draws, DELLA's ranks). Random draws come
    from a generator seeded per tensor and input, drawn chunk after chunk in order, so
    they equal one draw of the whole tensor.
    """

    kind: str | None  # None (keep all) | zero | magnitude | outliers | random | della
    density: float = 1.0
    rescale: str | None = None
    epsilon: float = 0.0
    search: WindowSearch | None = None
    window: Window | None = None
    scale: float | None = None
    make_generator: Callable[[], torch.Generator] | None = None
    generator: torch.Generator | None = None

    @classmethod
    def for_input(cls, kind: str | None, params: dict, rescale: str | None, inputs, i: int) -> Sparsifier:
        """``inputs``: a ``workers.tensor_merge.TensorInputs``; ``i``: the input's index."""
        density = float(params.get("density", 1.0))
        if kind is None or density >= 1:
            return cls(None)
        n = inputs.numel
        if density <= 0 or n == 0:
            return cls("zero")
        sp = cls(kind, density, rescale)

        def histogram() -> MagnitudeHistogram:
            return inputs.magnitude_histogram(i)

        if kind == "magnitude":
            sp.search = WindowSearch(n, 0, max(1, int(density * n)), histogram)
        elif kind == "outliers":
            keep_n, top_n = int(density * n), int(params["gamma"] * n)
            sp.search = WindowSearch(n, min(top_n, n - keep_n), keep_n, histogram)
        elif kind in ("random", "della"):
            if kind == "della":
                sp.epsilon = float(params["epsilon"])
                if density + sp.epsilon >= 1 or density - sp.epsilon <= 0:
                    from workers.methods.base import MergeError

                    model = inputs.model_names[i] if inputs.model_names else f"#{i}"
                    raise MergeError(
                        f"model {model}, tensor {inputs.name}: della needs 0 < density - epsilon "
                        f"and density + epsilon < 1; got density {density}, epsilon {sp.epsilon}: "
                        "lower epsilon or move density away from 0 and 1")
            from workers.methods.base import tensor_generator

            sp.make_generator = lambda: tensor_generator(inputs.seed, inputs.name, i)
        else:
            raise AssertionError(kind)
        if sp.search is not None and not sp.search.needed:
            sp.window, sp.search = sp.search.finish(lambda: torch.empty(0)), None
        return sp

    def start_pass(self) -> None:
        """Before a pass over the chunks: restart the draws."""
        if self.make_generator is not None:
            self.generator = self.make_generator()

    def set_l1(self, before: float, after: float, eps: float = 1e-7) -> None:
        """The L1 rescale: the kept entries' norm is scaled back to the whole's."""
        self.scale = None if before < eps or after < eps else before / after

    def bounds(self) -> tuple[float, float] | None:
        """The kept magnitudes' ``[lo, hi]``, the same in every chunk, or None where the
        mask is drawn entry by entry (``keep``)."""
        if self.kind is None:
            return -math.inf, math.inf
        if self.kind == "zero":
            return math.inf, math.inf
        if self.window is not None:
            return self.window.bounds()
        return None

    def keep(self, delta: torch.Tensor, ws: Workspace = _FRESH, role: str = "keep") -> torch.Tensor:
        """The next chunk's multiplier (0 dropped, 1 kept; DELLA with inverse-density
        rescale: 1 / the keep probability), for its float32 task vector ``delta``."""
        if self.kind is None:
            return torch.ones_like(delta)
        if self.kind == "zero":
            return torch.zeros_like(delta)
        if self.window is not None:
            mask = self.window.mask(torch.abs(delta, out=ws.get("mag", delta)), ws)
            return ws.get(role, mask).copy_(mask)
        assert self.generator is not None
        if self.kind == "random":
            cpu = delta if delta.device.type == "cpu" else delta.cpu()
            draw = torch.rand(delta.shape, generator=self.generator, out=ws.get("rand", cpu, torch.float32))
            keep = torch.lt(draw, self.density, out=ws.get(role, cpu))
            return keep if keep.device == delta.device else keep.to(delta.device)
        rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
        rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
        ncols = rows.shape[1]
        ranks = row_ranks(rows)
        rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
        probs = (self.density - self.epsilon) + rank_norm * (2 * self.epsilon)
        keep = (torch.rand(rows.shape, generator=self.generator).to(delta.device) < probs).to(delta.dtype)
        if self.rescale == "inverse_density":
            keep = keep / probs
        return keep.reshape(delta.shape)

    def factors(self) -> tuple[float, float]:
        """``(l1, inv)``: the kept entries are multiplied by ``l1`` and divided by ``inv``."""
        if self.kind in (None, "zero") or self.rescale is None:
            return 1.0, 1.0
        if self.rescale == "l1":
            return (self.scale if self.scale is not None else 1.0), 1.0
        if self.rescale == "inverse_density":
            return 1.0, (1.0 if self.kind == "della" else self.density)
        raise ValueError(f"unknown rescale mode {self.rescale!r}: use one of {RESCALE_MODES}")
