"""SCE (select, calculate, erase; FuseChat 2.0): keep the entries whose task vectors vary
most across the models, weight each task vector by its mean square, and average the
entries whose sign agrees with the elected one.

Per tensor, ``prepare`` finds, a chunk at a time, what needs the whole tensor: the
variance at or above which an entry is selected (exact, ``workers.order_statistics``)
and each task vector's weight; then each chunk is merged on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.methods import implements
from workers.methods.base import MergeInputs, MergeMethod
from workers.methods.task_arithmetic import TaskVectorMethod
from workers.order_statistics import Selection
from workers.tensor_merge import TensorInputs
from workers.workspace import Workspace


@dataclass
class _Prepared:
    """One tensor's selection and weights."""

    keep_none: bool  # select_topk selects no entry: the merge is the base
    threshold: torch.Tensor | None  # the variance an entry needs to be kept (None: all are)
    weights: torch.Tensor  # per task vector, normalised to sum to 1


def _stacked(inputs: TensorInputs, r0: int, r1: int, ws: Workspace) -> torch.Tensor:
    """The chunk's task vectors, stacked along a new first axis (a workspace buffer)."""
    base = inputs.base_chunk(r0, r1, ws)
    assert base is not None
    out = ws.get("sce", (len(inputs.tensors), *inputs.chunk_shape(r0, r1)), inputs.compute_dtype,
                 inputs.device)
    for i in range(len(inputs.tensors)):
        out[i].copy_(inputs.task_vector_chunk(i, r0, r1, base, ws, "tv"))
    return out


def _variance(tvs: torch.Tensor) -> torch.Tensor:
    return torch.var(tvs, dim=0, unbiased=False)


def _select(tvs: torch.Tensor, threshold: torch.Tensor | None) -> torch.Tensor:
    """Zero, in place, the entries whose variance across the task vectors is below the
    threshold."""
    if threshold is not None:
        tvs.mul_((_variance(tvs) >= threshold).to(tvs.dtype))
    return tvs


def _threshold(inputs: TensorInputs, share: float, ws: Workspace) -> torch.Tensor | None:
    """The variance of the ``⌊share · nonzero⌋``-th most varying entry (None: no entry is
    kept), where ``nonzero`` counts the entries of non-zero variance, as mergekit does."""
    selection = Selection(inputs.numel)
    nonzero = torch.zeros((), dtype=torch.int64, device=inputs.device)
    for r0, r1 in inputs.chunk_rows():
        var = _variance(_stacked(inputs, r0, r1, ws))
        nonzero += torch.count_nonzero(var)
        selection.sample(var)
    k = int(nonzero.cpu() * share)  # mergekit's float32 product, truncated
    if k <= 0:
        return None
    selection.select([inputs.numel - k])
    if selection.needs_pass:
        for r0, r1 in inputs.chunk_rows():
            selection.band(_variance(_stacked(inputs, r0, r1, ws)))

    def whole() -> torch.Tensor:
        return torch.cat([_variance(_stacked(inputs, r0, r1, ws)).reshape(-1)
                          for r0, r1 in inputs.chunk_rows()])
    return selection.finish(whole)[0]


def _weights(squares: torch.Tensor, numel: int) -> torch.Tensor:
    """Each task vector's mean square over the sum of them (equal weights when the sum
    vanishes)."""
    means = (squares / max(1, numel)).float()
    total = float(means.sum())
    if abs(total) < 1e-6:
        return torch.ones_like(means) / means.numel()
    return means / total


@implements("sce")
class Sce(TaskVectorMethod):
    merge_chunk = MergeMethod.merge_chunk  # each chunk through ``merge``, in float32

    def prepare(self, inputs: TensorInputs, ws: Workspace) -> _Prepared:
        share = float(inputs.global_params["select_topk"])
        n = len(inputs.tensors)
        squares = torch.zeros(n, dtype=torch.float64, device=inputs.device)
        threshold = None
        if share <= 0 or inputs.numel == 0:
            return _Prepared(True, None, squares.float())
        if share < 1:
            threshold = _threshold(inputs, share, ws)
            if threshold is None:
                return _Prepared(True, None, squares.float())
        for r0, r1 in inputs.chunk_rows():
            tvs = _select(_stacked(inputs, r0, r1, ws), threshold)
            squares += tvs.square().reshape(n, -1).sum(dim=1, dtype=torch.float64)
        return _Prepared(False, threshold, _weights(squares, inputs.numel))

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        state = inputs.state
        if not isinstance(state, _Prepared):  # a whole tensor, called directly
            return super().merge(inputs)
        assert inputs.base is not None
        if state.keep_none:
            return inputs.base
        tvs = _select(torch.stack(inputs.task_vectors()), state.threshold)
        majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
        weights = state.weights.to(tvs.dtype).view(-1, *[1] * (tvs.dim() - 1)) * (tvs.sign() == majority)
        merged = (tvs * weights).sum(dim=0)
        return inputs.base + merged / weights.sum(dim=0).clamp(min=1e-6)
