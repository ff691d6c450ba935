"""What the spherical methods (nuslerp, multislerp, karcher) share.

Each of them outputs, for a tensor, a linear combination of its inputs — of their task
vectors ``x_i − base`` when a base is given — whose coefficients depend only on the
inputs' norms and the angles between them, that is on their Gram matrix
``G_ij = <v_i, v_j>``. ``prepare`` sums the Gram matrix chunk by chunk, in float64, and
finds the coefficients from it (mergekit's formulas, written on coefficient vectors
instead of full-size tensors); each chunk is then one fused kernel (``workers.kernels``),
``base + Σ c_i (x_i − base)`` or ``Σ c_i x_i``. No full-size float32 copy is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from workers.kernels import kernel
from workers.memory_plan import EAGER_CHUNK_ELEMENTS
from workers.methods.base import MergeInputs, MergeMethod
from workers.tensor_merge import ChunkOut, TensorInputs
from workers.workspace import Workspace


@dataclass
class Combination:
    """A tensor's coefficients: ``base + Σ c_i (x_i − base)`` when ``against_base``, else
    ``Σ c_i x_i`` (the kernels' constants, made once per tensor)."""

    weights: torch.Tensor  # float32, one per input
    against_base: bool
    constants: tuple[torch.Tensor, ...] = ()

    @classmethod
    def of(cls, coefficients: Any, inputs: TensorInputs, against_base: bool) -> Combination:
        f32 = dict(dtype=torch.float32, device=inputs.device)
        weights = torch.as_tensor(coefficients, dtype=torch.float64).to(**f32).reshape(-1)
        n = weights.numel()
        zeros, ones = torch.zeros(n, **f32), torch.ones(n, **f32)
        one = torch.tensor(1.0, **f32)
        # the task-vector kernel's lo, hi, l1, inv, lambda, divisor: no trim, no rescale
        return cls(weights, against_base, (zeros, zeros, ones, ones, one, one))


def vector_chunk(inputs: TensorInputs, i: int, r0: int, r1: int, ws: Workspace, base: torch.Tensor | None,
                 role: str) -> torch.Tensor:
    """Input ``i``'s rows ``r0:r1`` in float32 (in ``role``): its task vector when ``base``
    (the chunk's float32 base) is given."""
    if base is not None:
        return inputs.task_vector_chunk(i, r0, r1, base, ws, role)
    return inputs.input_chunk(i, r0, r1, ws, role)


def vector_chunks(inputs: TensorInputs, r0: int, r1: int, ws: Workspace,
                  against_base: bool) -> list[torch.Tensor]:
    """Every input's rows ``r0:r1`` in float32, each in its own buffer: task vectors when
    ``against_base``."""
    base = inputs.base_chunk(r0, r1, ws) if against_base else None
    return [vector_chunk(inputs, i, r0, r1, ws, base, f"in{i}") for i in range(len(inputs.tensors))]


def gram(inputs: TensorInputs, ws: Workspace, against_base: bool, per_column: bool = False) -> torch.Tensor:
    """``G_ij = <v_i, v_j>`` in float64 over the whole tensor (``[n, n]``); ``per_column``:
    summed over the first dimension only (``[n, n, *shape[1:]]``)."""
    n = len(inputs.tensors)
    total: torch.Tensor | None = None
    for r0, r1 in inputs.chunk_rows(EAGER_CHUNK_ELEMENTS):
        shape = inputs.chunk_shape(r0, r1)
        if per_column and len(shape) >= 2:
            vs = vector_chunks(inputs, r0, r1, ws, against_base)
            part = torch.stack([torch.stack([(a * b).sum(0, dtype=torch.float64) for b in vs]) for a in vs])
        else:
            base = inputs.base_chunk(r0, r1, ws) if against_base else None
            rows = ws.get("gram", (n, max(1, math.prod(shape))), torch.float64, inputs.device)
            for i in range(n):  # one float32 buffer, copied at once
                rows[i].copy_(vector_chunk(inputs, i, r0, r1, ws, base, "tv").reshape(-1))
            part = rows @ rows.T
        total = part if total is None else total + part
    assert total is not None
    return total


def combine(inputs: TensorInputs, c: Combination, r0: int, r1: int, out: ChunkOut) -> torch.Tensor:
    """Rows ``r0:r1`` of the combination into ``out``, by a fused kernel; the chunk's sum."""
    target = out.target.reshape(-1)
    if not c.against_base:
        one = c.constants[4]
        return kernel("linear")([inputs.flat_rows(t, r0, r1) for t in inputs.tensors], c.weights, one,
                                target, inputs.read_dtype, out.dtype)
    assert inputs.base is not None
    lo, hi, l1, inv, lam, divisor = c.constants
    return kernel("task_vectors")(
        inputs.flat_rows(inputs.base, r0, r1),
        [inputs.chunk_inputs(i, r0, r1) for i in range(len(inputs.tensors))],
        None, lo, hi, l1, inv, c.weights, lam, divisor, target, None, False, False,
        inputs.task_vectors is not None, None, inputs.read_dtype, out.dtype)


def whole(inputs: MergeInputs) -> TensorInputs:
    """A whole tensor's inputs as one chunk (for direct calls of ``merge``)."""
    first = inputs.base if inputs.base is not None else inputs.tensors[0]
    return TensorInputs(
        name=inputs.name, shape=tuple(first.shape), base=inputs.base, tensors=list(inputs.tensors),
        model_params=inputs.model_params, global_params=inputs.global_params, seed=inputs.seed,
        model_names=inputs.model_names, task_vectors=inputs.deltas, chunk_elements=first.numel() or 1,
    )


class SphericalMethod(MergeMethod):
    """A method whose ``prepare`` returns a :class:`Combination` (or, for nuslerp's row and
    column modes, its own state) and whose chunks are that combination."""

    def merge_chunk(self, inputs: TensorInputs, state: Any, j: int, r0: int, r1: int, out: ChunkOut,
                    ws: Workspace) -> torch.Tensor:
        return combine(inputs, state, r0, r1, out)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """One whole tensor in float32 (outside the engine: the same arithmetic)."""
        ws = inputs.workspace or Workspace(reuse=False)
        tensor = whole(inputs)
        result = torch.empty(tensor.shape, dtype=tensor.compute_dtype, device=tensor.device)
        state = self.prepare(tensor, ws)
        self.merge_chunk(tensor, state, 0, 0, tensor.rows, ChunkOut(result, result.dtype), ws)
        return result
