"""NuSLERP: spherical interpolation between two models — between their task vectors when
a base is given — at ``t = weight_2 / (weight_1 + weight_2)`` (mergekit's ``nuslerp``).

With ``nuslerp_flatten`` (the default) the tensor is one vector and the result is a
combination of the two inputs with two coefficients; otherwise each row (each vector
along the last dimension) or, ``nuslerp_row_wise``, each column (along the first) has its
own angle, and the coefficients are per row or per column.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.methods import implements
from workers.methods.spherical import Combination, SphericalMethod, gram, vector_chunks
from workers.tensor_merge import ChunkOut, TensorInputs, _finish
from workers.workspace import Workspace

EPS = 1e-8  # mergekit: the inputs are colinear where 1 − cos² <= EPS²
NORM_FLOOR = 1e-7  # mergekit divides by max(norm, 1e-7)


def interpolation_t(weights: list[float]) -> float:
    """mergekit's ``t``: the second model's share of the weights (0.5 when they sum to ~0)."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def coefficients(t: float, g00: torch.Tensor, g11: torch.Tensor,
                 g01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c0, c1)`` with ``slerp(t, v0, v1) = c0 v0 + c1 v1``, from ``<v0, v0>``, ``<v1, v1>``
    and ``<v0, v1>`` (float64, any shape): linear interpolation where they are colinear."""
    n0 = g00.clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    n1 = g11.clamp(min=0).sqrt().clamp(min=NORM_FLOOR)
    cos = (g01 / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    sin = torch.where(colinear, 1.0, torch.sin(theta))
    c0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, t, torch.sin(t * theta) / sin)
    return c0, c1


@dataclass
class _PerVector:
    """Row and column modes: per-column coefficients (found over the whole tensor), or
    None for per-row ones (found in each chunk, which holds whole rows)."""

    t: float
    columns: tuple[torch.Tensor, torch.Tensor] | None


@implements("nuslerp")
class NuSlerp(SphericalMethod):

    def prepare(self, inputs: TensorInputs, ws: Workspace) -> Combination | _PerVector:
        g = inputs.global_params
        t = interpolation_t([p["weight"] for p in inputs.model_params])
        against_base = inputs.base is not None
        if g["nuslerp_flatten"]:
            G = gram(inputs, ws, against_base)
            c = torch.stack(coefficients(t, G[0, 0], G[1, 1], G[0, 1]))
            return Combination.of(c, inputs, against_base)
        if g["nuslerp_row_wise"]:
            G = gram(inputs, ws, against_base, per_column=True)
            return _PerVector(t, coefficients(t, G[0, 0], G[1, 1], G[0, 1]))
        return _PerVector(t, None)

    def merge_chunk(self, inputs: TensorInputs, state: Combination | _PerVector, j: int, r0: int, r1: int,
                    out: ChunkOut, ws: Workspace) -> torch.Tensor:
        if isinstance(state, Combination):
            return super().merge_chunk(inputs, state, j, r0, r1, out, ws)
        v0, v1 = vector_chunks(inputs, r0, r1, ws, inputs.base is not None)
        if state.columns is None:
            def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per row, summed in float64
                return (a * b).sum(-1, keepdim=True, dtype=torch.float64)

            c0, c1 = coefficients(state.t, dot(v0, v0), dot(v1, v1), dot(v0, v1))
        else:
            c0, c1 = state.columns
        dtype = inputs.compute_dtype
        result = ws.get("out", v0.shape, dtype, inputs.device)
        torch.mul(v0, c0.to(dtype), out=result).addcmul_(v1, c1.to(dtype))
        if inputs.base is not None:
            base = inputs.base_chunk(r0, r1, ws)
            assert base is not None
            result.add_(base)
        return _finish(result, out.target, out.dtype, out.residual_scale, out.unit_offset)
