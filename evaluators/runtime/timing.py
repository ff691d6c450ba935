"""Seconds spent inside a model's forward passes, measured with module hooks.

Torch is imported only when a timer starts on a CUDA model (``import evaluators`` stays
torch-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class ForwardTimer:
    """Context manager: while active, ``seconds`` and ``calls`` count ``model(...)`` calls.

    On CUDA each forward pass is synchronized at its end so that the time is the
    device's, not the launch's.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.seconds = 0.0
        self.calls = 0
        self._start = 0.0
        self._depth = 0
        self._handles: list = []
        self._sync: Callable[[], None] | None = None  # torch.cuda.synchronize on a CUDA model

    def _pre(self, module, args) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
        self._depth += 1

    def _post(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._sync is not None:
                self._sync()
            self.seconds += time.perf_counter() - self._start
            self.calls += 1

    def __enter__(self) -> ForwardTimer:
        self._sync = None
        if any(p.is_cuda for p in self.model.parameters()):
            import torch

            self._sync = torch.cuda.synchronize
        self._handles = [
            self.model.register_forward_pre_hook(self._pre),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._depth = 0
