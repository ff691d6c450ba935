"""Sources in their own dtype, in every memory tier: the candidate scored in memory
equals the merged model written to disk and loaded in the candidate's dtype, bit for
bit, for every method and for stacking, across architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from search_spaces.recipe import Recipe
from tests.test_candidate import PS, ps_recipe
from workers.candidate import CandidateBuilder
from workers.merge import merge

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]])
TIERS = ("resident", "streamed", "mapped")

def stacking(experts: list[Path], n: int) -> Recipe:
    return Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(experts[0]), "layer_range": [0, n]}]},
        {"sources": [{"model": str(experts[1]), "layer_range": [n - 1, n], "scale": 0.6}]},
        {"sources": [{"model": str(experts[0]), "layer_range": [0, 1], "scale": 1.4}]},
    ]})


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def disk_logits(recipe: Recipe, out: Path, dtype: torch.dtype) -> torch.Tensor:
    merge(recipe, out)
    return logits(AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype).eval())


@pytest.fixture(scope="module")
def bf16_llama(family):
    return family("llama", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def builders(bf16_llama):
    base, experts = bf16_llama
    refs = [str(base), *map(str, experts)]
    return {tier: CandidateBuilder(refs, base=str(base), tier=tier) for tier in TIERS}


@pytest.mark.parametrize("method", [*sorted(PS), "stacking"])
def test_every_tier_scores_what_is_written(bf16_llama, builders, tmp_path, method):
    base, experts = bf16_llama
    recipe = stacking(experts, 2) if method == "stacking" else ps_recipe(method, base, experts)
    want = disk_logits(recipe, tmp_path / "out", torch.bfloat16)
    for tier, builder in builders.items():
        model = builder.build(recipe)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, tier
        got = logits(model)
        assert torch.equal(got, want), (tier, (got.float() - want.float()).abs().max())


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma2"])
def test_other_architectures_in_bf16(family, tmp_path, arch):
    """Mistral (grouped-query attention), Qwen2 (attention biases), Gemma 2 (tied
    head, (1 + w) norms scaled by stacking)."""
    base, experts = family(arch, dtype=torch.bfloat16)
    refs = [str(base), *map(str, experts)]
    for tier in ("resident", "mapped"):
        builder = CandidateBuilder(refs, base=str(base), tier=tier)
        for method in ("ties", "dare_ties", "stacking"):
            recipe = stacking(experts, 2) if method == "stacking" else ps_recipe(method, base, experts)
            want = disk_logits(recipe, tmp_path / f"{tier}-{method}", torch.bfloat16)
            assert torch.equal(logits(builder.build(recipe)), want), (arch, tier, method)


def test_a_float32_candidate_holds_the_written_models_values(bf16_llama, tmp_path):
    """``worker.dtype: float32``: the candidate keeps float32 parameters, rounded as the
    written bf16 model is, so it computes what that model loaded in float32 computes."""
    base, experts = bf16_llama
    builder = CandidateBuilder([str(base), *map(str, experts)], base=str(base), dtype="float32")
    for recipe in (ps_recipe("ties", base, experts), stacking(experts, 2)):
        model = builder.build(recipe)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert torch.equal(logits(model), disk_logits(recipe, tmp_path / recipe.merge_method, torch.float32))


def test_sources_stay_in_their_dtype_and_nothing_full_size_is_derived(bf16_llama, builders):
    base, experts = bf16_llama
    builder = builders["resident"]
    builder.build(ps_recipe("ties", base, experts))
    assert {t.dtype for t in builder.sources.tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    held = builder.memory_bytes()
    sources = sum(t.numel() * t.element_size() for t in builder.sources.tensors.values())
    assert held["sources_host"] == sources and held["task_vectors"] == 0
    base_bytes = sum(t.numel() * t.element_size() for (ref, _), t in builder.sources.tensors.items()
                     if ref == str(base))
    assert held["candidate"] == base_bytes  # one model, in the sources' dtype
    # the workspace is a few chunks of float32 (and the bands of a trim), not copies of tensors
    from workers.memory_plan import CHUNK_ELEMENTS

    assert held["scratch"] <= 24 * CHUNK_ELEMENTS * 4
    mapped = builders["mapped"].memory_bytes()
    assert mapped["sources_host"] == 0 and mapped["sources_device"] == 0


def test_cached_task_vectors_give_the_same_candidate(bf16_llama, builders):
    base, experts = bf16_llama
    cached = CandidateBuilder([str(base), *map(str, experts)], base=str(base), cache_task_vectors=True)
    for method in ("ties", "dare_ties", "della", "task_arithmetic"):
        recipe = ps_recipe(method, base, experts)
        want = logits(builders["resident"].build(recipe))
        assert torch.equal(logits(cached.build(recipe)), want), method
    assert cached.memory_bytes()["task_vectors"] > 0


def test_tensors_larger_than_a_chunk_merge_exactly(family, tmp_path, monkeypatch):
    """Chunk boundaries inside a tensor (small chunks here) change nothing: trimming
    windows, tied magnitudes and random draws carry across chunks."""
    import workers.tensor_merge as tm

    base, experts = family("llama", dtype=torch.bfloat16)
    refs = [str(base), *map(str, experts)]
    recipes = [ps_recipe(m, base, experts) for m in ("ties", "breadcrumbs_ties", "dare_ties", "della")]
    whole = [logits(CandidateBuilder(refs, base=str(base)).build(r)) for r in recipes]
    monkeypatch.setattr(tm, "CHUNK_ELEMENTS", 100)
    chunked = CandidateBuilder(refs, base=str(base), tier="mapped")
    for recipe, want in zip(recipes, whole):
        assert torch.equal(logits(chunked.build(recipe)), want), recipe.merge_method


def test_large_tensors_use_the_histogram_and_still_merge_exactly(tmp_path_factory):
    """Tensors above 262,144 entries find their trimming thresholds through the exact
    magnitude histogram (bins of one value read off it; others gathered from the
    chunks): still the engine's masks, in every tier."""
    from workers.model_io import LazyModel
    from workers.synthetic import make_family

    for noise in (0.02, 0.0005):  # small noise: bf16 task vectors of few values, huge ties
        root = tmp_path_factory.mktemp("wide")
        base, experts = make_family("llama", root, 2, dtype=torch.bfloat16, hidden=512, layers=1,
                                    intermediate=1024, heads=8, noise=noise)
        refs = [str(base), *map(str, experts)]
        assert max(i.shape[0] * i.shape[-1] for i in LazyModel(str(base)).tensors.values()) > 262_144
        builders = [CandidateBuilder(refs, base=str(base), tier=t) for t in ("resident", "mapped")]
        for method in ("ties", "breadcrumbs_ties", "dare_ties", "della", "task_arithmetic"):
            recipe = ps_recipe(method, base, experts)
            want = disk_logits(recipe, root / method, torch.bfloat16)
            for builder in builders:
                for _ in range(2):  # the second time with the histograms kept from the first
                    assert torch.equal(logits(builder.build(recipe)), want), (noise, method, builder.tier)


