"""Passthrough: copy one source's tensor (layer stacking), optionally scaled."""

from __future__ import annotations

import torch

from workers.methods import implements
from workers.methods.base import MergeInputs, MergeMethod


@implements("passthrough")
class Passthrough(MergeMethod):

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        scale = inputs.model_params[0]["scale"]
        t = inputs.tensors[0]
        return t if scale == 1 else t * scale
