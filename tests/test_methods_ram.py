"""RAM and RAM+ (tensor-local): their math on small tensors worked out by hand, their
parameter space (a decoded recipe merges), their mergekit YAML and `evomerge methods`.
Parity with mergekit itself: tests/test_mergekit_parity_ram.py."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml

from search_spaces.mergekit_format import to_mergekit_yaml
from search_spaces.recipe import Recipe
from search_spaces.registry import build_space
from workers import methods
from workers.methods.base import MergeError, MergeInputs
from workers.model_io import LazyModel


def run(method: str, base: list[float], tensors: list[list[float]], **global_params: float) -> torch.Tensor:
    m = methods.get(method)
    g = {p.name: p.default for p in m.global_params}
    g.update(global_params)
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return m.merge(MergeInputs(name="w", base=t(base), tensors=[t(x) for x in tensors],
                               model_params=[{} for _ in tensors], global_params=g))


def same(a: torch.Tensor, b: list[float]) -> bool:
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=1e-6)


# task vectors (1, 0.5, 0, 2) and (3, 0, 0, -2): entries 0 and 3 shared, 1 unique to the first
BASE = [1.0, 1.0, 1.0, 1.0]
MODELS = [[2.0, 1.5, 1.0, 3.0], [4.0, 1.0, 1.0, -1.0]]


def test_ram_adds_unique_entries_and_averages_shared_ones():
    out = run("ram", BASE, MODELS, epsilon=0.1)
    assert same(out, [1 + (1 + 3) / 2, 1.5, 1.0, 1.0])


def test_ram_an_entry_at_epsilon_does_not_count():
    # the first model's 0.25 is not above epsilon: the second's entry is unique there
    out = run("ram", [0.0, 0.0], [[0.25, 0.5], [1.0, 0.5]], epsilon=0.25)
    assert same(out, [1.0, 0.5])


def test_ramplus_tl_scales_each_models_unique_entries():
    # model 1: 2 shared, 1 unique -> rho 2, capped at alpha 1: lambda 1 + 0.5 * 1 = 1.5
    out = run("ramplus_tl", BASE, MODELS, epsilon=0.1, r=0.5, alpha=1.0)
    assert same(out, [3.0, 1.75, 1.0, 1.0])
    # alpha 3 caps nothing: lambda 1 + 0.5 * 2 = 2 on model 1's unique entry
    assert same(run("ramplus_tl", BASE, MODELS, epsilon=0.1, r=0.5, alpha=3.0), [3.0, 2.0, 1.0, 1.0])
    # r 0 is RAM
    assert torch.equal(run("ramplus_tl", BASE, MODELS, epsilon=0.1, r=0.0),
                       run("ram", BASE, MODELS, epsilon=0.1))


def test_ramplus_tl_counts_over_the_whole_tensor_not_the_chunk():
    from workers.sparsify import Workspace
    from workers.tensor_merge import TensorInputs, merge_into

    g = torch.Generator().manual_seed(7)
    base = torch.randn(37, 29, generator=g)
    # the first model moves the top rows far, the second the bottom rows: the counts of a
    # chunk differ from the whole tensor's
    tensors = [base + 0.1 * torch.randn(37, 29, generator=g) * (1 + 3 * (torch.arange(37) < k)[:, None])
               for k in (10, 30)]
    params = {"epsilon": 0.1, "r": 0.8, "alpha": 1.5}

    def merged(rows: int) -> torch.Tensor:
        inputs = TensorInputs(name="w", shape=(37, 29), base=base, tensors=tensors, model_params=[{}, {}],
                              global_params=params, chunk_elements=rows * 29)
        out = torch.empty(37, 29)
        return merge_into(methods.get("ramplus_tl"), inputs, out, out_dtype=torch.float32, ws=Workspace())

    whole = methods.get("ramplus_tl").merge(MergeInputs(
        name="w", base=base, tensors=[t.clone() for t in tensors], model_params=[{}, {}],
        global_params=params))
    assert not torch.equal(whole, methods.get("ram").merge(MergeInputs(
        name="w", base=base, tensors=[t.clone() for t in tensors], model_params=[{}, {}],
        global_params=params)))
    for rows in (1, 3, 37):
        assert torch.equal(merged(rows), whole), rows


def test_ram_needs_a_base():
    with pytest.raises(MergeError, match="base_model"):
        methods.get("ram").merge(MergeInputs(name="w", base=None, tensors=[torch.ones(2)],
                                             model_params=[{}], global_params={"epsilon": 0.0}))


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_a_decoded_recipe_merges_and_round_trips_through_mergekit_yaml(family, tmp_path, method):
    from workers.merge import merge

    base, experts = family("qwen2")
    space = build_space({"kind": "parameter", "method": method, "base_model": str(base),
                         "models": [str(e) for e in experts], "num_layers": 2,
                         "module_filters": ["attention"], "parameters": {"epsilon": 0.02}
                         if method == "ramplus_tl" else {}})
    searched = {"ram": {"epsilon"}, "ramplus_tl": {"r", "alpha"}}[method]
    assert {g.meta["param"] for g in space.genes} == searched
    recipe = space.decode(space.genes.denormalize([0.3] * space.dimension))
    assert recipe.merge_method == method
    result = merge(recipe, tmp_path / "out")
    assert result.tensors == len(LazyModel(str(base)).tensors)
    again = Recipe.from_dict(yaml.safe_load(to_mergekit_yaml(recipe)))
    assert again.model_dump(exclude={"seed"}) == recipe.model_dump(exclude={"seed"})


def test_evomerge_methods_lists_both(capsys):
    from service.cli_engine import cmd_methods

    assert cmd_methods(argparse.Namespace()) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "[epsilon]" in lines["ram"]
    assert "[r, alpha, epsilon]" in lines["ramplus_tl"]


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
def test_every_tier_scores_what_is_written(family, tmp_path, method):
    """The candidate built in memory (bf16 sources, each memory tier) equals the merged
    model written to disk, bit for bit."""
    from transformers import AutoModelForCausalLM

    from workers.candidate import CandidateBuilder
    from workers.merge import merge

    base, experts = family("llama", dtype=torch.bfloat16)
    params = {"ram": {"epsilon": [0.005, 0.02]}, "ramplus_tl": {"epsilon": 0.015, "r": 0.8, "alpha": 1.3}}
    recipe = Recipe.from_dict({"merge_method": method, "base_model": str(base),
                               "models": [{"model": str(e)} for e in experts], "parameters": params[method]})
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    merge(recipe, tmp_path / "out")
    with torch.no_grad():
        written = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.bfloat16)
        want = written.eval()(ids).logits
        for tier in ("resident", "streamed", "mapped"):
            builder = CandidateBuilder([str(base), *map(str, experts)], base=str(base), tier=tier)
            got = builder.build(recipe)(ids).logits
            assert torch.equal(got, want), (tier, (got.float() - want.float()).abs().max())
