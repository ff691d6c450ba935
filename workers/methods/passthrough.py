"""Passthrough: copy one source's tensor (layer stacking), optionally scaled."""

from __future__ import annotations

import torch

from workers.methods import register
from workers.methods.base import MergeInputs, MergeMethod, ParamSpec


@register
class Passthrough(MergeMethod):
    name = "passthrough"
    description = "copy layers from slices of the sources, renumbered; optional scales"
    needs_base = False
    base_is_input = True
    max_models = 1
    model_params = (ParamSpec("scale", float, 1.0, help="multiplies the tensor (mergekit)"),)
    chunked = True

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        scale = inputs.model_params[0]["scale"]
        t = inputs.tensors[0]
        return t if scale == 1 else t * scale
