"""The benchmark models: three Llama-shaped models of random weights, >= 500 MB each."""

from __future__ import annotations

from pathlib import Path

import torch


def build_models(root: Path, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    """A base and two experts with Llama's tensor names, written with safetensors."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from workers.synthetic import make_config, tokenizer_files

    config = make_config("llama", hidden=1024, layers=8, vocab=32000, intermediate=2816, heads=16)
    config.tie_word_embeddings = False
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    paths = [root / "base", root / "expert0", root / "expert1"]
    if all((p / "model.safetensors").exists() for p in paths):
        return paths[0], paths[1:]
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}
    for i, path in enumerate(paths):
        path.mkdir(parents=True, exist_ok=True)
        if i == 0:
            state = base
        else:
            state = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(dtype)
                     for k, v in base.items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.torch_dtype = str(dtype).removeprefix("torch.")
        config.save_pretrained(str(path))
        tokenizer_files(path)
        del state
    return paths[0], paths[1:]


def paths(root: Path) -> tuple[Path, list[Path]]:
    """The float32 benchmark models under ``root/models`` (built on first use)."""
    return build_models(Path(root) / "models", torch.float32)
