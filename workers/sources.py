"""Where a worker keeps its sources: the three memory tiers.

Every tier hands the merge a source tensor in its **stored dtype** on the compute
device; they differ in where the bytes live between candidates:

- :class:`ResidentSources`: on the compute device (GPU memory, or host memory on a CPU
  worker). Fastest; needs room for every source.
- :class:`StreamedSources`: in host memory (pinned on a GPU worker) and copied to the
  device a tensor at a time; the copy of the next tensor runs on a side CUDA stream
  while this one merges. Needs device room for the candidate only.
- :class:`MappedSources`: read through the page cache (a private read-only map of
  the safetensors files), for hosts with less memory than the sources: mapped pages
  are the kernel's to drop, never the worker's anonymous memory. On a GPU worker each
  tensor is copied through a pinned staging buffer.

``prefetch`` names the tensors the next merge step will ask for, so copies (or disk
reads, for the mapped tier) overlap the merge of the current one. On a GPU worker a
tensor bigger than ``SLICE_ABOVE`` (embeddings and heads) is not copied whole: the
merge copies its rows a chunk at a time (``for_merge``), so the device never holds more
than ``SLICE_ABOVE`` of any source at once.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from typing import ClassVar

import torch

from workers.memory_plan import SLICE_ABOVE
from workers.merge import check_finite_source
from workers.model_io import LazyModel, TensorInfo

Key = tuple[str, str]  # (model reference, tensor name)
TIERS = ("resident", "streamed", "mapped")


class Sources:
    """A study's source tensors, served in their stored dtype on ``device``."""

    tier: ClassVar[str]

    def __init__(self, models: dict[str, LazyModel], device: torch.device):
        self.models = models
        self.device = torch.device(device)
        self._checked: set[Key] = set()

    def info(self, key: Key) -> TensorInfo:
        return self.models[key[0]].tensors[key[1]]

    def get(self, key: Key) -> torch.Tensor:
        """The tensor on the device (valid until the next ``release``); refused once, on
        first use, if it holds NaN."""
        return self._checked_once(key, self._get(key))

    def _checked_once(self, key: Key, t: torch.Tensor) -> torch.Tensor:
        """``t``, refused if it holds NaN the first time ``key`` is given out."""
        if key not in self._checked and t.dtype.is_floating_point:
            check_finite_source(key[0], key[1], t)
            self._checked.add(key)
        return t

    def keep(self, key: Key) -> torch.Tensor:
        """The tensor on the device, to keep (a stacked candidate's own tensor)."""
        return self.get(key)

    def for_merge(self, key: Key) -> torch.Tensor:
        """The tensor for a chunked merge: on the device, or, for a tensor bigger than
        ``SLICE_ABOVE`` that a GPU worker stages from the host, the host tensor itself,
        whose rows the merge copies to the device a chunk at a time
        (``TensorInputs.rows_of``): an embedding of a 7B model is 1.1 GB, a chunk 8 MB."""
        return self.get(key)

    def prefetch(self, keys: Iterable[Key]) -> None:
        """The tensors the next step will ask for (a hint)."""

    def release(self) -> None:
        """The tensors given out since the last release are no longer used."""

    def _get(self, key: Key) -> torch.Tensor:
        raise NotImplementedError

    def nbytes(self) -> dict[str, int]:
        """Bytes held, by where: ``device`` and ``host`` (anonymous memory)."""
        return {"device": 0, "host": 0}


def _load_all(models: dict[str, LazyModel], to: torch.device, pin: bool = False) -> dict[Key, torch.Tensor]:
    out: dict[Key, torch.Tensor] = {}
    for ref, lazy in models.items():
        for name in lazy.tensors:
            t = lazy.get(name)
            if pin:
                t = t.pin_memory()
            out[(ref, name)] = t if to.type == "cpu" else t.to(to)
        lazy.close()
    return out


