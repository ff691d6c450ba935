"""A memory tier's sources with LoRA adapters among them (``workers.sources``).

The tier holds the full models (the base among them); this wrapper holds each adapter's own
tensors, a few MB, once: on the device in the resident tier, in host memory (pinned on a GPU)
in the others. A tensor of an adapter is composed on the device when a merge step asks for it
(:meth:`workers.lora.AdapterModel.weight`: the base's tensor from the tier, plus
``B @ A × scale``) and dropped with the step; a tensor the adapter does not change is the
base's, served by the tier as it is (a big one a chunk of rows at a time). Nothing full-size
is kept per adapter, so a worker's memory grows by the adapters' size, not by models.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from workers.lora import AdapterModel
from workers.sources import Key, Sources


class AdapterSources(Sources):
    """``inner`` (a tier over the full models) with ``adapters`` composed on request."""

    def __init__(self, inner: Sources, adapters: dict[str, AdapterModel]):
        super().__init__({**inner.models, **adapters}, inner.device)
        self.inner = inner
        self.tier = inner.tier  # type: ignore[misc]
        self.adapters = adapters
        on_device = inner.tier == "resident"
        pin = self.device.type == "cuda" and not on_device
        self.own: dict[str, dict[str, torch.Tensor]] = {}
        for ref, model in adapters.items():
            held = {}
            for name in model.own_names():
                t = model.file.get(name)
                held[name] = t.to(self.device) if on_device else (t.pin_memory() if pin else t)
            model.file.close()
            self.own[ref] = held

    def _base_key(self, key: Key) -> Key:
        return (self.adapters[key[0]].base.ref, key[1])

    def _compose(self, key: Key) -> torch.Tensor:
        model = self.adapters[key[0]]
        weight = model.weight(key[1], self.inner.get(self._base_key(key)), self.own[key[0]])
        return self._checked_once(key, weight)

    def get(self, key: Key) -> torch.Tensor:
        if key[0] not in self.adapters:
            return self.inner.get(key)
        if not self.adapters[key[0]].changes(key[1]):
            return self.inner.get(self._base_key(key))
        return self._compose(key)

    def keep(self, key: Key) -> torch.Tensor:
        if key[0] not in self.adapters:
            return self.inner.keep(key)
        if not self.adapters[key[0]].changes(key[1]):
            return self.inner.keep(self._base_key(key))
        return self._compose(key)  # a new tensor: the caller's

    def for_merge(self, key: Key) -> torch.Tensor:
        if key[0] not in self.adapters:
            return self.inner.for_merge(key)
        if not self.adapters[key[0]].changes(key[1]):
            return self.inner.for_merge(self._base_key(key))
        return self._compose(key)  # composed whole on the device (LoRA targets linear layers)

    def prefetch(self, keys: Iterable[Key]) -> None:
        self.inner.prefetch(self._base_key(k) if k[0] in self.adapters else k for k in keys)

    def release(self) -> None:
        self.inner.release()

    def nbytes(self) -> dict[str, int]:
        held = self.inner.nbytes()
        size = sum(t.numel() * t.element_size() for own in self.own.values() for t in own.values())
        where = "device" if self.inner.tier == "resident" and self.device.type != "cpu" else "host"
        return {**held, where: held[where] + size}

    def close(self) -> None:
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            closer()
