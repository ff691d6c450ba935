"""Streaming, sharded safetensors writing.

Because a merge plan knows every output tensor's name, shape and dtype before any
weight is computed, each shard's header can be written first and each tensor's bytes
streamed straight after it as soon as it is computed: the writer never holds more
than the tensor in hand, whatever the shard size.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from workers.model_io import tensor_nbytes

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2G', or a plain number of bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    if s and s[-1] in units:
        return int(float(s[:-1]) * units[s[-1]])
    return int(s)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


class ShardedWriter:
    """Write tensors, in the announced order, into shards of at most ``shard_size``
    bytes (a tensor larger than that gets a shard of its own)."""

    def __init__(self, out_dir: Path, specs: Iterable[TensorSpec], shard_size: int):
        self.out_dir = Path(out_dir)
        self.specs = list(specs)
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate output tensor names")
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in self.specs:
            if shards[-1] and size + spec.nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        self.shards = shards
        n = len(shards)
        self.files = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(i, s) for i, shard in enumerate(shards) for s in shard]
        self._next = 0
        self._fh: BinaryIO | None = None
        self._shard = -1

    def _open(self, shard: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[shard]:
            header[spec.name] = {
                "dtype": DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.out_dir / (self.files[shard] + ".partial"), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._shard = shard

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, spec = self._order[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name}, got {name}")
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                f"announced {spec.shape} {spec.dtype}"
            )
        if shard != self._shard:
            self._open(shard)
        assert self._fh is not None
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            self._fh.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish: rename the shards into place and write the index when sharded."""
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for f in self.files:
            os.replace(self.out_dir / (f + ".partial"), self.out_dir / f)
        if len(self.files) > 1:
            weight_map = {s.name: self.files[i] for i, s in self._order}
            total = sum(s.nbytes for s in self.specs)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for f in self.files:
            (self.out_dir / (f + ".partial")).unlink(missing_ok=True)