def _size(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class ResidentSources(Sources):
    tier = "resident"

    def __init__(self, models: dict[str, LazyModel], device: torch.device):
        super().__init__(models, device)
        self.tensors = _load_all(models, self.device)

    def _get(self, key: Key) -> torch.Tensor:
        return self.tensors[key]

    def nbytes(self) -> dict[str, int]:
        held = _size(self.tensors.values())
        return {"device": held, "host": 0} if self.device.type != "cpu" else {"device": 0, "host": held}


class _Staged(Sources):
    """Copies host tensors to the device, the next step's on a side stream."""

    def __init__(self, models: dict[str, LazyModel], device: torch.device):
        super().__init__(models, device)
        self.cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[Key, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        self._given: list[Key] = []

    def host(self, key: Key) -> torch.Tensor:
        raise NotImplementedError

    def _copy(self, key: Key) -> None:
        if key in self._ready:
            return
        src = self.host(key)
        if self._stream is None:
            self._ready[key] = (src, None)
            return
        with torch.cuda.stream(self._stream):
            dev = torch.empty(src.shape, dtype=src.dtype, device=self.device)
            dev.copy_(src, non_blocking=src.is_pinned())
            done = torch.cuda.Event()
            done.record(self._stream)
        self._copied(done)
        self._ready[key] = (dev, done)

    def _copied(self, done: torch.cuda.Event) -> None:
        """A host→device copy was queued; ``done`` fires when its source is free."""

    def _sliced(self, key: Key) -> bool:
        return self.cuda and self.info(key).nbytes > SLICE_ABOVE

    def for_merge(self, key: Key) -> torch.Tensor:
        if not self._sliced(key):
            return self.get(key)
        return self._checked_once(key, self._host_rows(key))

    def _host_rows(self, key: Key) -> torch.Tensor:
        return self.host(key)

    def prefetch(self, keys: Iterable[Key]) -> None:
        if self.cuda:
            for key in keys:
                if not self._sliced(key):
                    self._copy(key)

    def _get(self, key: Key) -> torch.Tensor:
        self._copy(key)
        t, done = self._ready[key]
        if done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            t.record_stream(current)  # its memory is not reused before the merge is done
        self._given.append(key)
        return t

    def keep(self, key: Key) -> torch.Tensor:
        t = self.get(key)
        self._ready.pop(key, None)  # the caller owns it now
        return t

    def release(self) -> None:
        for key in self._given:
            self._ready.pop(key, None)
        self._given.clear()


class StreamedSources(_Staged):
    tier = "streamed"

    def __init__(self, models: dict[str, LazyModel], device: torch.device):
        super().__init__(models, device)
        self.tensors = _load_all(models, torch.device("cpu"), pin=self.cuda)

    def host(self, key: Key) -> torch.Tensor:
        return self.tensors[key]

    def nbytes(self) -> dict[str, int]:
        return {"device": 0, "host": _size(self.tensors.values())}


class MappedSources(_Staged):
    """Sources read through a private, read-only map of their safetensors files."""

    tier = "mapped"

    def __init__(self, models: dict[str, LazyModel], device: torch.device):
        super().__init__(models, device)
        self._maps: dict[tuple[str, str], mmap.mmap] = {}
        # a ring of pinned staging buffers: this step's inputs and the next step's
        self._ring: list[list] = [[None, None] for _ in range(2 * max(1, len(models)))]
        self._slot = 0

    def _map(self, ref: str, file: str) -> mmap.mmap:
        key = (ref, file)
        if key not in self._maps:
            fd = os.open(self.models[ref].path / file, os.O_RDONLY)
            try:
                # copy-on-write and never written: pages stay the page cache's
                self._maps[key] = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        return self._maps[key]

    def _view(self, key: Key) -> torch.Tensor:
        info = self.info(key)
        size = torch.empty((), dtype=info.dtype).element_size()
        if info.offset < 0 or info.nbytes == 0 or info.offset % size:
            return self.models[key[0]].get(key[1])  # .bin, empty or unaligned: read it
        buf = self._map(key[0], info.file)
        count = info.nbytes // size
        return torch.frombuffer(buf, dtype=info.dtype, count=count, offset=info.offset).view(info.shape)

    def host(self, key: Key) -> torch.Tensor:
        view = self._view(key)
        if not self.cuda:
            return view
        # pageable memory cannot be copied asynchronously: stage it in pinned memory
        slot = self._ring[self._slot]
        buf, done = slot
        if done is not None:
            done.synchronize()  # its last copy to the device has finished
        nbytes = view.numel() * view.element_size()
        if buf is None or buf.numel() < nbytes:
            buf = slot[0] = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        staged = buf[:nbytes].view(view.dtype).view(view.shape)
        staged.copy_(view)
        return staged

    def _host_rows(self, key: Key) -> torch.Tensor:
        return self._view(key)  # pageable: each chunk's rows are copied synchronously

    def _copied(self, done: torch.cuda.Event) -> None:
        self._ring[self._slot][1] = done
        self._slot = (self._slot + 1) % len(self._ring)

    def prefetch(self, keys: Iterable[Key]) -> None:
        keys = list(keys)
        if not self.cuda:
            for key in keys:  # ask the kernel to read ahead
                info = self.info(key)
                if info.offset >= 0 and info.nbytes:
                    buf = self._map(key[0], info.file)
                    start = info.offset - info.offset % mmap.PAGESIZE
                    buf.madvise(mmap.MADV_WILLNEED, start, info.offset + info.nbytes - start)
        super().prefetch(keys)

    def nbytes(self) -> dict[str, int]:
        return {"device": 0, "host": _size(b for b, _ in self._ring if b is not None)}

    def close(self) -> None:
        for buf in self._maps.values():
            try:
                buf.close()
            except BufferError:  # a candidate still uses a view of it
                pass
        self._maps.clear()


def open_sources(tier: str, models: dict[str, LazyModel], device: torch.device | str) -> Sources:
    """The sources in ``tier``; LoRA adapters among ``models`` (``workers.lora.AdapterModel``) are
    held at their own size and composed on request (``workers.lora_sources``)."""
    kinds: dict[str, type[Sources]] = {
        "resident": ResidentSources, "streamed": StreamedSources, "mapped": MappedSources,
    }
    if tier not in kinds:
        raise ValueError(f"unknown memory tier {tier!r}: use one of {', '.join(TIERS)}")
    adapters = {ref: m for ref, m in models.items() if getattr(m, "adapter", None) is not None}
    full = {ref: m for ref, m in models.items() if ref not in adapters}
    sources = kinds[tier](full, torch.device(device))
    if not adapters:
        return sources
    from workers.lora_sources import AdapterSources

    return AdapterSources(sources, adapters)  # type: ignore[arg-type]
