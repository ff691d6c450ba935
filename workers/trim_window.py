"""Magnitude windows of a task vector: the entries whose magnitude rank lies in
``[start, start + count)``, ties with an edge kept. :func:`window_mask` is the
whole-tensor reference; :class:`WindowSearch` finds the same window's edge values a
chunk at a time from a :class:`~workers.magnitude_histogram.MagnitudeHistogram`, and
:class:`Window` applies them chunk by chunk."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workers.magnitude_histogram import MagnitudeHistogram
from workers.workspace import _FRESH, Workspace

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
