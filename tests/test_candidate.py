"""Candidates built in memory equal `evomerge merge` written to disk and reloaded with
transformers — for every parameter-space method and for stacking with scales."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from search_spaces import merge_methods
from search_spaces.recipe import Recipe
from workers.candidate import CandidateBuilder
from workers.merge import merge

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]])

PS = {
    "linear": ({"weight": 0.6}, {}),
    "task_arithmetic": ({"weight": [0.8, 1.3]}, {"lambda": 0.9}),
    "ties": ({"weight": 1.0, "density": [0.3, 0.7]}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_linear": ({"weight": 0.7, "density": 0.5}, {"rescale_mode": "inverse_density"}),
    "breadcrumbs": ({"weight": 1.0, "density": 0.6, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"rescale": True}),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {"rescale_mode": "inverse_density"}),
    "slerp": ({}, {"t": [0.2, 0.8]}),
    "model_stock": ({}, {}),
    "sce": ({}, {"select_topk": [0.3, 0.8]}),
    "arcee_fusion": ({}, {}),
    "nearswap": ({}, {"t": 0.01}),
    "nuslerp": ({"weight": [0.3, 0.8]}, {"nuslerp_flatten": False}),
    "multislerp": ({"weight": [0.3, 0.8]}, {}),
    "karcher": ({"weight": 0.7}, {"max_iter": 5}),
}


def ps_recipe(method: str, base: Path, experts: list[Path]) -> Recipe:
    per_model, global_params = PS[method]
    used = experts[:1] if merge_methods.get(method).exactly_one_model else experts
    models = [{"model": str(e), "parameters": dict(per_model)} for e in used]
    if method == "linear":
        models.append({"model": str(base), "parameters": {"weight": 0.4}})
    return Recipe.from_dict({"merge_method": method, "base_model": str(base), "models": models,
                             "parameters": global_params, "seed": 11})


def disk_logits(recipe: Recipe, out: Path) -> torch.Tensor:
    merge(recipe, out)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits


def memory_logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def llama_builder(family):
    base, experts = family("llama")
    return base, experts, CandidateBuilder([str(e) for e in experts], base=str(base))


@pytest.mark.parametrize("method", sorted(PS))
def test_parameter_space_candidate_equals_disk_merge(llama_builder, tmp_path, method):
    base, experts, builder = llama_builder
    recipe = ps_recipe(method, base, experts)
    got = memory_logits(builder.build(recipe))
    want = disk_logits(recipe, tmp_path / "out")
    assert torch.equal(got, want), (got - want).abs().max()


@pytest.mark.parametrize("arch", ["qwen2", "gemma2", "gpt2"])
def test_other_architectures_candidate_equals_disk_merge(family, tmp_path, arch):
    base, experts = family(arch)
    builder = CandidateBuilder([str(e) for e in experts], base=str(base))
    for method in ("ties", "dare_ties"):
        recipe = ps_recipe(method, base, experts)
        assert torch.equal(memory_logits(builder.build(recipe)), disk_logits(recipe, tmp_path / method))


def test_resident_model_is_updated_in_place(llama_builder):
    base, experts, builder = llama_builder
    first = builder.build(ps_recipe("ties", base, experts))
    ptrs = {n: p.data_ptr() for n, p in first.named_parameters()}
    before = first.model.layers[0].mlp.up_proj.weight.clone()
    second = builder.build(ps_recipe("task_arithmetic", base, experts))
    assert second is first
    assert {n: p.data_ptr() for n, p in second.named_parameters()} == ptrs
    assert not torch.equal(before, second.model.layers[0].mlp.up_proj.weight)


def stacking(arch_base: Path, experts: list[Path], n: int, base_model: bool) -> Recipe:
    data = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(experts[0]), "layer_range": [0, n]}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [n - 1, n], "scale": 0.6}]},
            {"sources": [{"model": str(experts[0]), "layer_range": [0, 1], "scale": 1.4}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [0, 1]}]},
        ],
    }
    if base_model:
        data["base_model"] = str(arch_base)
    return Recipe.from_dict(data)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_stacking_candidate_with_scales_equals_disk_merge(family, tmp_path, arch):
    base, experts = family(arch)
    builder = CandidateBuilder([str(e) for e in experts], base=str(base))
    from workers.model_io import LazyModel

    config = LazyModel(str(base)).config
    n = config.get("num_hidden_layers") or config["n_layer"]
    for with_base in (False, True):
        recipe = stacking(base, experts, n, with_base)
        got = memory_logits(builder.build(recipe))
        want = disk_logits(recipe, tmp_path / f"stack{with_base}")
        assert torch.equal(got, want), (arch, with_base, (got - want).abs().max())


def test_stacking_shares_unscaled_layers_with_the_sources(llama_builder):
    base, experts, builder = llama_builder
    model = builder.build(stacking(base, experts, 2, False))
    src = builder.sources.tensors[(str(experts[0]), "model.layers.1.self_attn.q_proj.weight")]
    assert model.model.layers[1].self_attn.q_proj.weight.data_ptr() == src.data_ptr()
    scaled = builder.sources.tensors[(str(experts[1]), "model.layers.1.self_attn.o_proj.weight")]
    assert model.model.layers[2].self_attn.o_proj.weight.data_ptr() != scaled.data_ptr()
    # every output layer is its own module (its own KV-cache index) even when repeated
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3, 4]


def test_generation_with_kv_cache_on_a_repeated_stack(llama_builder):
    _, experts, builder = llama_builder
    recipe = Recipe.from_dict({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(experts[0]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(experts[0]), "layer_range": [0, 2]}]}],
    })
    model = builder.build(recipe)
    out = model.generate(IDS[:1], max_new_tokens=5, do_sample=False, pad_token_id=0)
    # greedy decoding with the cache equals recomputing the whole sequence each step
    ids = IDS[:1]
    with torch.no_grad():
        for _ in range(5):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)


def test_nan_candidate_is_refused(llama_builder):
    """A source that turns NaN after it was checked still cannot reach a score: the
    merged tensor is checked as it is written."""
    base, experts, builder = llama_builder
    recipe = ps_recipe("task_arithmetic", base, experts)
    builder.build(recipe)
    key = (str(experts[0]), "model.layers.0.mlp.up_proj.weight")
    source = builder.sources.tensors[key]
    saved = source.clone()
    try:
        source[0, 0] = float("nan")
        from workers.methods.base import MergeError

        with pytest.raises(MergeError, match=r"NaN or inf in tensor model\.layers\.0\.mlp\.up_proj\.weight"):
            builder.build(recipe)
    finally:
        source.copy_(saved)


def test_a_nan_source_is_refused_on_first_use(family, tmp_path):
    from safetensors.torch import load_file, save_file

    from workers.methods.base import MergeError

    base, experts = family("llama")
    poisoned = tmp_path / "poisoned"
    import shutil

    shutil.copytree(experts[0], poisoned)
    state = load_file(str(poisoned / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(poisoned / "model.safetensors"), metadata={"format": "pt"})
    for tier in ("resident", "mapped"):
        builder = CandidateBuilder([str(poisoned), str(experts[1])], base=str(base), tier=tier)
        with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight: contains NaN"):
            builder.build(ps_recipe("task_arithmetic", base, [poisoned, experts[1]]))
