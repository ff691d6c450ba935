"""SLERP: spherical interpolation between the base and one other model."""

from __future__ import annotations

import torch

from workers.methods import implements
from workers.methods.base import MergeInputs, MergeMethod


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Interpolate along the great circle between ``a`` (t=0) and ``b`` (t=1), treating
    each tensor as one vector; nearly parallel inputs are interpolated linearly."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    na, nb = torch.linalg.vector_norm(fa), torch.linalg.vector_norm(fb)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = torch.dot(fa / na, fb / nb).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return (1 - t) * a + t * b
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / sin_theta) * a + (torch.sin(t * theta) / sin_theta) * b


@implements("slerp")
class Slerp(MergeMethod):

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        assert inputs.base is not None
        return slerp(inputs.global_params["t"], inputs.base, inputs.tensors[0])
