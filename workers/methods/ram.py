"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (arXiv 2601.13572).

Per entry, the task vectors ``δᵢ = modelᵢ − base`` whose magnitude exceeds ``epsilon``
contribute: where one model alone does, its entry is added whole; where several do,
their mean. RAM+ (``ramplus_tl``) also scales each model's unique entries by
``λᵢ = 1 + r · clamp(sharedᵢ / uniqueᵢ, 0, alpha)``, where sharedᵢ and uniqueᵢ count
model i's contributing entries in the whole tensor that others also move, or that only
it moves: those counts are found first (``prepare``), then the tensor is merged a chunk
of rows at a time.

Both are written as ``base + Σᵢ δᵢ·[kept]·fᵢ / max(count, 1)`` with ``fᵢ = λᵢ`` on the
unique entries and 1 elsewhere, which rounds as mergekit's two-term sum does (its other
term is an exact zero on every entry).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from workers.methods import implements
from workers.methods.base import MergeError, MergeInputs, MergeMethod
from workers.sparsify import Workspace
from workers.tensor_merge import TensorInputs


def keep_above(deltas: list[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Zero each task vector's entries of magnitude ``<= epsilon``, in place; return how
    many task vectors are kept at each entry (in their dtype)."""
    count = torch.zeros_like(deltas[0])
    for delta in deltas:
        kept = delta.abs() > epsilon
        delta.mul_(kept)
        count.add_(kept)
    return count


def overlap_counts(deltas: list[torch.Tensor], count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model, its kept entries that other models also keep (shared) and that only it
    keeps (unique), as int64 tensors on the deltas' device. ``deltas`` are already
    trimmed by :func:`keep_above` (with ``epsilon >= 0``, kept ⇔ nonzero)."""
    shared_at, unique_at = count > 1, count == 1
    shared = torch.stack([(d.ne(0) & shared_at).sum() for d in deltas])
    unique = torch.stack([(d.ne(0) & unique_at).sum() for d in deltas])
    return shared, unique


def unique_factors(shared: torch.Tensor, unique: torch.Tensor, r: float, alpha: float,
                   epsilon: float) -> torch.Tensor:
    """RAM+'s λᵢ, float32, computed as mergekit does (so they round the same). A model that
    keeps no entry at all with ``epsilon == 0`` gets ratio 0 where mergekit gets 0/0 = NaN
    (which it then spreads over the whole tensor)."""
    rho = shared / unique.clamp(min=epsilon)
    rho = torch.where(rho.isnan(), 0.0, rho)
    return 1 + r * rho.clamp(min=0, max=alpha)


class _ReinforcedAgentMerge(MergeMethod):
    # RAM+: a model's unique entries are scaled by its λ, from counts over the whole tensor
    scales_unique: ClassVar[bool] = False

    def prepare(self, inputs: TensorInputs, ws: Workspace) -> torch.Tensor | None:
        """RAM+'s λ per model, from the whole tensor's counts (read chunk by chunk)."""
        if not self.scales_unique or inputs.base is None or not inputs.tensors:
            return None
        n = len(inputs.tensors)
        shared = torch.zeros(n, dtype=torch.int64, device=inputs.device)
        unique = torch.zeros(n, dtype=torch.int64, device=inputs.device)
        epsilon = inputs.global_params["epsilon"]
        for r0, r1 in inputs.chunk_rows():
            base = inputs.base_chunk(r0, r1, ws)
            assert base is not None
            deltas = [inputs.task_vector_chunk(i, r0, r1, base, ws) for i in range(n)]
            s, u = overlap_counts(deltas, keep_above(deltas, epsilon))
            shared += s
            unique += u
        g = inputs.global_params
        return unique_factors(shared, unique, g["r"], g["alpha"], epsilon)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """One chunk (with ``state`` from ``prepare``), or a whole tensor (``state`` None:
        RAM+ counts this tensor)."""
        base = inputs.base
        if base is None:
            raise MergeError(f"tensor {inputs.name}: {self.name} needs a base_model")
        if not inputs.tensors and not inputs.deltas:
            return base
        deltas = inputs.task_vectors()
        if inputs.deltas is not None and not inputs.owned:
            deltas = [d.clone() for d in deltas]
        g = inputs.global_params
        count = keep_above(deltas, g["epsilon"])
        factors = inputs.state
        if self.scales_unique and factors is None:
            factors = unique_factors(*overlap_counts(deltas, count), g["r"], g["alpha"], g["epsilon"])
        if factors is not None:
            unique_at = count == 1
            on_device = factors.to(base.device)
            for i, value in enumerate(factors.tolist()):
                if value != 1.0:
                    deltas[i].mul_(torch.where(unique_at, on_device[i], 1.0))
        divisor = count.clamp_(min=1)
        out = inputs.out
        if out is None or out.shape != base.shape:
            out = torch.empty_like(base)
        torch.div(deltas[0], divisor, out=out)
        for delta in deltas[1:]:
            out.add_(delta.div_(divisor))
        return out.add_(base)


@implements("ram")
class Ram(_ReinforcedAgentMerge):
    """RAM: unique entries whole, shared entries averaged over the models that keep them."""


@implements("ramplus_tl")
class RamPlusTL(_ReinforcedAgentMerge):
    """RAM+ with tensor-local counts: unique entries scaled by each model's λ."""

    scales_unique = True
