"""Exact order statistics of values that exist one chunk at a time.

Some methods select by a quantity derived from several inputs — SCE by the variance of
the task vectors at each entry, Arcee Fusion by an importance score — so no magnitude
histogram of one task vector (``workers.magnitude_histogram``) knows its distribution.
:class:`Selection` finds the values at given ranks of such a quantity exactly, without
a full-size copy: a first pass keeps a seeded sample, the sample brackets each rank,
and a second pass counts what lies below each bracket and gathers what lies inside;
a selection among those few values finishes. Up to ``WHOLE`` values are simply gathered
and sorted. The values are the same as a full sort's, so the answer never depends on the
chunk size or the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

WHOLE = 1 << 20  # at most this many values are gathered and sorted at once
SAMPLE = 1 << 16


class Selection:
    """The values at ascending ranks (0 = the smallest) of ``n`` values met chunk by chunk.

    Use: ``sample(chunk)`` over every chunk in order; ``select(ranks)``; if
    ``needs_pass``, ``band(chunk)`` over every chunk again; then ``finish(whole)``,
    where ``whole()`` gives every value, flat (only if a bracket missed).
    """

    def __init__(self, n: int):
        self.n = n
        self.small = n <= WHOLE
        self.offset = 0
        self.parts: list[torch.Tensor] = []
        self.positions: torch.Tensor | None = None
        if not self.small:
            g = torch.Generator(device="cpu").manual_seed(n)
            self.positions = torch.randint(n, (SAMPLE,), generator=g).sort().values
        self.ranks: list[int] = []
        self.found: list[torch.Tensor | None] = []
        self.brackets: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.below: list[torch.Tensor] = []
        self.bands: list[list[torch.Tensor]] = []

    def sample(self, chunk: torch.Tensor) -> None:
        """First pass: one chunk of the values, in order (it may be reused afterwards)."""
        flat = chunk.reshape(-1)
        if self.positions is None:
            self.parts.append(flat.clone())
        else:
            edges = torch.tensor([self.offset, self.offset + flat.numel()])
            lo, hi = torch.searchsorted(self.positions, edges).tolist()
            if hi > lo:
                self.parts.append(flat[(self.positions[lo:hi] - self.offset).to(flat.device)])
        self.offset += flat.numel()

    def select(self, ranks: Sequence[int]) -> None:
        """The ranks wanted; the small case and what the sample settles are found here."""
        assert self.offset == self.n, f"sampled {self.offset} of {self.n} values"
        self.ranks = [min(max(int(r), 0), self.n - 1) for r in ranks]
        values = torch.sort(torch.cat(self.parts)).values
        self.parts = []
        if self.small:
            self.found = [values[r] for r in self.ranks]
            return
        m = values.numel()
        self.found = [None] * len(self.ranks)
        for r in self.ranks:
            q = r / max(1, self.n - 1)
            margin = 5.0 * (q * (1 - q) / m) ** 0.5 + 1.0 / m
            lo = values[max(0, int((q - margin) * (m - 1)))]
            hi = values[min(m - 1, int((q + margin) * (m - 1)) + 1)]
            self.brackets.append((lo, hi))
            self.below.append(torch.zeros((), dtype=torch.int64, device=values.device))
            self.bands.append([])

    @property
    def needs_pass(self) -> bool:
        return any(v is None for v in self.found)

    def band(self, chunk: torch.Tensor) -> None:
        """Second pass: one chunk, in order; keeps the values inside each bracket."""
        flat = chunk.reshape(-1)
        for t, (lo, hi) in enumerate(self.brackets):
            if self.found[t] is None:
                self.below[t] += (flat < lo).sum()
                self.bands[t].append(flat[(flat >= lo) & (flat <= hi)])

    def finish(self, whole: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        """The values at the ranks, as 0-d tensors in the values' dtype."""
        for t, r in enumerate(self.ranks):
            if self.found[t] is not None:
                continue
            band = torch.cat(self.bands[t])
            need = r - int(self.below[t])
            if 0 <= need < band.numel():
                self.found[t] = torch.kthvalue(band, need + 1).values
            else:  # the sample's bracket missed (rare): select from every value
                self.found[t] = torch.kthvalue(whole().reshape(-1), r + 1).values
        self.bands = []
        return [v for v in self.found if v is not None]
