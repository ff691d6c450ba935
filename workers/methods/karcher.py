"""Karcher mean: the weighted Riemannian barycentre of the models' directions on the unit
hypersphere, scaled by the weighted mean of their norms (mergekit's ``karcher``).

Starting from the normalised weighted mean of the unit inputs, each step moves along the
sphere by the weighted sum of the log maps of the inputs, until that step is below
``tol`` or after ``max_iter`` steps. Every iterate is a linear combination of the inputs,
so the search runs on coefficient vectors from the inputs' Gram matrix
(``workers.methods.spherical``). mergekit weighs every model equally; evomerge's
``weight`` (default 1 each, normalised) lets a search weigh them.
"""

from __future__ import annotations

import math

import torch

from workers.methods import implements
from workers.methods.base import MergeError
from workers.methods.spherical import Combination, SphericalMethod, gram
from workers.tensor_merge import TensorInputs
from workers.workspace import Workspace


def _norm(c: torch.Tensor, G: torch.Tensor) -> float:
    """The norm of ``Σ c_i v_i``."""
    return math.sqrt(max(float(c @ G @ c), 0.0))


def coefficients(G: torch.Tensor, alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The coefficients ``c`` of ``Σ c_i v_i``, the Karcher mean of the vectors of Gram matrix
    ``G`` with weights ``alphas`` (summing to 1)."""
    n = len(alphas)
    norms = [math.sqrt(max(float(G[i, i]), 0.0)) for i in range(n)]
    valid = [i for i in range(n) if norms[i] > tol]
    zero = torch.zeros(n, dtype=torch.float64, device=G.device)
    total = sum(alphas[i] for i in valid)
    if not valid or total <= 0:
        return zero
    unit = [1 / norms[i] if norms[i] > 0 else 0.0 for i in range(n)]  # unit_i = unit[i] v_i
    share = {i: alphas[i] / total for i in valid}

    def unit_vector(i: int) -> torch.Tensor:
        e = zero.clone()
        e[i] = unit[i]
        return e

    mean = zero.clone()
    for i in valid:
        mean[i] = share[i] * unit[i]
    mean_norm = _norm(mean, G)
    mean = unit_vector(valid[0]) if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = zero.clone()
        projections = G @ mean
        for i in valid:
            dot = min(max(unit[i] * float(projections[i]), -1.0), 1.0)  # <unit_i, mean>
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += share[i] * (theta / math.sin(theta)) * (unit_vector(i) - dot * mean)
        step = _norm(tangent, G)
        if step < tol:
            break
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        length = _norm(mean, G)
        if length > tol:
            mean = mean / length
    return mean * sum(a * r for a, r in zip(alphas, norms))


@implements("karcher")
class Karcher(SphericalMethod):

    def prepare(self, inputs: TensorInputs, ws: Workspace) -> Combination:
        if len(inputs.tensors) == 1:  # the mean of one model is the model (mergekit)
            return Combination.of([1.0], inputs, against_base=False)
        weights = [p["weight"] for p in inputs.model_params]
        total = sum(weights)
        if total <= 0:
            raise MergeError(f"karcher: the weights sum to {total} at tensor {inputs.name}; give at least "
                             "one model a positive weight")
        G = gram(inputs, ws, against_base=False).cpu()  # a few numbers: the iterations run on the host
        g = inputs.global_params
        return Combination.of(coefficients(G, [w / total for w in weights], g["max_iter"], g["tol"]), inputs,
                              against_base=False)
