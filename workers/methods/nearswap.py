"""NearSwap: take the other model's value where it lies within ``t`` of the base's;
farther away, move from the base toward it by ``t / |other − base|``."""

from __future__ import annotations

import torch

from workers.methods import implements
from workers.methods.base import MergeInputs, MergeMethod


def nearswap(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Entrywise ``w · other + (1 − w) · base`` with ``w = clamp(t / |base − other|, 0, 1)``
    (a distance below 1e-6 counts as 1e-6)."""
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


@implements("nearswap")
class NearSwap(MergeMethod):

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        return nearswap(float(inputs.global_params["t"]), inputs.base, inputs.tensors[0])
