"""Seconds spent inside a model's forward passes, and the tokens they took, measured with
module hooks.

Torch is imported only when a timer starts on a CUDA model (``import evaluators`` stays
torch-free)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def forward_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The tokens one forward call takes in: the non-padding ones of ``input_ids`` (or of
    ``inputs_embeds``).

    With an ``attention_mask`` they are its ones over the call's new positions: during KV-cached
    decoding the mask spans the whole sequence while ``input_ids`` holds only the new tokens, so
    each step counts what it adds. Without a mask every position counts. Returns an int, or a
    0-d tensor on the model's device (summed later, so that counting never waits for the device).
    """
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None or getattr(embeds, "ndim", 0) < 2:
            return 0
        ids = embeds[..., 0]
    if not hasattr(ids, "shape"):
        return 0
    mask = kwargs.get("attention_mask")
    if mask is None and len(args) > 1 and hasattr(args[1], "shape"):
        mask = args[1]
    new = ids.shape[-1] if ids.ndim else 1
    if mask is None or getattr(mask, "ndim", 0) != 2 or ids.ndim != 2 or mask.shape[0] != ids.shape[0]:
        return int(ids.numel())
    return mask[:, -new:].sum()


class ForwardTimer:
    """Context manager: while active, ``seconds``, ``calls`` and ``tokens`` count ``model(...)``
    calls (``tokens`` is read after the block: see :func:`forward_tokens`).

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
        self._tokens = 0  # plain counts
        self._device_tokens: Any = None  # counts on the device, one sum at the end

    @property
    def tokens(self) -> int:
        """Tokens through the model's forward passes so far (reads the device's count once)."""
        if self._device_tokens is not None:
            self._tokens += int(self._device_tokens.item())
            self._device_tokens = None
        return self._tokens

    def _pre(self, module, args, kwargs) -> None:
        if self._depth == 0:
            self._start = time.perf_counter()
            n = forward_tokens(args, kwargs)
            if isinstance(n, int):
                self._tokens += n
            else:
                self._device_tokens = n if self._device_tokens is None else self._device_tokens + n
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
            self.model.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.model.register_forward_hook(self._post),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._depth = 0
