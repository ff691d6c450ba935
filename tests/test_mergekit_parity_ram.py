"""Parity of ``ram`` and ``ramplus_tl`` with mergekit 0.1.5 itself, on tiny Llama and
Qwen2 models (Qwen2's attention has biases): mergekit runs the YAML evomerge writes.

The synthetic experts move every entry by N(0, 0.02), so an ``epsilon`` near 0.02 leaves
both unique and shared entries (and RAM+'s scales differ from 1). RAM+'s counts are per
tensor: one case merges in chunks of a few rows, so its counting pass is checked too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from search_spaces.mergekit_format import to_mergekit_dict
from search_spaces.recipe import Recipe
from tests.test_mergekit_parity import assert_same_weights, run_mergekit
from workers.merge import merge

mergekit = pytest.importorskip("mergekit", reason="mergekit is in the dev extras")


def _recipes(base: Path, e: list[Path]) -> dict[str, dict]:
    b = str(base)
    two = [{"model": str(m)} for m in e[:2]]
    three = [{"model": str(m)} for m in e]
    return {
        "ram": {"merge_method": "ram", "base_model": b, "models": two, "parameters": {"epsilon": 0.015}},
        "ram_three_gradient": {"merge_method": "ram", "base_model": b, "models": three,
                               "parameters": {"epsilon": [0.005, 0.03]}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": two,
                       "parameters": {"epsilon": 0.02, "r": 0.7, "alpha": 0.9}},
        "ramplus_tl_three_filtered": {
            "merge_method": "ramplus_tl", "base_model": b, "models": three,
            "parameters": {"epsilon": 0.01, "alpha": 1.2,
                           "r": [{"filter": "mlp", "value": [0.3, 1.5]}, {"value": 0.5}]}},
        "ramplus_tl_defaults": {"merge_method": "ramplus_tl", "base_model": b, "models": three},
    }


CASES = sorted(_recipes(Path("b"), [Path("x"), Path("y"), Path("z")]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_weights_as_mergekit(family, tmp_path, arch, case):
    base, experts = family(arch, 3)
    recipe = Recipe.from_dict(_recipes(base, experts)[case])
    merge(recipe, tmp_path / "ours")
    run_mergekit(yaml.safe_load(yaml.safe_dump(to_mergekit_dict(recipe))), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs", atol=0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_ramplus_tl_in_small_chunks_same_weights_as_mergekit(family, tmp_path, monkeypatch, arch):
    import workers.tensor_merge

    monkeypatch.setattr(workers.tensor_merge, "EAGER_CHUNK_ELEMENTS", 100)  # a few rows a chunk
    base, experts = family(arch, 3)
    recipe = Recipe.from_dict(_recipes(base, experts)["ramplus_tl"])
    merge(recipe, tmp_path / "ours")
    run_mergekit(to_mergekit_dict(recipe), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs", atol=0.0)


def test_epsilon_zero_with_an_unmoved_model_mergekit_nan_evomerge_finite():
    """The one place evomerge differs on purpose: with ``epsilon: 0`` a model equal to the
    base in a tensor has 0 shared / 0 unique entries; mergekit's ratio is 0/0 and NaN
    spreads over the whole tensor, evomerge takes the ratio as 0 (that model adds nothing)."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.ram import ramplus_tl_merge

    from workers import methods
    from workers.methods.base import MergeInputs

    base, moved = torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])
    group = TensorGroup.from_tensors([base, moved, base.clone()], base_index=0)
    params = {"r": 0.5, "alpha": 1.0, "epsilon": 0.0}
    assert torch.isnan(ramplus_tl_merge.implementation(group, **params)).all()
    ours = methods.get("ramplus_tl").merge(MergeInputs(
        name="w", base=base, tensors=[moved.clone(), base.clone()], model_params=[{}, {}],
        global_params=params))
    assert torch.equal(ours, moved)
