"""Linear: a weighted average of the inputs (model soup)."""

from __future__ import annotations

import torch

from workers.kernels import kernel, linear_kernel
from workers.methods import implements
from workers.methods.base import MergeError, MergeInputs, MergeMethod


@implements("linear")
class Linear(MergeMethod):

    def _divisor(self, name: str, weights: list[float], normalize: bool) -> float:
        if not normalize:
            return 1.0
        total = sum(weights)
        if abs(total) < 1e-12:
            raise MergeError(
                f"linear: the weights sum to 0 at tensor {name}, so they cannot be "
                "normalised; change the weights or set normalize: false"
            )
        return total

    def merge_chunk(self, inputs, state, j, r0, r1, out, ws) -> torch.Tensor:
        weights = [p["weight"] for p in inputs.model_params]
        divisor = self._divisor(inputs.name, weights, inputs.global_params["normalize"])
        device = inputs.device
        return kernel("linear")(
            [inputs.flat_rows(t, r0, r1) for t in inputs.tensors],
            torch.tensor(weights, dtype=torch.float32, device=device),
            torch.tensor(float(divisor), dtype=torch.float32, device=device),
            out.target.reshape(-1), inputs.read_dtype, out.dtype)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """One whole tensor in float32 (outside the engine: the kernel's arithmetic)."""
        weights = [p["weight"] for p in inputs.model_params]
        divisor = self._divisor(inputs.name, weights, inputs.global_params["normalize"])
        out = torch.empty_like(inputs.tensors[0])
        linear_kernel([t.reshape(-1) for t in inputs.tensors], torch.tensor(weights, dtype=out.dtype),
                      torch.tensor(float(divisor), dtype=out.dtype), out.reshape(-1), None, out.dtype)
        return out
