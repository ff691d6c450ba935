"""Sparsification of task vectors: magnitude (TIES), random (DARE), magnitude with
outliers removed (Model Breadcrumbs) and magnitude-ranked random (DELLA).

``rescale`` restores the dropped mass: ``l1`` matches the kept tensor's L1 norm to the
original's (mergekit's rule); ``inverse_density`` divides each kept entry by its keep
probability (the DARE and DELLA papers' rule, unbiased in expectation).
"""

from __future__ import annotations

import torch

RESCALE_MODES = ("l1", "inverse_density")


def _l1_rescale(before: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale ``kept`` so its L1 norm is ``before`` (the unsparsified norm)."""
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


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
    delta: torch.Tensor, start: int, count: int, sorted_mag: torch.Tensor | None = None
) -> torch.Tensor:
    """Mask of the entries whose magnitude rank lies in ``[start, start + count)``.

    Ranks count from the largest magnitude (rank 0); equal magnitudes are ranked by
    position, first first (a stable descending sort). ``sorted_mag`` — the flattened
    magnitudes sorted descending, precomputed once per task vector — makes this two
    look-ups and one comparison pass; without it two linear-time selections find the
    window's bounds. Both give the same mask.
    """
    mag = delta.abs().reshape(-1)
    if count <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    if sorted_mag is not None:
        hi, lo = sorted_mag[start], sorted_mag[start + count - 1]
    else:
        hi, lo = kth_largest(mag, start + 1), kth_largest(mag, start + count)
    flat = (mag < hi) & (mag > lo)
    for value in (hi,) if bool(hi == lo) else (hi, lo):
        ties = torch.nonzero(mag == value).squeeze(1)
        first_rank = int((mag > value).sum())
        ranks = torch.arange(first_rank, first_rank + ties.numel(), device=ties.device)
        flat[ties[(ranks >= start) & (ranks < start + count)]] = True
    return flat.view(delta.shape)


def top_k_mask(delta: torch.Tensor, k: int, sorted_mag: torch.Tensor | None = None) -> torch.Tensor:
    """Mask of the ``k`` largest-magnitude entries (ties: first by position)."""
    return rank_window_mask(delta, 0, k, sorted_mag)


def _apply(delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: str | None,
           inplace: bool) -> torch.Tensor:
    before = delta.abs().sum() if rescale == "l1" else None
    kept = delta.mul_(mask) if inplace else delta * mask
    return _rescale(before, kept, density, rescale)


def magnitude(
    delta: torch.Tensor,
    density: float,
    rescale: str | None = None,
    sorted_mag: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES trim)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    return _apply(delta, top_k_mask(delta, k, sorted_mag), density, rescale, inplace)


def magnitude_outliers(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    rescale: str | None = None,
    sorted_mag: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Drop the ``gamma`` share of largest entries, then the smallest, keeping
    ``int(density * n)`` entries (Model Breadcrumbs)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n = int(density * n)
    top_n = int(gamma * n)
    # dropping ``n - keep_n - top_n`` smallest (never fewer than 0) leaves this window
    start = min(top_n, n - keep_n)
    return _apply(delta, rank_window_mask(delta, start, keep_n, sorted_mag), density, rescale, inplace)


def sorted_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """The precomputation that makes trimming at any density sort-free."""
    return torch.sort(delta.abs().reshape(-1), descending=True).values


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: str | None = "l1",
    inplace: bool = False,
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    return _apply(delta, keep.to(delta.device), density, rescale, inplace)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest; ties by position)."""
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(rows.dtype)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    rescale: str | None = "l1",
) -> torch.Tensor:
    """Keep each entry with a probability from ``density - epsilon`` (smallest in its
    row) to ``density + epsilon`` (largest), linear in its magnitude rank (DELLA)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon < 1; got density "
            f"{density}, epsilon {epsilon}: lower epsilon or move density away from 0 and 1"
        )
    rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
    rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
    ncols = rows.shape[1]
    ranks = row_ranks(rows)
    rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    keep = torch.rand(rows.shape, generator=generator).to(delta.device) < probs
    kept_rows = rows * keep
    if rescale == "inverse_density":
        kept_rows = kept_rows / probs
        return kept_rows.reshape(delta.shape)
    kept = kept_rows.reshape(delta.shape)
    return _l1_rescale(delta.abs().sum(), kept) if rescale == "l1" else kept


def _rescale(
    before: torch.Tensor | None, kept: torch.Tensor, density: float, rescale: str | None
) -> torch.Tensor:
    if rescale is None:
        return kept
    if rescale == "l1":
        assert before is not None
        return _l1_rescale(before, kept)
    if rescale == "inverse_density":
        return kept / density
    raise ValueError(f"unknown rescale mode {rescale!r}: use one of {RESCALE_MODES}")
