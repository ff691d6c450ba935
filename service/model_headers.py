"""What a model folder holds, from its headers alone (no torch, no weights read).

A study is validated before any compute: the service must know each model's
architecture, layer count and tensor shapes without loading it. ``config.json`` and the
safetensors headers (an 8-byte little-endian length, then a JSON table of tensor name ->
dtype, shape, byte offsets) say all of it; reading them costs a few kilobytes per file.

Folders holding only ``pytorch_model.bin`` are refused: a pickle has no header, so its
shapes cannot be known without loading (and unpickling) the whole file. The error says
how to convert. Hub models are read from the local Hugging Face cache, or, when the hub
is reachable, from ``config.json`` and the safetensors headers fetched by range requests
(``huggingface_hub.get_safetensors_metadata``): no weights are downloaded.

The safetensors headers are parsed by :mod:`search_spaces.safetensors_header` and the layers
found by :data:`search_spaces.tensor_names.LAYER_RE`: the workers use the same two, so the
service and the merge engine agree on what a model holds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search_spaces.lora_adapter import ADAPTER_CONFIG
from search_spaces.safetensors_header import MAX_HEADER_BYTES, SafetensorsHeaderError, read_header
from search_spaces.tensor_names import EMBED_NAMES, HEAD_NAMES, LAYER_RE, TOKENIZER_FILES

HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


class ModelFormatError(ValueError):
    """A model that cannot be used: ``msg`` says what is wrong, ``fix`` how to fix it."""

    def __init__(self, msg: str, fix: str, kind: str = "model_unreadable") -> None:
        super().__init__(msg)
        self.msg = msg
        self.fix = fix
        self.kind = kind


@dataclass(frozen=True)
class TensorHeader:
    shape: tuple[int, ...]
    dtype: str  # safetensors' name: F32, BF16, …


@dataclass
class ModelHeaders:
    """A model as its headers describe it."""

    ref: str
    path: Path | None  # the local folder (None: read from the hub without a local copy)
    config: dict[str, Any]
    tensors: dict[str, TensorHeader]
    files: list[Path] = field(default_factory=list)  # every local file read (for root checks)

    # ---- from config.json ----------------------------------------------------------
    def _cfg(self, *keys: str) -> Any:
        for cfg in (self.config, self.config.get("text_config") or {}):
            for key in keys:
                if isinstance(cfg, dict) and cfg.get(key) is not None:
                    return cfg[key]
        return None

    @property
    def model_type(self) -> str:
        return str(self._cfg("model_type") or "unknown")

    @property
    def hidden_size(self) -> int | None:
        value = self._cfg("hidden_size", "n_embd", "d_model")
        return int(value) if value is not None else None

    @property
    def config_layers(self) -> int | None:
        value = self._cfg("num_hidden_layers", "n_layer", "num_layers")
        return int(value) if value is not None else None

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", True))

    @property
    def has_remote_code(self) -> bool:
        return bool(self.config.get("auto_map"))

    @property
    def has_tokenizer(self) -> bool | None:
        """Whether the folder has tokenizer files (None: unknown, no local folder)."""
        if self.path is None:
            return None
        return any((self.path / name).is_file() for name in TOKENIZER_FILES)

    # ---- from the tensor names -----------------------------------------------------
    def layers(self) -> tuple[str, dict[int, dict[str, TensorHeader]]]:
        """The decoder stack: its name prefix and layer index -> suffix -> header."""
        stacks: dict[str, dict[int, dict[str, TensorHeader]]] = {}
        for name, header in self.tensors.items():
            m = LAYER_RE.match(name)
            if m:
                stacks.setdefault(m["prefix"], {}).setdefault(int(m["idx"]), {})[m["rest"]] = header
        if not stacks:
            raise ModelFormatError(
                f"model {self.ref!r} has no decoder layers (no tensor names like 'model.layers.0.…' "
                "or 'transformer.h.0.…')",
                "give a decoder-only causal language model folder",
                "model_unsupported",
            )
        prefix = max(stacks, key=lambda p: len(stacks[p]))
        return prefix, stacks[prefix]

    @property
    def num_layers(self) -> int:
        """Decoder layers, as the merge engine counts them (from the tensor names)."""
        return len(self.layers()[1])

    def layer_tensors(self) -> dict[str, TensorHeader]:
        """Suffix -> header of layer 0 (every layer has the same structure)."""
        return dict(self.layers()[1].get(0, {}))

    def comparable_tensors(self) -> dict[str, TensorHeader]:
        """Every tensor, with a tied head made explicit (the engine reads it from the embedding)."""
        out = dict(self.tensors)
        if self.tie_word_embeddings and not any(n.endswith(HEAD_NAMES) for n in out):
            embed = next((n for n in out if n.endswith(EMBED_NAMES)), None)
            if embed is not None:
                out["lm_head.weight"] = out[embed]
        return out

    def check_structure(self) -> None:
        """Refuse what the engine would refuse: gaps in the layers, layers that differ,
        a config whose layer count disagrees with the weights."""
        prefix, layers = self.layers()
        n = len(layers)
        if sorted(layers) != list(range(n)):
            raise ModelFormatError(
                f"model {self.ref!r}: the layer indices under {prefix!r} are not 0..{n - 1}",
                "the weights are incomplete: re-save or re-download the model",
                "model_unsupported",
            )
        first = layers[0]
        for i in range(1, n):
            if set(layers[i]) != set(first):
                diff = sorted(set(first) ^ set(layers[i]))[:4]
                raise ModelFormatError(
                    f"model {self.ref!r}: layer {i} has other tensors than layer 0 ({', '.join(diff)})",
                    "evomerge merges models whose layers all have one structure",
                    "model_unsupported",
                )
        if self.config_layers is not None and self.config_layers != n:
            raise ModelFormatError(
                f"model {self.ref!r}: config.json says {self.config_layers} layers, the weights hold {n}",
                "fix num_hidden_layers in config.json, or re-save the model",
                "model_unreadable",
            )


# ---- safetensors -------------------------------------------------------------------
def read_safetensors_header(path: Path) -> dict[str, TensorHeader]:
    """Tensor name -> header of one safetensors file; checks that the data is all there.

    A refusal names the check that failed and never quotes the file (a path that slipped
    past the checks must not be readable through error messages)."""
    try:
        header = read_header(path)
    except SafetensorsHeaderError as err:
        why = str(err)
    except OSError as err:
        why = f"it cannot be read ({type(err).__name__})"
    else:
        return {name: TensorHeader(t.shape, t.dtype) for name, t in header.tensors.items()}
    raise ModelFormatError(
        f"{path.name} is not a readable safetensors file: {why}",
        "re-download or re-save the model (transformers' save_pretrained writes safetensors)",
    )


_SHARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,254}\.safetensors$")
MAX_SHARDS = 10_000


def _shard_names(index: Path, ref: str) -> list[str]:
    """The shard file names an index lists: plain file names in the model's folder, nothing else.
    A name with a folder, '..', or an odd character is refused before anything is opened; the
    message never quotes what the index holds."""
    bad_index = ModelFormatError(
        f"model {ref!r}: {index.name} is not a valid index (a JSON object whose weight_map maps "
        "tensor names to shard file names)", "re-save the model, or remove the broken index")
    try:
        if index.stat().st_size > MAX_HEADER_BYTES:
            raise bad_index
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted({str(v) for v in weight_map.values()}) if isinstance(weight_map, dict) else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise bad_index from None
    if not names or len(names) > MAX_SHARDS:
        raise bad_index
    odd = sum(1 for n in names if not _SHARD_NAME.match(n))
    if odd:
        raise ModelFormatError(
            f"model {ref!r}: {index.name} names {odd} shard(s) that are not plain safetensors file "
            "names in the model's folder (a path, '..' or an odd character)",
            "list only the shard files of this folder in weight_map (e.g. model-00001-of-00002.safetensors)",
            "path_outside_model")
    return names


def inside(path: Path, roots: Sequence[Path]) -> bool:
    """Is ``path`` one of ``roots`` or under one (all real paths)? The one containment test of
    the service: models, their files and task folders."""
    return any(path == r or path.is_relative_to(r) for r in roots)


def check_contained(path: Path, folder: Path, ref: str, allowed: Sequence[Path] | None) -> None:
    """Refuse a file of the folder that resolves (symlinks followed) outside ``allowed`` (the
    folder itself when None), before it is opened. Worded the same whether or not the
    target exists."""
    real = Path(os.path.realpath(path))
    allowed_real = [Path(os.path.realpath(folder))] if allowed is None else list(allowed)
    if not inside(real, allowed_real):
        raise ModelFormatError(
            f"model {ref!r}: {path.name} leads outside the "
            f"{'model folder' if allowed is None else 'allowed roots'}",
            "replace the link with the file itself, inside the model folder", "path_outside_roots")


def _weight_files(folder: Path, ref: str,
                  allowed: Sequence[Path] | None = None) -> tuple[list[Path], Path | None]:
    """The safetensors files of a folder (and its index, if sharded), each checked to lie in
    ``allowed`` (real paths; None: the folder) before it is opened."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        check_contained(index, folder, ref, allowed)
        names = _shard_names(index, ref)
        shards = [folder / n for n in names]
        for shard in shards:  # every name is checked before any shard is opened
            check_contained(shard, folder, ref, allowed)
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise ModelFormatError(
                f"model {ref!r}: {len(missing)} shard(s) named in {index.name} are missing",
                "the download is incomplete: download the model again",
            )
        return shards, index
    if (folder / "model.safetensors").is_file():
        check_contained(folder / "model.safetensors", folder, ref, allowed)
        return [folder / "model.safetensors"], None
    shards = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_"))
    if shards:
        for shard in shards:
            check_contained(shard, folder, ref, allowed)
        return shards, None
    if list(folder.glob("pytorch_model*.bin")) or (folder / "pytorch_model.bin.index.json").exists():
        raise ModelFormatError(
            f"model {ref!r} has only PyTorch pickle weights (pytorch_model.bin): their shapes cannot be "
            "checked without loading the whole file",
            "convert it to safetensors once: `AutoModelForCausalLM.from_pretrained(path)"
            ".save_pretrained(out)` (transformers writes model.safetensors), or `evomerge merge` a "
            "passthrough recipe of all its layers into a new folder",
            "model_bin_only",
        )
    raise ModelFormatError(
        f"model {ref!r} has no weights: expected model.safetensors or sharded safetensors with "
        "model.safetensors.index.json",
        "point to the folder that holds the model's config.json and safetensors files",
        "model_no_weights",
    )


