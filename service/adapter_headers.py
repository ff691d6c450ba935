"""A PEFT LoRA adapter folder as the service reads it: ``adapter_config.json`` and the
``adapter_model.safetensors`` header, each file checked to lie inside the allowed roots before it
is opened (as a model's files are, :mod:`service.model_headers`); the parsing and every check
that needs no base are :mod:`search_spaces.lora_adapter`'s, shared with the workers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from search_spaces.lora_adapter import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterError,
    LoraAdapter,
    load_config,
    parse_adapter,
)
from service.model_headers import ModelFormatError, check_contained, read_safetensors_header


def read_adapter_folder(folder: Path, ref: str, *,
                        allowed: Sequence[Path] | None = None) -> tuple[LoraAdapter, list[Path]]:
    """A PEFT LoRA adapter folder's config and safetensors header (each file checked to lie in
    ``allowed`` before it is opened), parsed by :mod:`search_spaces.lora_adapter`, and the files read."""
    config_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    check_contained(config_path, folder, ref, allowed)
    if not weights.is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        raise ModelFormatError(
            f"adapter {ref!r} has no {ADAPTER_WEIGHTS}"
            + (" (only adapter_model.bin, a pickle whose shapes cannot be read without loading it)"
               if pickled else ""),
            "save the adapter with peft's save_pretrained (it writes adapter_model.safetensors)",
            "adapter_no_weights")
    check_contained(weights, folder, ref, allowed)
    try:
        config = load_config(config_path, ref)
        tensors = {n: (h.shape, h.dtype) for n, h in read_safetensors_header(weights).items()}
        adapter = parse_adapter(ref, config, tensors)
    except AdapterError as err:
        raise ModelFormatError(err.msg, err.fix, err.kind) from None
    return adapter, [config_path, weights]
