"""Sparsification of task vectors: magnitude (TIES), random (DARE), magnitude with
outliers removed (Model Breadcrumbs) and magnitude-ranked random (DELLA).

``rescale`` restores the dropped mass: ``l1`` matches the kept tensor's L1 norm to the
original's (mergekit's rule); ``inverse_density`` divides each kept entry by its keep
probability (the DARE and DELLA papers' rule, unbiased in expectation).

Every function writes its result into ``out`` and takes its temporaries from a
:class:`Workspace`, so a search that merges thousands of candidates reuses the same
buffers instead of paying fresh allocations (and their page faults) each time. Without
them the functions allocate; the arithmetic is the same either way.
"""

from __future__ import annotations

import torch

RESCALE_MODES = ("l1", "inverse_density")


class Workspace:
    """Reusable scratch tensors, keyed by role, shape and dtype."""

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or like.dtype
        if not self.reuse:
            return torch.empty(like.shape, dtype=dtype, device=like.device)
        key = (role, tuple(like.shape), dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buf

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


_FRESH = Workspace(reuse=False)


def _l1_rescale_(before: torch.Tensor, kept: torch.Tensor, ws: Workspace, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` in place so its L1 norm is ``before`` (the unsparsified norm)."""
    after = torch.abs(kept, out=ws.get("mag", kept)).sum()
    if before < eps or after < eps:
        return kept
    return kept.mul_(before / after)


_SAMPLE = 1 << 16


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a flat tensor, in about four linear passes.

    A fixed-seed sample brackets the answer; only the values inside the bracket are
    selected exactly. Falls back to a full selection when the bracket misses.
    """
    n = mag.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(mag, n - k + 1).values
    g = torch.Generator(device="cpu").manual_seed(n)
    sample = mag[torch.randint(n, (_SAMPLE,), generator=g).to(mag.device)].float()
    keep = k / n
    margin = 5.0 * (keep * (1 - keep) / _SAMPLE) ** 0.5 + 1.0 / _SAMPLE
    qs = torch.tensor([max(0.0, 1 - keep - margin), min(1.0, 1 - keep + margin)], device=sample.device)
    lo, hi = (v.to(mag.dtype) for v in torch.quantile(sample, qs))
    above = int((mag > hi).sum())
    band = mag[(mag >= lo) & (mag <= hi)]
    need = k - above
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(mag, n - k + 1).values


def rank_window_mask(
    delta: torch.Tensor, start: int, count: int, sorted_mag: torch.Tensor | None = None,
    ws: Workspace = _FRESH,
) -> torch.Tensor:
    """Mask (1.0 kept / 0.0 dropped, in ``delta``'s dtype) of the entries whose magnitude
    rank lies in ``[start, start + count)``.

    Ranks count from the largest magnitude (rank 0); equal magnitudes are ranked by
    position, first first (a stable descending sort). ``sorted_mag`` — the flattened
    magnitudes sorted ascending, precomputed once per task vector — turns this into
    look-ups and one or two comparison passes; without it two linear-time selections
    find the window's bounds. Both give the same mask. Masks are floats because mixing
    boolean and float tensors is several times slower than float arithmetic on CPUs.
    """
    n = delta.numel()
    mask = ws.get("mask", delta)
    if count <= 0:
        return mask.zero_()
    mag = torch.abs(delta, out=ws.get("mag", delta))
    if sorted_mag is not None:  # ascending: rank r (from the largest) sits at n - 1 - r
        hi, lo = sorted_mag[n - 1 - start], sorted_mag[n - start - count]
        end = start + count
        clean_low = end == n or bool(sorted_mag[n - 1 - end] < lo)
        clean_high = start == 0 or bool(sorted_mag[n - start] > hi)
    else:
        flat_mag = mag.view(-1)
        lo = kth_largest(flat_mag, start + count)
        hi = kth_largest(flat_mag, start + 1) if start > 0 else lo
        clean_low = clean_high = False
    torch.ge(mag, lo, out=mask)
    if start > 0:
        mask.mul_(torch.le(mag, hi, out=ws.get("mask2", delta)))
    if (clean_low and clean_high) or int(torch.count_nonzero(mask)) == count:
        return mask  # no run of equal magnitudes crosses the window's edges
    flat, flat_mag = mask.view(-1), mag.view(-1)
    scratch = ws.get("mask2", delta).view(-1)
    edges = [lo] if start == 0 else ([hi] if bool(hi == lo) else [hi, lo])
    for value in edges:
        ties = torch.nonzero(torch.eq(flat_mag, value, out=scratch)).squeeze(1)
        if sorted_mag is not None:  # entries above ``value``: a binary search
            first_rank = n - int(torch.searchsorted(sorted_mag, value, right=True))
        else:
            first_rank = int(torch.count_nonzero(torch.gt(flat_mag, value, out=scratch)))
        ranks = torch.arange(first_rank, first_rank + ties.numel(), device=ties.device)
        inside = (ranks >= start) & (ranks < start + count)
        flat[ties] = inside.to(flat.dtype)
    return mask


def top_k_mask(delta: torch.Tensor, k: int, sorted_mag: torch.Tensor | None = None,
               ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask of the ``k`` largest-magnitude entries (ties: first by position)."""
    return rank_window_mask(delta, 0, k, sorted_mag, ws)


def _keep(delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: str | None,
          out: torch.Tensor, ws: Workspace) -> torch.Tensor:
    before = torch.abs(delta, out=ws.get("mag", delta)).sum() if rescale == "l1" else None
    torch.mul(delta, mask, out=out)
    if rescale is None:
        return out
    if rescale == "l1":
        assert before is not None
        return _l1_rescale_(before, out, ws)
    if rescale == "inverse_density":
        return out.div_(density)
    raise ValueError(f"unknown rescale mode {rescale!r}: use one of {RESCALE_MODES}")


def magnitude(delta: torch.Tensor, density: float, rescale: str | None = None,
              sorted_mag: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
              ws: Workspace = _FRESH) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES trim)."""
    out = out if out is not None else torch.empty_like(delta)
    if density >= 1:
        return out.copy_(delta)
    if density <= 0 or delta.numel() == 0:
        return out.zero_()
    k = max(1, int(density * delta.numel()))
    return _keep(delta, top_k_mask(delta, k, sorted_mag, ws), density, rescale, out, ws)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None,
                       sorted_mag: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
                       ws: Workspace = _FRESH) -> torch.Tensor:
    """Drop the ``gamma`` share of largest entries, then the smallest, keeping
    ``int(density * n)`` entries (Model Breadcrumbs)."""
    out = out if out is not None else torch.empty_like(delta)
    if density >= 1:
        return out.copy_(delta)
    n = delta.numel()
    keep_n = int(density * n)
    top_n = int(gamma * n)
    # dropping ``n - keep_n - top_n`` smallest (never fewer than 0) leaves this window
    start = min(top_n, n - keep_n)
    mask = rank_window_mask(delta, start, keep_n, sorted_mag, ws)
    return _keep(delta, mask, density, rescale, out, ws)


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """The precomputation that makes trimming at any density sort-free (ascending)."""
    return torch.sort(delta.abs().reshape(-1)).values


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator,
                rescale: str | None = "l1", *, out: torch.Tensor | None = None,
                ws: Workspace = _FRESH) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE); the draw is on the CPU so a
    seed gives the same mask on every device."""
    out = out if out is not None else torch.empty_like(delta)
    if density >= 1:
        return out.copy_(delta)
    if density <= 0:
        return out.zero_()
    cpu = delta if delta.device.type == "cpu" else delta.cpu()
    draw = torch.rand(delta.shape, generator=generator, out=ws.get("rand", cpu, torch.float32))
    keep = torch.lt(draw, density, out=ws.get("keep", cpu)).to(delta.device)
    return _keep(delta, keep, density, rescale, out, ws)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest; ties by position)."""
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(rows.dtype)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                   rescale: str | None = "l1", *, out: torch.Tensor | None = None,
                   ws: Workspace = _FRESH) -> torch.Tensor:
    """Keep each entry with a probability from ``density - epsilon`` (smallest in its
    row) to ``density + epsilon`` (largest), linear in its magnitude rank (DELLA)."""
    out = out if out is not None else torch.empty_like(delta)
    if density >= 1:
        return out.copy_(delta)
    if density <= 0:
        return out.zero_()
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1; got density "
            f"{density}, epsilon {epsilon}: lower epsilon or move density away from 0 and 1"
        )
    before = delta.abs().sum() if rescale == "l1" else None  # before ``out`` (maybe ``delta``) changes
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
    ncols = rows.shape[1]
    ranks = row_ranks(rows)
    rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    keep = torch.rand(rows.shape, generator=generator).to(delta.device) < probs
    kept_rows = rows * keep
    if rescale == "inverse_density":
        return out.copy_((kept_rows / probs).reshape(delta.shape))
    out.copy_(kept_rows.reshape(delta.shape))
    if before is not None:
        return _l1_rescale_(before, out, ws)
    return out
