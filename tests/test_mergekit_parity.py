"""Parity with mergekit itself: the same recipe on the same inputs gives the same
weights, for every deterministic method both implement.

The random methods (dare_ties, dare_linear, della, della_linear) draw their masks
differently by design (evomerge's are seeded per tensor), so they are checked by
their math in test_methods_math.py instead.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from search_spaces.mergekit_format import to_mergekit_dict
from search_spaces.recipe import Recipe
from workers.merge import merge
from workers.model_io import LazyModel

mergekit = pytest.importorskip("mergekit", reason="mergekit is in the dev extras")


def run_mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(
        MergeConfiguration.model_validate(config),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True),
    )


def assert_same_weights(ours: Path, theirs: Path, atol: float = 1e-6) -> None:
    a, b = LazyModel(str(ours)), LazyModel(str(theirs))
    names_a = set(a.tensors)
    names_b = set(b.tensors)
    # mergekit may write an explicit lm_head for a tied model; it must equal embed_tokens
    for extra in names_b - names_a:
        assert extra.endswith("lm_head.weight"), extra
        assert torch.allclose(b.get(extra), a.get(a.tensors and "model.embed_tokens.weight"))
    assert names_a <= names_b, names_a - names_b
    worst = 0.0
    for name in sorted(names_a):
        x, y = a.get(name).float(), b.get(name).float()
        assert x.shape == y.shape, name
        worst = max(worst, (x - y).abs().max().item())
        assert torch.allclose(x, y, atol=atol, rtol=1e-5), (name, (x - y).abs().max().item())


def _recipes(base: Path, e: list[Path]) -> dict[str, dict]:
    b, e0, e1 = str(base), str(e[0]), str(e[1])
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": e0, "parameters": {"weight": [0.2, 0.9]}},
                {"model": e1, "parameters": {"weight": 0.5}},
                {"model": b, "parameters": {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 1.0}]}},
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic", "base_model": b,
            "models": [
                {"model": e0, "parameters": {"weight": [1.2, -0.3]}},
                {"model": e1, "parameters": {"weight": 0.6}},
            ],
            "parameters": {"lambda": 0.9},
        },
        "ties": {
            "merge_method": "ties", "base_model": b,
            "models": [
                {"model": e0, "parameters": {"weight": 0.7, "density": [0.2, 0.9]}},
                {"model": e1, "parameters": {"weight": [{"filter": "self_attn", "value": 1.3},
                                                        {"value": 0.4}], "density": 0.5}},
            ],
        },
        "ties_unnormalised": {
            "merge_method": "ties", "base_model": b,
            "models": [
                {"model": e0, "parameters": {"weight": 0.7, "density": 0.3}},
                {"model": e1, "parameters": {"weight": 0.4, "density": 0.6}},
            ],
            "parameters": {"normalize": False, "rescale": True},
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs", "base_model": b,
            "models": [
                {"model": e0, "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
                {"model": e1, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
            ],
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties", "base_model": b,
            "models": [
                {"model": e0, "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
                {"model": e1, "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.02}},
            ],
        },
        "slerp": {
            "merge_method": "slerp", "base_model": b,
            "models": [{"model": e0}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                                 {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                                 {"value": 0.5}]},
        },
        "model_stock": {
            "merge_method": "model_stock", "base_model": b,
            "models": [{"model": e0}, {"model": e1}],
        },
        "model_stock_filter_wise": {
            "merge_method": "model_stock", "base_model": b,
            "models": [{"model": e0}, {"model": e1}],
            "parameters": {"filter_wise": True},
        },
        "passthrough_scaled": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": e0, "layer_range": [0, 2]}]},
                {"sources": [{"model": e1, "layer_range": [1, 2], "scale": 0.5}]},
                {"sources": [{"model": e0, "layer_range": [0, 1], "scale": 1.7}]},
            ],
        },
        "slices_slerp": {
            "merge_method": "slerp", "base_model": b,
            "slices": [{"sources": [{"model": b, "layer_range": [0, 2]},
                                    {"model": e1, "layer_range": [0, 2]}]}],
            "parameters": {"t": [0.1, 0.8]},
        },
    }


CASES = sorted(_recipes(Path("b"), [Path("x"), Path("y")]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_weights_as_mergekit(family, tmp_path, arch, case):
    if arch == "qwen2" and case == "passthrough_scaled":
        pytest.skip(
            "mergekit 0.1.5 leaves Qwen2's per-layer 'layer_types' unpatched when stacking, so "
            "its own output config fails to load; evomerge patches it (see test_merge_e2e)"
        )
    base, experts = family(arch, 2)
    data = _recipes(base, experts)[case]
    recipe = Recipe.from_dict(data)
    merge(recipe, tmp_path / "ours")
    # mergekit runs the YAML evomerge writes, so the writer is checked too
    run_mergekit(yaml.safe_load(yaml.safe_dump(to_mergekit_dict(recipe))), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs")
