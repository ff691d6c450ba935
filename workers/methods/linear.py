"""Linear: a weighted average of the inputs (model soup)."""

from __future__ import annotations

import torch

from workers.methods import register
from workers.methods.base import MergeError, MergeInputs, MergeMethod, ParamSpec


@register
class Linear(MergeMethod):
    name = "linear"
    description = "sum(weight_i * model_i) / sum(weight_i)"
    reference = "https://arxiv.org/abs/2203.05482"
    needs_base = False
    base_is_input = True
    global_params = (ParamSpec("normalize", bool, True, help="divide by the summed weights"),)
    model_params = (ParamSpec("weight", float, help="this model's weight"),)
    chunked = True

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        weights = [p["weight"] for p in inputs.model_params]
        out = inputs.out.zero_() if inputs.out is not None else torch.zeros_like(inputs.tensors[0])
        for w, t in zip(weights, inputs.tensors):
            out.add_(t, alpha=w)
        if inputs.global_params["normalize"]:
            total = sum(weights)
            if abs(total) < 1e-12:
                raise MergeError(
                    f"linear: the weights sum to 0 at tensor {inputs.name}, so they cannot be "
                    "normalised; change the weights or set normalize: false"
                )
            out.div_(total)
        return out
