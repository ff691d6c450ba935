"""Model Stock: move the average of the fine-tuned models toward the base by the
ratio the angle between their task vectors implies."""

from __future__ import annotations

import torch

from workers.methods import implements
from workers.methods.base import MergeInputs, MergeMethod


@implements("model_stock")
class ModelStock(MergeMethod):

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        base = inputs.base
        assert base is not None
        shape = base.shape
        filter_wise = inputs.global_params["filter_wise"]

        def flat(x: torch.Tensor) -> torch.Tensor:
            if not filter_wise:
                return x.reshape(-1)
            return x.unsqueeze(0) if x.dim() == 1 else x
        w0 = flat(base)
        offsets = [flat(t) - w0 for t in inputs.tensors]
        cosines = []
        for i in range(len(offsets)):
            for j in range(i + 1, len(offsets)):
                a, b = offsets[i], offsets[j]
                norms = (torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1))
                cosines.append(((a * b).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(0).unsqueeze(-1)
        k = len(offsets)
        denom = 1 + (k - 1) * cos
        singular = denom.abs() < 1e-6
        ratio = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, 1, denom))
        mean = sum(flat(t) for t in inputs.tensors) / k
        return (ratio * mean + (1 - ratio) * w0).reshape(shape)
