"""Parity with mergekit 0.1.5 for SCE, Arcee Fusion and NearSwap: the same recipe on the
same tiny models (Llama, and Qwen2 with its attention biases) gives the same weights;
the YAML evomerge writes is what mergekit runs. Tensors bigger than mergekit's sampling
limit are checked against its functions (SCE) or an exact sort (Arcee Fusion)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from search_spaces.mergekit_format import to_mergekit_dict, to_mergekit_yaml
from search_spaces.recipe import Recipe
from search_spaces.registry import build_space
from tests.test_mergekit_parity import assert_same_weights, run_mergekit
from workers import methods
from workers.merge import merge
from workers.methods.base import MergeInputs
from workers.order_statistics import WHOLE, Selection
from workers.sparsify import Workspace
from workers.tensor_merge import TensorInputs, merge_into

pytest.importorskip("mergekit", reason="mergekit is in the dev extras")


def _recipes(base: Path, e: list[Path]) -> dict[str, dict]:
    b, e0, e1 = str(base), str(e[0]), str(e[1])
    return {
        "sce": {
            "merge_method": "sce", "base_model": b,
            "models": [{"model": e0}, {"model": e1}],
            "parameters": {"select_topk": [0.2, 0.7]},
        },
        "sce_filtered": {
            "merge_method": "sce", "base_model": b,
            "models": [{"model": e0}, {"model": e1}],
            "parameters": {"select_topk": [{"filter": "mlp", "value": 0.05}, {"value": 0.5}],
                           "int8_mask": True},
        },
        "sce_all_entries": {
            "merge_method": "sce", "base_model": b,
            "models": [{"model": e0}, {"model": e1}],
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion", "base_model": b,
            "models": [{"model": e0}],
        },
        "nearswap": {
            "merge_method": "nearswap", "base_model": b,
            "models": [{"model": e1}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0.002, 0.03]}, {"value": 0.01}]},
        },
    }


CASES = sorted(_recipes(Path("b"), [Path("x"), Path("y")]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_weights_as_mergekit(family, tmp_path, arch, case):
    base, experts = family(arch, 2)
    recipe = Recipe.from_dict(_recipes(base, experts)[case])
    merge(recipe, tmp_path / "ours")
    run_mergekit(yaml.safe_load(to_mergekit_yaml(recipe)), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_sce_of_three_models_same_as_mergekit(family, tmp_path, arch):
    base, experts = family(arch, 3)
    recipe = Recipe.from_dict({
        "merge_method": "sce", "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {"select_topk": [0.6, 0.1]}})
    merge(recipe, tmp_path / "ours")
    run_mergekit(yaml.safe_load(to_mergekit_yaml(recipe)), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("method", ["sce", "nearswap"])
def test_a_searched_recipe_merges_as_mergekit_merges_it(family, tmp_path, method):
    """The continuous parameter has genes; a decoded point is a recipe that merges, is
    written as mergekit YAML, reads back as the same recipe, and mergekit agrees."""
    base, experts = family("qwen2", 2)
    used = experts if method == "sce" else experts[:1]
    extra = {"t_range": [0.0, 0.05]} if method == "nearswap" else {}  # where NearSwap does something
    space = build_space({"kind": "parameter", "method": method, "base_model": str(base),
                         "models": [str(e) for e in used], "num_layers": 2, "granularity": 1,
                         # mergekit reads a filter as a substring of the tensor name: evomerge's
                         # categories (attention, embeddings) would mean something else there
                         "module_filters": ["self_attn"], "embedding_genes": False, **extra})
    param = "select_topk" if method == "sce" else "t"
    assert {g.meta["param"] for g in space.genes} == {param}
    if method == "nearswap":  # a search starts where NearSwap takes some entries, not all
        assert all(space.genes[n].value(c) == pytest.approx(0.001) for n, c in space.start().items())
    z = [0.15 + 0.7 * ((i * 0.37) % 1) for i in range(space.dimension)]
    recipe = space.decode(space.genes.denormalize(z))
    written = to_mergekit_dict(recipe)
    assert Recipe.from_dict({**written, "seed": recipe.seed}) == recipe
    merge(recipe, tmp_path / "ours")
    run_mergekit(yaml.safe_load(yaml.safe_dump(written)), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs")


# ---- tensors bigger than mergekit's sampling limit, a chunk at a time --------------------
SHAPE = (1100, 1000)  # 1.1M entries: above WHOLE, so quantiles come from sample and band


def _big(n_models: int, seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(SHAPE, generator=g) * 0.05
    return base, [base + 0.01 * torch.randn(SHAPE, generator=g) for _ in range(n_models)]


def _chunked(method: str, base: torch.Tensor, tensors: list[torch.Tensor],
             global_params: dict) -> torch.Tensor:
    assert base.numel() > WHOLE
    inputs = TensorInputs(name="model.layers.0.mlp.up_proj.weight", shape=tuple(base.shape), base=base,
                          tensors=tensors, model_params=[{} for _ in tensors], global_params=global_params,
                          chunk_elements=97 * SHAPE[1])
    out = torch.empty(SHAPE)
    return merge_into(methods.get(method), inputs, out, out_dtype=torch.float32, ws=Workspace())


def test_selection_finds_exact_order_statistics_chunk_by_chunk():
    g = torch.Generator().manual_seed(3)
    values = torch.cat([torch.randn(900_000, generator=g), torch.full((400_000,), 0.25)])
    values = values[torch.randperm(values.numel(), generator=g)]
    ranks = [0, 1000, 650_000, 700_000, values.numel() - 1]
    chunks = values.split(123_457)
    selection = Selection(values.numel())
    for c in chunks:
        selection.sample(c)
    selection.select(ranks)
    assert selection.needs_pass
    for c in chunks:
        selection.band(c)
    got = selection.finish(lambda: values)
    ordered = torch.sort(values).values
    assert [float(v) for v in got] == [float(ordered[r]) for r in ranks]


@pytest.mark.parametrize("select_topk", [0.3, 0.9])
def test_sce_of_a_big_tensor_equals_mergekit(select_topk):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.sce import sce_merge

    base, tensors = _big(3)
    want = sce_merge.implementation(TensorGroup.from_tensors([base, *tensors], base_index=0),
                                    select_topk=select_topk)
    got = _chunked("sce", base, tensors, {"select_topk": select_topk, "int8_mask": False})
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (got - want).abs().max()
    assert (got != base).float().mean() > select_topk * 0.5


def test_arcee_fusion_of_a_big_tensor_takes_exact_quantiles():
    """Above 1M entries mergekit estimates the quantiles from entries drawn with the
    unseeded global RNG; evomerge's are exact: the reference sorts every importance."""
    from mergekit.merge_methods.arcee_fusion import _compute_importance

    base, (other,) = _big(1)
    imp = _compute_importance(other, base)
    ordered = torch.sort(imp.reshape(-1)).values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    want = base + (other - base) * (imp >= median + 1.5 * (q3 - q1)).float()
    got = _chunked("arcee_fusion", base, [other], {})
    assert torch.equal(got, want)
    assert 0 < (got != base).float().mean() < 0.5
    direct = methods.get("arcee_fusion").merge(MergeInputs(name="w", base=base, tensors=[other],
                                                           model_params=[{}], global_params={}))
    assert torch.equal(direct, want)