def read_model_folder(folder: Path, ref: str | None = None, *,
                      allowed: Sequence[Path] | None = None) -> ModelHeaders:
    """Read a local model folder's config and safetensors headers.

    Every file is checked to resolve inside ``allowed`` (real paths, e.g. the model roots;
    None: the folder itself) before it is opened, so neither a symlink nor a shard name in
    the index can make the server read another file."""
    ref = ref or str(folder)
    if not folder.is_dir():
        what = "a file, not a folder" if folder.exists() else "not found"
        raise ModelFormatError(f"model {ref!r} is {what}",
                               "give the folder that holds config.json and the weights",
                               "model_not_found")
    config_path = folder / "config.json"
    if not config_path.is_file():
        if (folder / ADAPTER_CONFIG).is_file():
            raise ModelFormatError(
                f"model {ref!r} is a PEFT adapter ({ADAPTER_CONFIG}), not a full model: an adapter may be "
                "a source of a parameter-space merge, not its base, a hub model or a stacking source",
                "name the model the adapter was trained on here, or merge the adapter into its base first "
                "(peft's merge_and_unload) and save it",
                "model_is_adapter",
            )
        raise ModelFormatError(f"model {ref!r} has no config.json",
                               "give the folder that holds config.json and the weights",
                               "model_no_config")
    check_contained(config_path, folder, ref, allowed)
    try:
        if config_path.stat().st_size > MAX_HEADER_BYTES:
            raise ValueError("larger than any config")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, RecursionError):
        raise ModelFormatError(f"model {ref!r}: config.json is not a valid JSON object",
                               "repair or re-save config.json") from None
    files, index = _weight_files(folder, ref, allowed)
    tensors: dict[str, TensorHeader] = {}
    for f in files:
        tensors.update(read_safetensors_header(f))
    if not tensors:
        raise ModelFormatError(f"model {ref!r} has safetensors files without tensors",
                               "re-save the model", "model_no_weights")
    read = [config_path, *files, *([index] if index else [])]
    headers = ModelHeaders(ref=ref, path=folder, config=config, tensors=tensors, files=read)
    headers.check_structure()
    return headers


