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
from dataclasses import dataclass, field
from typing import ClassVar

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


def rank_window_mask(delta: torch.Tensor, start: int, count: int, ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask (1.0 kept / 0.0 dropped, in ``delta``'s dtype) of the entries whose magnitude
    rank lies in ``[start, start + count)``, from the whole tensor at once.

    Ranks count from the largest magnitude (rank 0); equal magnitudes are ranked by
    position, first first (a stable descending sort). Two linear-time selections find
    the window's bounds. The reference for :class:`Window`, which the engine applies
    chunk by chunk. Masks are floats because mixing boolean and float tensors is
    several times slower than float arithmetic on CPUs.
    """
    mask = ws.get("mask", delta)
    if count <= 0:
        return mask.zero_()
    mag = torch.abs(delta, out=ws.get("mag", delta))
    flat_mag = mag.view(-1)
    lo = kth_largest(flat_mag, start + count)
    hi = kth_largest(flat_mag, start + 1) if start > 0 else lo
    torch.ge(mag, lo, out=mask)
    if start > 0:
        mask.mul_(torch.le(mag, hi, out=ws.get("mask2", delta)))
    if int(torch.count_nonzero(mask)) == count:
        return mask  # no run of equal magnitudes crosses the window's edges
    flat = mask.view(-1)
    scratch = ws.get("mask2", delta).view(-1)
    edges = [lo] if start == 0 else ([hi] if bool(hi == lo) else [hi, lo])
    for value in edges:
        ties = torch.nonzero(torch.eq(flat_mag, value, out=scratch)).squeeze(1)
        first_rank = int(torch.count_nonzero(torch.gt(flat_mag, value, out=scratch)))
        ranks = torch.arange(first_rank, first_rank + ties.numel(), device=ties.device)
        inside = (ranks >= start) & (ranks < start + count)
        flat[ties] = inside.to(flat.dtype)
    return mask


def top_k_mask(delta: torch.Tensor, k: int, ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask of the ``k`` largest-magnitude entries (ties: first by position)."""
    return rank_window_mask(delta, 0, k, ws)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest; ties by position)."""
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(rows.dtype)


# ---- trimming a tensor merged in chunks ------------------------------------------------
@dataclass
class _Edge:
    """Entries tied at one edge value of a window, and which of them the window keeps.

    The tied entries, in position order, have ordinals 0, 1, …; the window keeps those
    in ``[first, last)``. Chunk by chunk, in order, the ties seen so far decide whether a
    chunk keeps all of its ties, drops them all, or (at most a couple of chunks) picks
    some by ordinal. ``per_chunk`` holds each chunk's number of ties where the search
    already counted them; otherwise the merge counts them as it goes.
    """

    value: torch.Tensor
    first: int
    last: int
    per_chunk: list[int] | None = None
    at_lo: bool = True  # the window's lower edge (``lo``)
    at_hi: bool = False  # its upper edge (``hi``); both when they are equal
    seen: int = 0

    def rule(self, ties: int) -> tuple[str, int]:
        """The next chunk's rule for its ``ties`` tied entries, and their first ordinal."""
        start = self.seen
        self.seen += ties
        if ties == 0 or (start >= self.first and start + ties <= self.last):
            return "keep", start
        if start + ties <= self.first or start >= self.last:
            return "drop", start
        return "pick", start


@dataclass
class Window:
    """The entries whose magnitude rank lies in ``[start, start + count)``: rank 0 is the
    largest magnitude, and equal magnitudes are ranked by position, first first (the
    order :func:`rank_window_mask` uses).

    Found from the whole tensor by :class:`WindowSearch`, then applied chunk by chunk,
    with the same chunks: where entries tied at an edge value
    straddle the window's boundary, the search counted each chunk's ties, so each chunk
    knows whether it keeps its ties, drops them, or picks some by position. The
    chunked mask equals the whole tensor's mask exactly.
    """

    start: int
    count: int
    n: int
    lo: torch.Tensor | None = None  # the (start + count)-th largest magnitude
    hi: torch.Tensor | None = None  # the (start + 1)-th largest (start > 0)
    edges: list[_Edge] = field(default_factory=list)

    _rules: tuple[int, list[tuple[str, int]]] | None = None

    def reset(self) -> None:
        """Before a pass over the chunks (in order, from the first)."""
        for e in self.edges:
            e.seen = 0
        self._rules = None

    def _rules_for(self, j: int, ties: Callable[[torch.Tensor], int]) -> list[tuple[str, int]]:
        if self._rules is None or self._rules[0] != j:
            rules = [e.rule(e.per_chunk[j] if e.per_chunk is not None else ties(e.value)) for e in self.edges]
            self._rules = (j, rules)
        return self._rules[1]

    def bounds(self, j: int, ties: Callable[[torch.Tensor], int]) -> tuple[float, float, bool, bool] | None:
        """Chunk ``j``'s mask as bounds on the magnitude — ``(lo, hi, lo strict, hi
        strict)`` — or None where ties at an edge must be picked entry by entry.
        ``ties(value)``: how many of the chunk's magnitudes equal ``value``."""
        if self.count <= 0:
            return math.inf, math.inf, True, False
        if self.lo is None:
            return -math.inf, math.inf, False, False
        rules = self._rules_for(j, ties)
        if any(rule == "pick" for rule, _ in rules):
            return None
        dropped = [e for e, (rule, _) in zip(self.edges, rules) if rule == "drop"]
        hi = float(self.hi) if self.hi is not None else math.inf
        return (float(self.lo), hi, any(e.at_lo for e in dropped),
                self.hi is not None and any(e.at_hi for e in dropped))

    def mask(self, mag: torch.Tensor, j: int, ws: Workspace = _FRESH) -> torch.Tensor:
        """Mask (1.0 kept / 0.0 dropped) of chunk ``j``'s magnitudes (chunks in order)."""
        out = ws.get("mask", mag)
        if self.count <= 0:
            return out.zero_()
        if self.lo is None:
            return out.fill_(1)
        rules = self._rules_for(j, lambda v: int(torch.count_nonzero(mag == v)))
        dropped = [e for e, (rule, _) in zip(self.edges, rules) if rule == "drop"]
        lo_strict = any(e.at_lo for e in dropped)
        (torch.gt if lo_strict else torch.ge)(mag, self.lo, out=out)
        if self.hi is not None:
            hi_strict = any(e.at_hi for e in dropped)
            out.mul_((torch.lt if hi_strict else torch.le)(mag, self.hi, out=ws.get("mask2", mag)))
        flat, flat_mag = out.view(-1), mag.view(-1)
        scratch = ws.get("mask2", mag).view(-1)
        for e, (rule, first) in zip(self.edges, rules):
            if rule != "pick":
                continue
            ties = torch.nonzero(torch.eq(flat_mag, e.value, out=scratch)).squeeze(1)
            ordinals = torch.arange(first, first + ties.numel(), device=ties.device)
            flat[ties] = ((ordinals >= e.first) & (ordinals < e.last)).to(flat.dtype)
        return out


def _float_bits(value: float) -> int:
    return int(torch.tensor([value], dtype=torch.float32).view(torch.int32).item())


def _bits_float(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


@dataclass
class BinDetail:
    """The exact values in one histogram bin: each value's low bits (``subs``,
    ascending) and count, and for values held by several entries (at most
    ``MAX_TIED``), how many of them each chunk holds — a trim's tie rules."""

    subs: torch.Tensor
    counts: torch.Tensor
    ties: dict[int, list[int]]

    MAX_TIED: ClassVar[int] = 64

    @classmethod
    def from_chunks(cls, per_chunk: list[tuple[torch.Tensor, torch.Tensor]]) -> BinDetail:
        """From each chunk's (low bits, counts) of the bin's entries, in chunk order."""
        subs = torch.cat([p[0] for p in per_chunk]) if per_chunk else torch.empty(0, dtype=torch.int64)
        counts = torch.cat([p[1] for p in per_chunk]) if per_chunk else torch.empty(0, dtype=torch.int64)
        unique, inverse = torch.unique(subs, return_inverse=True)
        totals = torch.zeros(unique.numel(), dtype=torch.int64).index_add_(0, inverse, counts)
        tied = unique[totals > 1].tolist()[: cls.MAX_TIED]
        ties: dict[int, list[int]] = {}
        for sub in tied:
            ties[sub] = [int(c[s == sub].sum()) for s, c in per_chunk]
        return cls(unique, totals, ties)

    @property
    def nbytes(self) -> int:
        return 16 * self.subs.numel() + 8 * sum(len(v) for v in self.ties.values())


class MagnitudeHistogram:
    """Exact counts of a task vector's float32 magnitudes in narrow bins.

    A non-negative float's bit pattern orders as the float does, so dropping its low
    ``shift`` bits gives bins of relative width 2^(shift - 23): 2^-14 to start with
    (magnitudes below 2^-30 share the first bin, above 2^10 the last). Only occupied
    bins are kept, each with its count, lowest and highest value; a task vector that
    occupies more than ``MAX_OCCUPIED`` bins gets coarser ones (3 bits at a time), so a
    histogram stays under 1.3 MB (a bf16 task vector of 11M entries occupies about 18k
    bins: 0.4 MB). A worker keeps one per task vector (``TensorInputs.magnitude_histogram``),
    built in one pass at first use. For any trim it names the bin that holds the
    threshold and how many entries lie above it, exactly. A bin of one value (common:
    bf16 task vectors are made of few values) gives the threshold with no pass at all;
    a crowded bin of several values is resolved by one counting pass (kept for later
    candidates); a sparse bin's few entries are gathered.
    """

    FINE = 9
    MAX_OCCUPIED = 1 << 16
    MAX_DETAILS = 256  # bins resolved to exact values, kept per task vector

    def __init__(self) -> None:
        self.shift = self.FINE
        self.first, self.bins = self._range(self.shift)
        self._dense: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (
            torch.zeros(self.bins, dtype=torch.int64), torch.full((self.bins,), math.inf),
            torch.full((self.bins,), -math.inf))
        self.ids = self.counts = self.lows = self.highs = self.from_top = torch.empty(0)
        self.n = 0
        self.details: dict[int, BinDetail] = {}

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

    def resolve(self, k: int) -> tuple[float, int, int, list[int] | None] | None:
        """The k-th largest magnitude exactly — ``(value, above, equal, ties per chunk
        or None)`` — if its bin holds one value or was resolved (``details``), else None."""
        p, j, above = self.at(k)
        if bool(self.lows[p] == self.highs[p]):
            return float(self.lows[p]), above, int(self.counts[p]), None
        detail = self.details.get(j)
        if detail is None:
            return None
        self.details[j] = self.details.pop(j)  # most recently used last
        from_top = torch.flip(detail.counts, [0]).cumsum(0)
        top = int(torch.searchsorted(from_top, torch.tensor(k - above)))
        sub = int(detail.subs[detail.subs.numel() - 1 - top])
        value = _bits_float(((j + self.first) << self.shift) | sub)
        above += int(from_top[top - 1]) if top > 0 else 0
        return value, above, int(detail.counts[detail.subs.numel() - 1 - top]), detail.ties.get(sub)

    def keep_detail(self, j: int, detail: BinDetail) -> None:
        self.details[j] = detail
        while len(self.details) > self.MAX_DETAILS:
            self.details.pop(next(iter(self.details)))

    @property
    def nbytes(self) -> int:
        parts = (self.ids, self.counts, self.lows, self.highs, self.from_top) + (self._dense or ())
        return sum(t.numel() * t.element_size() for t in parts) + sum(d.nbytes for d in self.details.values())

    def bracket(self, k: int) -> tuple[float, float, int, float | None, int]:
        """``(lo, hi, above, value, equal)``: the k-th largest magnitude lies in
        ``[lo, hi)`` and ``above`` entries lie at or above ``hi``; where every entry of
        that bin has one value, it is ``value`` (held by ``equal`` entries), else None."""
        p, j, above = self.at(k)
        lo, hi = self.bounds(j)
        single = float(self.lows[p]) if bool(self.lows[p] == self.highs[p]) else None
        return lo, hi, above, single, int(self.counts[p])


class WindowSearch:
    """Finds a :class:`Window`'s edge values exactly, without sorting or storing the
    magnitudes.

    An exact :class:`MagnitudeHistogram` of the tensor's magnitudes (built once per
    task vector and kept) names the narrow bin each edge lies in and how many entries
    lie above it; one pass over the chunks gathers the entries of that bin
    (``observe``, given each chunk's ``extract(lo, hi)``: its magnitudes in
    ``[lo, hi)``, or all of them for ``(None, None)``), and an exact selection among
    them finishes. Small tensors skip the histogram: every magnitude is gathered.
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
        self.known: list[tuple[float, int, int, list[int] | None] | None] = []
        self.bands: list[list[torch.Tensor]] = [[] for _ in self.targets]
        self.sizes: list[int] = []
        self.lookup()

    def lookup(self) -> None:
        """Read what the histogram knows (again, after bins were resolved)."""
        self.brackets, self.known = [], []
        for t, k in enumerate(self.targets):
            if self.histogram is None:
                self.brackets.append(None)
                self.known.append(None)
                continue
            lo, hi, above, _single, _equal = self.histogram.bracket(k)
            self.brackets.append((lo, hi))
            self.above[t] = above
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

    def observe(self, size: int,
                extract: Callable[[float | None, float | None], torch.Tensor]) -> None:
        """One chunk of ``size`` entries, in order; ``extract(lo, hi)`` gives its
        magnitudes in ``[lo, hi)`` (flat), or all of them for ``(None, None)``."""
        self.sizes.append(size)
        for t, bracket in enumerate(self.brackets):
            if self.known[t] is None:
                self.bands[t].append(extract(None, None) if bracket is None else extract(*bracket))

    def finish(self, whole: Callable[[], torch.Tensor]) -> Window:
        """The window; ``whole()`` gives every magnitude, flat, if a bracket missed."""
        window = Window(self.start, self.count, self.n)
        if not self.targets:
            window.count = min(self.count, self.n) if self.count > 0 else 0
            return window
        found: list[tuple[torch.Tensor, int, int, list[int] | None]] = []  # value, above, equal, per chunk
        full: torch.Tensor | None = None
        for t, k in enumerate(self.targets):
            known = self.known[t]
            if known is not None:  # read off the histogram: a bin of one value, or resolved
                value, above, equal, ties = known
                found.append((torch.tensor(value), above, equal, ties))
                continue
            band = torch.cat(self.bands[t]) if self.bands[t] else torch.empty(0)
            need = k - self.above[t]
            if 1 <= need <= band.numel():
                value = torch.kthvalue(band, band.numel() - need + 1).values
                above = self.above[t] + int(torch.count_nonzero(band > value))
                per_chunk = [int(torch.count_nonzero(piece == value)) for piece in self.bands[t]]
            else:  # the sample's bracket missed: select from every magnitude
                full = whole() if full is None else full
                value = torch.kthvalue(full, self.n - k + 1).values
                above = int(torch.count_nonzero(full > value))
                per_chunk = [int(torch.count_nonzero(piece == value))
                             for piece in torch.split(full, self.sizes)]
            found.append((value, above, sum(per_chunk), per_chunk))
        self.bands = []
        window.lo = found[0][0]
        if self.start > 0:
            window.hi = found[1][0]
        same = self.start > 0 and bool(found[1][0] == found[0][0])
        edges = [(found[0], True, same)] + ([(found[1], False, True)] if self.start > 0 and not same else [])
        end = self.start + self.count
        for (value, above, equal, per_chunk), at_lo, at_hi in edges:
            first, last = max(0, self.start - above), min(equal, end - above)
            if first == 0 and last == equal:
                continue  # every tie is inside the window: ``>=`` / ``<=`` keep them
            window.edges.append(_Edge(value, first, last, per_chunk, at_lo, at_hi))
        return window


@dataclass
class Sparsifier:
    """How one input's task vector is sparsified in one tensor, chunk by chunk.

    Built by a task-vector method's ``prepare``, which also finds what needs the whole
    tensor: the magnitude window of a trim, the L1 rescale factor. Per chunk it gives
    the merge kernel either bounds on the magnitude (``bounds``) or an explicit mask
    (``keep``: random draws, DELLA's ranks, ties picked by position). Random draws come
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
        """Before a pass over the chunks: restart the draws and the count of ties."""
        if self.make_generator is not None:
            self.generator = self.make_generator()
        if self.window is not None:
            self.window.reset()

    def set_l1(self, before: float, after: float, eps: float = 1e-7) -> None:
        """The L1 rescale: the kept entries' norm is scaled back to the whole's."""
        self.scale = None if before < eps or after < eps else before / after

    def bounds(self, j: int, ties: Callable[[torch.Tensor], int]) -> tuple[float, float, bool, bool] | None:
        """Chunk ``j``'s mask as magnitude bounds, or None if it needs ``keep``;
        ``ties(value)`` counts the chunk's magnitudes equal to ``value``."""
        if self.kind is None:
            return -math.inf, math.inf, False, False
        if self.kind == "zero":
            return math.inf, math.inf, True, False
        if self.window is not None:
            return self.window.bounds(j, ties)
        return None

    def keep(self, delta: torch.Tensor, j: int, ws: Workspace = _FRESH, role: str = "keep") -> torch.Tensor:
        """Chunk ``j``'s multiplier (0 dropped, 1 kept; DELLA with inverse-density
        rescale: 1 / the keep probability), for its float32 task vector ``delta``."""
        if self.kind is None:
            return torch.ones_like(delta)
        if self.kind == "zero":
            return torch.zeros_like(delta)
        if self.window is not None:
            mask = self.window.mask(torch.abs(delta, out=ws.get("mag", delta)), j, ws)
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
