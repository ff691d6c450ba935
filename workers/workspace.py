"""Reusable scratch tensors for merges that run thousands of times."""

from __future__ import annotations

import torch


class Workspace:
    """Reusable scratch tensors, one per role, dtype and device.

    A role's buffer grows to the largest request and is viewed at the shape asked for,
    so a merge of many tensor shapes holds one buffer per role, not one per shape.
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor | tuple[int, ...], dtype: torch.dtype | None = None,
            device: torch.device | None = None) -> torch.Tensor:
        if isinstance(like, torch.Tensor):
            shape, dtype, device = tuple(like.shape), dtype or like.dtype, device or like.device
        else:
            shape = tuple(like)
        assert dtype is not None and device is not None
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        n = 1
        for d in shape:
            n *= d
        key = (role, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return buf[:n].view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


_FRESH = Workspace(reuse=False)
