"""Lazy reading of Hugging Face model folders.

A :class:`LazyModel` knows every tensor's name, shape and dtype from the file headers
alone and reads one tensor at a time on request, so a merge never holds a whole model
in memory. Supported layouts: ``model.safetensors``, sharded safetensors with
``model.safetensors.index.json``, and ``pytorch_model.bin`` (sharded or not, read
through a memory map) as a fallback. Hub ids are resolved with ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from search_spaces.safetensors_header import SafetensorsHeader, SafetensorsHeaderError, read_header

WEIGHT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of this shape and dtype."""
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class ModelNotFoundError(FileNotFoundError):
    """A model reference that is neither a readable folder nor a resolvable hub id."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str
    offset: int = -1  # byte offset of the data in a safetensors file

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


def looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not ref.startswith((".", "/", "~"))
        and not os.path.exists(ref)
    )


def resolve_model_path(ref: str, *, revision: str | None = None) -> Path:
    """Turn a model reference (local folder or hub id) into a local folder."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(
            f"model {ref!r} is a file, not a folder: pass the folder holding config.json"
        )
    if not looks_like_hub_id(ref):
        raise ModelNotFoundError(
            f"model {ref!r} not found: no such folder, and it is not a hub id (org/name)"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except Exception as exc:  # hub errors come in many types
        raise ModelNotFoundError(
            f"model {ref!r} is neither a local folder nor downloadable from the hub "
            f"({type(exc).__name__}: {exc}). Check the id, or download it first and "
            "pass the local folder."
        ) from exc


def _read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The checked header of a safetensors file (:mod:`search_spaces.safetensors_header`)."""
    try:
        return read_header(path)
    except SafetensorsHeaderError as err:
        raise ValueError(f"{path} is not a safetensors file ({err})") from None


class LazyModel:
    """A model folder whose tensors are read one at a time."""

    def __init__(self, ref: str, path: Path | None = None):
        self.ref = ref
        self.path = path if path is not None else resolve_model_path(ref)
        self.tensors: dict[str, TensorInfo] = {}
        self._handles: dict[str, Any] = {}
        self._bin_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._index()
        config_path = self.path / "config.json"
        if not config_path.exists():
            raise ModelNotFoundError(f"model {ref!r}: {config_path} is missing")
        self.config: dict[str, Any] = json.loads(config_path.read_text())

    # ---- index -------------------------------------------------------------------
    def _index(self) -> None:
        p = self.path
        st_index = p / "model.safetensors.index.json"
        if st_index.exists():
            files = sorted(set(json.loads(st_index.read_text())["weight_map"].values()))
            self._index_safetensors(files)
        elif (p / "model.safetensors").exists():
            self._index_safetensors(["model.safetensors"])
        elif list(p.glob("*.safetensors")):
            self._index_safetensors(sorted(f.name for f in p.glob("*.safetensors")))
        elif (p / "pytorch_model.bin.index.json").exists():
            idx = json.loads((p / "pytorch_model.bin.index.json").read_text())
            self._index_bin(sorted(set(idx["weight_map"].values())))
        elif (p / "pytorch_model.bin").exists():
            self._index_bin(["pytorch_model.bin"])
        else:
            raise ModelNotFoundError(
                f"model {self.ref!r} at {p} has no weights: expected model.safetensors, "
                "sharded safetensors with model.safetensors.index.json, or pytorch_model.bin"
            )

    def _index_safetensors(self, files: list[str]) -> None:
        for fname in files:
            header = _read_safetensors_header(self.path / fname)
            for name, entry in header.tensors.items():
                dtype = SAFETENSORS_DTYPES.get(entry.dtype)
                if dtype is None:
                    raise ValueError(
                        f"model {self.ref!r}: tensor {name} has unsupported dtype {entry.dtype}"
                    )
                info = TensorInfo(name, entry.shape, dtype, fname, header.data_start + entry.start)
                if info.nbytes != entry.end - entry.start:
                    raise ValueError(f"model {self.ref!r}: tensor {name} has a corrupt size")
                self.tensors[name] = info

    def _index_bin(self, files: list[str]) -> None:
        for fname in files:
            state = self._load_bin(fname)
            for name, t in state.items():
                self.tensors[name] = TensorInfo(name, tuple(t.shape), t.dtype, fname)

    def _load_bin(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._bin_cache:
            # mmap keeps the pickle's tensors on disk until touched.
            self._bin_cache[fname] = torch.load(
                self.path / fname, map_location="cpu", mmap=True, weights_only=True
            )
        return self._bin_cache[fname]

    # ---- reading -----------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (a fresh CPU tensor owned by the caller)."""
        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"model {self.ref!r} has no tensor {name!r}")
        if info.offset >= 0:
            return self._pread(info)
        return self._load_bin(info.file)[name].clone()

    def _pread(self, info: TensorInfo) -> torch.Tensor:
        """Read a tensor's bytes straight into a fresh buffer.

        Plain reads rather than a memory map: mapped pages of every source would count
        toward the process's resident memory for the whole merge.
        """
        fd = self._handles.get(info.file)
        if fd is None:
            fd = os.open(self.path / info.file, os.O_RDONLY)
            self._handles[info.file] = fd
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        done = 0
        while done < info.nbytes:
            n = os.preadv(fd, [view[done:]], info.offset + done)
            if n <= 0:
                raise OSError(f"model {self.ref!r}: {info.file} ended early reading {info.name}")
            done += n
        return buf.view(info.dtype).reshape(info.shape)

    def weight_files(self) -> list[Path]:
        return sorted({self.path / info.file for info in self.tensors.values()})

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    @property
    def tie_word_embeddings(self) -> bool:
        if "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        # transformers' default is True for most causal LMs
        return True

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._bin_cache.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
        "fp64": torch.float64,
    }
    if name not in table:
        raise ValueError(
            f"unknown dtype {name!r}: use one of float32, float16, bfloat16, float64"
        )
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
