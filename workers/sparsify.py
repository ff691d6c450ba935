"""Sparsification of task vectors: magnitude (TIES), random (DARE), magnitude with
outliers removed (Model Breadcrumbs) and magnitude-ranked random (DELLA).

``rescale`` restores the dropped mass: ``l1`` matches the kept tensor's L1 norm to the
original's (mergekit's rule); ``inverse_density`` divides each kept entry by its keep
probability (the DARE and DELLA papers' rule, unbiased in expectation).
"""

from __future__ import annotations

import torch

RESCALE_MODES = ("l1", "inverse_density")


def _l1_rescale(original: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    before = original.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def top_k_mask(delta: torch.Tensor, k: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``k`` largest-magnitude entries.

    With ``order`` (flattened indices by descending magnitude, precomputed once) this
    costs no sort. Without it, a selection (kthvalue) finds the threshold in linear
    time; exact ties at the threshold fall back to a full ordering.
    """
    n = delta.numel()
    flat_mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    if order is not None:
        flat_mask[order[:k]] = True
        return flat_mask.view(delta.shape)
    mag = delta.abs().reshape(-1)
    threshold = torch.kthvalue(mag, n - k + 1).values
    flat_mask = mag >= threshold
    if int(flat_mask.sum()) != k:
        flat_mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        flat_mask[torch.argsort(mag, descending=True)[:k]] = True
    return flat_mask.view(delta.shape)


def magnitude(
    delta: torch.Tensor,
    density: float,
    rescale: str | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES trim)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    kept = delta * top_k_mask(delta, k, order)
    return _rescale(delta, kept, density, rescale)


def magnitude_outliers(
    delta: torch.Tensor,
    density: float,
    gamma: float,
    rescale: str | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Drop the ``gamma`` share of largest entries, then the smallest, keeping
    ``int(density * n)`` entries (Model Breadcrumbs)."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_n = int(density * n)
    top_n = int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    if order is None:
        order = torch.argsort(delta.abs().reshape(-1), descending=True)
    # ascending position p corresponds to descending position n - 1 - p
    ascending = order.flip(0)
    flat = torch.zeros(n, dtype=torch.bool, device=delta.device)
    flat[ascending[bottom_n : bottom_n + keep_n]] = True
    kept = delta * flat.view(delta.shape)
    return _rescale(delta, kept, density, rescale)


def random_drop(
    delta: torch.Tensor,
    density: float,
    generator: torch.Generator,
    rescale: str | None = "l1",
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    kept = delta * keep.to(delta.device)
    return _rescale(delta, kept, density, rescale)


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
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1), dim=1).to(delta.dtype)
    rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
    probs = (density - epsilon) + rank_norm * (2 * epsilon)
    keep = torch.rand(rows.shape, generator=generator).to(delta.device) < probs
    kept_rows = rows * keep
    if rescale == "inverse_density":
        kept_rows = kept_rows / probs
        return kept_rows.reshape(delta.shape)
    kept = kept_rows.reshape(delta.shape)
    return _l1_rescale(delta, kept) if rescale == "l1" else kept


def _rescale(
    delta: torch.Tensor, kept: torch.Tensor, density: float, rescale: str | None
) -> torch.Tensor:
    if rescale is None:
        return kept
    if rescale == "l1":
        return _l1_rescale(delta, kept)
    if rescale == "inverse_density":
        return kept / density
    raise ValueError(f"unknown rescale mode {rescale!r}: use one of {RESCALE_MODES}")
