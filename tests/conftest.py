"""Shared fixtures: tiny models built once per test session, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def family(model_root):
    """``family(arch, n_experts=2, dtype=None)`` -> (base, [experts]) of a tiny random
    model (float32 unless ``dtype`` is given, e.g. ``torch.bfloat16``)."""
    from workers.synthetic import make_family

    cache: dict[tuple[str, int, str], tuple[Path, list[Path]]] = {}

    def get(arch: str, n_experts: int = 2, dtype: torch.dtype | None = None):
        tag = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
        key = (arch, n_experts, tag)
        if key not in cache:
            folder = model_root / (f"{arch}-{n_experts}" + ("" if dtype is None else f"-{tag}"))
            extra = {} if dtype is None else {"dtype": dtype}
            cache[key] = make_family(arch, folder, n_experts, **extra)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray, started once per test session (no dashboard)."""
    import ray

    from workers.pool import init_ray

    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()
