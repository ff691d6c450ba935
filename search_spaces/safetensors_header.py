"""The one reader of safetensors headers (stdlib only: no torch, no weights read).

A safetensors file is an 8-byte little-endian header length, a JSON table of tensor
name -> dtype, shape and byte offsets (relative to the data that follows), then the
data. The service validates a study from these headers before any compute, and the
workers index the tensors they will read from them; both read them here.

The header is untrusted input (a user names the model folder): its length is bounded
by :data:`MAX_HEADER_BYTES` and by the file's size before anything is parsed, every
entry is checked, and a refusal (:class:`SafetensorsHeaderError`) names the check
that failed without quoting any byte of the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


class SafetensorsHeaderError(ValueError):
    """Which check a safetensors file failed, worded without any byte of the file."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the header; ``start``/``end`` are relative to :attr:`SafetensorsHeader.data_start`."""

    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, …
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    data_start: int  # the file offset of the data: 8 + the header's length


def read_header(path: Path) -> SafetensorsHeader:
    """The checked header of one safetensors file; checks that the data is all there.

    Raises :class:`SafetensorsHeaderError` when a check fails, ``OSError`` when the file
    cannot be read."""
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise SafetensorsHeaderError("it is shorter than the 8-byte header length")
        (size,) = struct.unpack("<Q", raw)
        if size > min(MAX_HEADER_BYTES, path.stat().st_size - 8):
            raise SafetensorsHeaderError("its header length is not that of a safetensors file")
        try:
            header = json.loads(fh.read(size))
        except (ValueError, RecursionError):
            raise SafetensorsHeaderError("its header is not JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("its header is not a JSON object")
    tensors = _entries(header)
    data_end = max([0, *(t.end for t in tensors.values())])
    if path.stat().st_size < 8 + size + data_end:
        raise SafetensorsHeaderError("it is truncated (shorter than its header promises)")
    return SafetensorsHeader(tensors=tensors, data_start=8 + size)


def _entries(header: dict) -> dict[str, TensorEntry]:
    out: dict[str, TensorEntry] = {}
    for name, meta in header.items():
        if name == METADATA_KEY:
            continue
        try:
            shape = tuple(int(d) for d in meta["shape"])
            dtype = str(meta["dtype"])
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsHeaderError(
                "a tensor entry of its header lacks shape, dtype or offsets") from None
        numel = 1
        for d in shape:
            numel *= d
        if dtype in DTYPE_BYTES and end - start != numel * DTYPE_BYTES[dtype]:
            raise SafetensorsHeaderError("a tensor's byte range does not match its shape and dtype")
        out[str(name)] = TensorEntry(shape, dtype, start, end)
    return out