@pytest.mark.parametrize("tier", ["streamed", "mapped"])
def test_big_tensors_are_staged_a_chunk_of_rows_at_a_time(bf16_llama, monkeypatch, tier):
    """A GPU worker that stages its sources hands the merge a tensor above SLICE_ABOVE as
    the host tensor itself (nothing queued for the device, no whole-tensor staging
    buffer); TensorInputs copies its rows chunk by chunk. Here the worker is told it is
    a GPU one (its copies stay on the CPU): the routing, and the merge's result."""
    import workers.sources as sources_module
    from workers.methods import get
    from workers.model_io import LazyModel
    from workers.sparsify import Workspace
    from workers.tensor_merge import TensorInputs, merge_into

    base, experts = bf16_llama
    models = {str(p): LazyModel(str(p)) for p in (base, *experts)}
    monkeypatch.setattr(sources_module, "SLICE_ABOVE", 1_000)
    src = sources_module.open_sources(tier, models, "cpu")
    src.cuda = True  # as a GPU worker routes; its side stream stays None, so copies stay on the CPU
    name = "model.embed_tokens.weight"
    keys = [(str(p), name) for p in (base, *experts)]
    infos = models[str(base)].tensors
    assert infos[name].nbytes > 1_000 > infos["model.norm.weight"].nbytes
    staged = [src.for_merge(k) for k in keys]
    assert not src._ready and all(slot == [None, None] for slot in getattr(src, "_ring", []))
    for key, t in zip(keys, staged):
        assert torch.equal(t, models[key[0]].get(name)) and t.dtype == torch.bfloat16
    if tier == "streamed":  # (the mapped tier would pin a staging buffer: CUDA only)
        small = (str(base), "model.norm.weight")
        src.for_merge(small)
        assert small in src._ready  # a small tensor still goes to the device whole
    params = [{"weight": 0.7, "density": 0.5}, {"weight": 0.4, "density": 0.6}]
    method = get("ties")
    g = {p.name: p.default for p in method.global_params if not p.required}

    def merged(tensors: list[torch.Tensor]) -> torch.Tensor:
        inputs = TensorInputs(name=name, shape=tuple(tensors[0].shape), base=tensors[0], tensors=tensors[1:],
                              model_params=params, global_params=g, chunk_elements=200,
                              device=torch.device("cpu"))
        return merge_into(method, inputs, torch.empty(tensors[0].shape, dtype=torch.bfloat16),
                          out_dtype=torch.bfloat16, ws=Workspace())

    assert torch.equal(merged(staged), merged([models[k[0]].get(name) for k in keys]))
