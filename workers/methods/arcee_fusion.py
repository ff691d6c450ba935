"""Arcee Fusion: take the other model's value where its change matters, the base's
elsewhere.

An entry's importance is ``|other − base|`` times the KL divergence between the
softmaxes of the other model's row and the base's row (the rows of the last axis); the
entries whose importance reaches ``median + 1.5 · (q3 − q1)`` of the whole tensor take
the other model's value. ``prepare`` finds that threshold a chunk of whole rows at a
time, with exact quantiles (``workers.order_statistics``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from workers.methods import implements
from workers.methods.base import MergeInputs, MergeMethod
from workers.order_statistics import Selection
from workers.tensor_merge import TensorInputs
from workers.workspace import Workspace

QUANTILES = (0.25, 0.5, 0.75)


def importance(other: torch.Tensor, base: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``|other − base|`` times the KL divergence of the rows' softmaxes (eps-smoothed)."""
    diff = (other - base).abs()
    p = F.softmax(other, dim=-1) + eps
    q = F.softmax(base, dim=-1) + eps
    return diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _chunk_importance(inputs: TensorInputs, r0: int, r1: int, ws: Workspace) -> torch.Tensor:
    base = inputs.base_chunk(r0, r1, ws)
    assert base is not None
    return importance(inputs.input_chunk(0, r0, r1, ws), base)


@dataclass
class _Prepared:
    threshold: torch.Tensor  # the importance an entry needs to take the other model's value


@implements("arcee_fusion")
class ArceeFusion(MergeMethod):

    def prepare(self, inputs: TensorInputs, ws: Workspace) -> _Prepared:
        n = inputs.numel
        if n == 0:
            return _Prepared(torch.tensor(float("inf"), device=inputs.device))
        selection = Selection(n)
        for r0, r1 in inputs.chunk_rows():
            selection.sample(_chunk_importance(inputs, r0, r1, ws))
        # mergekit's ranks: floor(q · (n − 1)) in the ascending order
        selection.select([int(q * (n - 1)) for q in QUANTILES])
        if selection.needs_pass:
            for r0, r1 in inputs.chunk_rows():
                selection.band(_chunk_importance(inputs, r0, r1, ws))

        def whole() -> torch.Tensor:
            return torch.cat([_chunk_importance(inputs, r0, r1, ws).reshape(-1)
                              for r0, r1 in inputs.chunk_rows()])
        q1, median, q3 = selection.finish(whole)
        return _Prepared(median + 1.5 * (q3 - q1))

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        base, other = inputs.base, inputs.tensors[0]
        assert base is not None
        state = inputs.state
        if not isinstance(state, _Prepared):  # a whole tensor, called directly
            state = self.prepare(_whole(inputs), inputs.workspace or Workspace(reuse=False))
        mask = (importance(other, base) >= state.threshold).to(base.dtype)
        return base + (other - base) * mask


def _whole(inputs: MergeInputs) -> TensorInputs:
    assert inputs.base is not None
    return TensorInputs(name=inputs.name, shape=tuple(inputs.base.shape), base=inputs.base,
                        tensors=list(inputs.tensors), model_params=inputs.model_params,
                        global_params=inputs.global_params, chunk_elements=inputs.base.numel() or 1)