def test_evomerge_methods_lists_the_three(capsys):
    import argparse

    from service.cli_engine import cmd_methods

    assert cmd_methods(argparse.Namespace()) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "[select_topk, int8_mask]" in lines["sce"]
    assert lines["arcee_fusion"].endswith("[]")
    assert "[t]" in lines["nearswap"]


@pytest.mark.parametrize("method,params,n,match", [
    ("nearswap", {"t": 0.01}, 2, "exactly 1"),
    ("arcee_fusion", {}, 2, "exactly 1"),
    ("nearswap", {}, 1, "'t' is missing"),
    ("sce", {"select_topk": 1.5}, 2, "above the maximum"),
])
def test_bad_recipes_are_refused_before_merging(family, tmp_path, method, params, n, match):
    from workers.methods.base import MergeError

    base, experts = family("llama", 2)
    recipe = Recipe.from_dict({"merge_method": method, "base_model": str(base), "parameters": params,
                               "models": [{"model": str(e)} for e in experts[:n]]})
    with pytest.raises(MergeError, match=match):
        merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_candidates_in_small_chunks_and_from_cached_task_vectors_are_the_same(family, monkeypatch):
    """A worker's candidate (bf16 sources, resident) equals the candidate merged in
    chunks of a few rows from mapped sources, and SCE's from cached task vectors."""
    import workers.tensor_merge as tm
    from tests.test_candidate import memory_logits, ps_recipe
    from workers.candidate import CandidateBuilder

    base, experts = family("llama", dtype=torch.bfloat16)
    refs = [str(base), *map(str, experts)]
    recipes = [ps_recipe(m, base, experts) for m in ("sce", "arcee_fusion", "nearswap")]
    whole = [memory_logits(CandidateBuilder(refs, base=str(base)).build(r)) for r in recipes]
    cached = CandidateBuilder(refs, base=str(base), cache_task_vectors=True)
    assert torch.equal(memory_logits(cached.build(recipes[0])), whole[0])
    assert cached.memory_bytes()["task_vectors"] > 0
    monkeypatch.setattr(tm, "EAGER_CHUNK_ELEMENTS", 100)
    chunked = CandidateBuilder(refs, base=str(base), tier="mapped")
    for recipe, want in zip(recipes, whole):
        assert torch.equal(memory_logits(chunked.build(recipe)), want), recipe.merge_method


@pytest.mark.parametrize("case", ["drop_all", "keep_one", "tiny_deltas", "identical_models", "one_model",
                                  "bias"])
def test_sce_edge_cases_equal_mergekit(case):
    """Called directly on one tensor: no entry kept, one kept, weights from deltas so small
    their mean squares vanish (equal weights), models that do not vary (nothing selected),
    a single model, a 1-D tensor."""
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.sce import sce_merge

    g = torch.Generator().manual_seed(11)
    shape = (29,) if case == "bias" else (37, 29)
    base = torch.randn(shape, generator=g)
    scale = 1e-5 if case == "tiny_deltas" else 0.02
    tensors = [base + scale * torch.randn(shape, generator=g) for _ in range(1 if case == "one_model" else 3)]
    if case == "identical_models":
        tensors = [tensors[0].clone() for _ in tensors]
    topk = {"drop_all": 0.0, "keep_one": 1.5 / base.numel()}.get(case, 0.4)
    group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    want = sce_merge.implementation(group, select_topk=topk)
    got = methods.get("sce").merge(MergeInputs(
        name="w", base=base, tensors=tensors, model_params=[{}] * len(tensors),
        global_params={"select_topk": topk, "int8_mask": False}))
    assert torch.allclose(got, want, atol=1e-7, rtol=1e-6), (got - want).abs().max()
    if case == "keep_one":
        assert int((got != base).sum()) == 1