# ---- the hub -----------------------------------------------------------------------
def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def read_hub_model(repo_id: str, *, revision: str | None = None,
                   cache_dir: str | Path | None = None) -> ModelHeaders:
    """Headers of a hub model: from the local cache, else (online) by range requests."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download, snapshot_download

    try:
        local = Path(str(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                           allow_patterns=HUB_PATTERNS, local_files_only=True)))
        # a snapshot's files are links into the repository's blobs/: the repository folder holds both
        repo_folder = Path(os.path.realpath(local.parent.parent))
        return read_model_folder(local, ref=repo_id, allowed=[repo_folder])
    except ModelFormatError as err:
        if err.kind in ("model_no_config", "model_is_adapter") or hub_offline():
            raise
    except Exception:  # not cached: the hub client raises several types
        if hub_offline():
            raise ModelFormatError(
                f"hub model {repo_id!r} is not in the local Hugging Face cache, and the hub is offline "
                "(HF_HUB_OFFLINE=1)",
                f"download it on this machine first (`hf download {repo_id}`), or copy it into a "
                "model root and give its path",
                "model_not_found",
            ) from None
    try:
        config_path = hf_hub_download(repo_id, "config.json", revision=revision, cache_dir=cache_dir)
        config = json.loads(Path(config_path).read_text())
        meta = get_safetensors_metadata(repo_id, revision=revision)
    except Exception as err:  # not found, gated, not safetensors, network: all refuse the same way
        raise ModelFormatError(
            f"hub model {repo_id!r} cannot be read ({type(err).__name__}: {err})",
            "check the id (and access to gated models); models without safetensors weights must be "
            "converted first",
            "model_not_found",
        ) from None
    tensors = {
        name: TensorHeader(tuple(int(d) for d in info.shape), str(info.dtype))
        for file_meta in meta.files_metadata.values()
        for name, info in file_meta.tensors.items()
    }
    headers = ModelHeaders(ref=repo_id, path=None, config=config, tensors=tensors)
    headers.check_structure()
    return headers
