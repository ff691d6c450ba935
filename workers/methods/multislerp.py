"""Multi-SLERP: barycentric interpolation of several models (of their task vectors with a
base) on the hypersphere, as mergekit's ``multislerp``.

The inputs are projected onto the unit sphere; their weighted mean, normalised, is the
point of tangency; their weighted tangents there are summed and mapped back to the
sphere; the result is scaled by the weighted mean of the inputs' norms. Every step is a
linear combination of the inputs, so it is computed on coefficient vectors from the
inputs' Gram matrix (``workers.methods.spherical``).
"""

from __future__ import annotations

import math

import torch

from workers.methods import implements
from workers.methods.base import MergeError
from workers.methods.spherical import Combination, SphericalMethod, gram
from workers.tensor_merge import TensorInputs
from workers.workspace import Workspace


def coefficients(G: torch.Tensor, weights: list[float], normalize: bool, eps: float,
                 where: str) -> torch.Tensor:
    """The coefficients ``c`` of ``result = Σ c_i v_i`` for the vectors of Gram matrix ``G``."""
    w = torch.tensor(weights, dtype=torch.float64, device=G.device)
    if normalize:
        total = float(w.sum())
        if total == 0:
            raise MergeError(f"multislerp: the weights sum to 0 at tensor {where}, so they cannot be "
                             "normalised; change the weights or set normalize_weights: false")
        w = w / total
    norms = G.diagonal().clamp(min=0).sqrt()
    a = 1 / (norms + eps)  # unit_i = a_i v_i
    mean = w * a
    mean_norm = _norm(mean, G)
    if mean_norm < eps:
        if len(weights) == 2:  # mergekit falls back to the weighted sum of the two
            return w
        raise MergeError(
            f"multislerp: the weighted mean of the unit inputs is 0 at tensor {where} (antipodal inputs "
            "whose weights balance out); change the weights")
    mean = mean / mean_norm
    dots = a * (G @ mean)  # <unit_i, mean>
    tangent = w * a - (w * dots).sum() * mean  # Σ w_i (unit_i − dots_i mean)
    theta = _norm(tangent, G) + eps
    result = mean * math.cos(theta) + tangent * (math.sin(theta) / theta)  # the exponential map
    return result * (norms * w).sum()


def _norm(c: torch.Tensor, G: torch.Tensor) -> float:
    """The norm of ``Σ c_i v_i``."""
    return math.sqrt(max(float(c @ G @ c), 0.0))


@implements("multislerp")
class MultiSlerp(SphericalMethod):

    def prepare(self, inputs: TensorInputs, ws: Workspace) -> Combination:
        if len(inputs.tensors) == 1:  # nothing to interpolate: the model itself (mergekit)
            return Combination.of([1.0], inputs, against_base=False)
        g = inputs.global_params
        against_base = inputs.base is not None
        G = gram(inputs, ws, against_base).cpu()  # n × n numbers: the steps run on the host
        c = coefficients(G, [p["weight"] for p in inputs.model_params], g["normalize_weights"], g["eps"],
                         inputs.name)
        return Combination.of(c, inputs, against_base)
