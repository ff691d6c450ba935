"""LoRA adapters as sources on the workers: an adapter folder read as the full model peft's
``merge_and_unload`` would make of it, one tensor at a time and never written anywhere.

An :class:`AdapterModel` has its base's tensor names, shapes and dtypes. Reading a tensor the
adapter changes composes it (:func:`compose`): ``W + B @ A × scale`` in float32, a block of
rows at a time, rounded once to ``W``'s dtype; a tensor the adapter saves whole
(``modules_to_save``) is read from the adapter's file in ``W``'s dtype; any other tensor is the
base's own. Every merge method therefore takes an adapter like any model, and a task-vector
method's task vector of it is that composed weight minus the base: ``B @ A × scale`` as the
merged model would store it. A merge over adapters equals one over the models
``merge_and_unload`` writes (peft rounds a bfloat16 product to bfloat16 before adding it; evomerge
adds the float32 product and rounds once, so bfloat16 merges may differ in the last bit).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Union

import torch

from search_spaces.lora_adapter import (
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraAdapter,
    LoraPair,
    check_against_base,
    is_adapter_folder,
    read_adapter,
)
from workers.memory_facts import SourceFacts, adapter_facts, facts_from_tensors
from workers.memory_plan import CHUNK_ELEMENTS
from workers.methods.base import MergeError
from workers.model_io import LazyModel, dtype_name


class _AdapterFile(LazyModel):
    """The adapter's own tensors (``adapter_model.safetensors``), read one at a time."""

    def __init__(self, ref: str, path: Path):  # no config.json: LazyModel's reading, not its checks
        self.ref, self.path = ref, path
        self.tensors = {}
        self._handles = {}
        self._bin_cache = {}
        self.config = {}
        self._index_safetensors([ADAPTER_WEIGHTS])


def compose(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pair: LoraPair,
            rows_per_chunk: int | None = None) -> torch.Tensor:
    """``weight + B @ A × scale`` (transposed with fan_in_fan_out) in float32, rounded to
    ``weight``'s dtype, on ``weight``'s device, a block of rows at a time (a new tensor)."""
    out = torch.empty_like(weight)
    a32 = a.to(weight.device, torch.float32)
    b32 = b.to(weight.device, torch.float32)
    rows, cols = weight.shape
    step = rows_per_chunk or max(1, CHUNK_ELEMENTS // max(1, cols))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        delta = (b32 @ a32[:, r0:r1]).T if pair.fan_in_fan_out else b32[r0:r1] @ a32
        out[r0:r1].copy_(weight[r0:r1].to(torch.float32) + delta * pair.scale)
    return out


class AdapterModel:
    """A LoRA adapter over its base, read like a :class:`~workers.model_io.LazyModel`: the
    tensors of the full model it stands for (the base's names, shapes and dtypes)."""

    def __init__(self, ref: str, base: LazyModel, path: Path | None = None):
        self.ref = ref
        self.path = Path(path or ref).resolve()
        self.base = base
        try:
            self.adapter: LoraAdapter = read_adapter(self.path, ref)
            check_against_base(self.adapter, {n: i.shape for n, i in base.tensors.items()},
                               base_names=None, base_given=base.ref)  # the name: checked at submission
        except AdapterError as err:
            raise MergeError(f"{err.msg} ({err.fix})") from None
        self.file = _AdapterFile(ref, self.path)
        self.tensors = dict(base.tensors)  # read through get(): never by their file offsets
        self.config = base.config

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def changes(self, name: str) -> bool:
        """Whether the adapter changes this tensor (else it is the base's)."""
        return name in self.adapter.pairs or name in self.adapter.replaced

    def own_names(self) -> list[str]:
        """The adapter file's tensors (what a worker holds of it)."""
        return list(self.file.tensors)

    def weight(self, name: str, base_tensor: torch.Tensor, own: dict[str, torch.Tensor]) -> torch.Tensor:
        """Tensor ``name`` of the full model from the base's tensor and the adapter's own tensors
        (``own``: adapter tensor name -> tensor, wherever they are held)."""
        pair = self.adapter.pairs.get(name)
        if pair is not None:
            return compose(base_tensor, own[pair.a], own[pair.b], pair)
        saved = self.adapter.replaced.get(name)
        if saved is not None:
            return own[saved].to(base_tensor.device, base_tensor.dtype)
        return base_tensor

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor of the full model (a CPU tensor owned by the caller)."""
        if not self.changes(name):
            return self.base.get(name)
        pair = self.adapter.pairs.get(name)
        wanted = [pair.a, pair.b] if pair is not None else [self.adapter.replaced[name]]
        return self.weight(name, self.base.get(name), {n: self.file.get(n) for n in wanted})

    def weight_files(self) -> list[Path]:
        return [self.path / ADAPTER_WEIGHTS]

    @property
    def model_type(self) -> str:
        return self.base.model_type

    @property
    def tie_word_embeddings(self) -> bool:
        return self.base.tie_word_embeddings

    def close(self) -> None:
        self.file.close()


Model = Union[LazyModel, AdapterModel]


def open_model(path: str, base: LazyModel | None = None, *, ref: str | None = None) -> Model:
    """A model folder (or hub id), or an adapter folder read over ``base`` (named ``ref``:
    default its path)."""
    if not is_adapter_folder(Path(path).expanduser()):
        return LazyModel(path)
    if base is None:
        raise MergeError(f"model {path!r} is a PEFT LoRA adapter: name the model it was trained on as the "
                         "recipe's base_model (its weights are that base's plus B·A·alpha/r)")
    if isinstance(base, AdapterModel):
        raise MergeError(f"base_model {base.ref!r} is a LoRA adapter: the base must be a full model")
    return AdapterModel(ref or path, base, Path(path).expanduser())


def mergekit_lora_ref(ref: str) -> tuple[str, str] | None:
    """(base, adapter) of mergekit's ``base+adapter`` reference (an adapter over a base), or None."""
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts) or Path(ref).expanduser().exists():
        return None
    return (parts[0], parts[1]) if is_adapter_folder(Path(parts[1]).expanduser()) else None


def open_models(refs: Iterable[str], base: str | None) -> dict[str, Model]:
    """Every model of ``refs`` (and ``base``, first), adapters over ``base``."""
    models: dict[str, Model] = {}
    if base is not None:
        models[base] = open_model(base)
        if isinstance(models[base], AdapterModel):
            raise MergeError(f"base_model {base!r} is a LoRA adapter: the base must be a full model")
    for ref in refs:
        if ref not in models:
            models[ref] = open_model(ref, models.get(base) if base is not None else None)  # type: ignore[arg-type]
    return models


def model_facts(model: Model) -> SourceFacts:
    """What the memory planner knows of a model; an adapter counts at its own size."""
    if isinstance(model, AdapterModel):
        own = ((n, shape, dtype) for n, (shape, dtype) in model.adapter.tensors.items())
        return adapter_facts(model.ref, own, model_facts(model.base), model.adapter.largest_target_numel())
    tensors = ((i.name, i.shape, dtype_name(i.dtype)) for i in model.tensors.values())
    return facts_from_tensors(model.ref, tensors, model.config)
