"""Parity of the spherical methods ``nuslerp``, ``multislerp`` and ``karcher`` with
mergekit 0.1.5 itself, on tiny Llama and Qwen2 models (Qwen2's attention has biases):
mergekit runs the YAML evomerge writes, and every weight is compared.

evomerge finds each tensor's coefficients from the inputs' Gram matrix in float64 and
combines the inputs in float32 chunks (workers/methods/spherical.py); mergekit works on
the whole float32 tensors. The two agree to float32 rounding (the default tolerance of
``assert_same_weights``). Karcher's per-model ``weight`` is evomerge's addition: equal
weights are written out (as no weights), other weights are checked against mergekit's
own weighted ``karcher_merge_tensors``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from search_spaces.mergekit_format import NotExpressible, to_mergekit_dict
from search_spaces.recipe import Recipe
from search_spaces.registry import build_space
from tests.test_mergekit_parity import assert_same_weights, run_mergekit
from workers.merge import merge
from workers.model_io import LazyModel

mergekit = pytest.importorskip("mergekit", reason="mergekit is in the dev extras")

ARCHS = ["llama", "qwen2"]


def _m(model: str, weight: object) -> dict:
    return {"model": model, "parameters": {"weight": weight}}


def _recipes(base: Path, e: list[Path]) -> dict[str, dict]:
    b, e0, e1, e2 = str(base), str(e[0]), str(e[1]), str(e[2])
    return {
        "nuslerp_task_vectors": {
            "merge_method": "nuslerp", "base_model": b,
            "models": [{"model": e0, "parameters": {"weight": [0.2, 0.9]}},
                       {"model": e1, "parameters": {"weight": [{"filter": "self_attn", "value": 0.3},
                                                               {"value": 0.7}]}}]},
        "nuslerp_rows": {
            "merge_method": "nuslerp",
            "models": [_m(e0, 0.3), _m(e1, 1.1)],
            "parameters": {"nuslerp_flatten": False}},
        "nuslerp_columns_task_vectors": {
            "merge_method": "nuslerp", "base_model": b,
            "models": [_m(e1, 0.6), _m(e2, 0.25)],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "nuslerp_extrapolated": {  # t = -0.4 / 1.1: outside [0, 1]
            "merge_method": "nuslerp",
            "models": [_m(e2, 1.5), _m(e0, -0.4)]},
        "multislerp_task_vectors": {
            "merge_method": "multislerp", "base_model": b,
            "models": [_m(e0, [0.5, 1.2]), _m(e1, 0.3), _m(e2, 0.9)]},
        "multislerp_models_unnormalised": {
            "merge_method": "multislerp",
            "models": [_m(e0, 0.4), _m(e1, 0.3), _m(b, 0.2)],
            "parameters": {"normalize_weights": False, "eps": 1e-6}},
        "multislerp_two": {
            "merge_method": "multislerp", "base_model": b,
            "models": [_m(e2, 0.8), _m(e1, 0.1)]},
        "multislerp_one": {  # one model: mergekit returns it as it is
            "merge_method": "multislerp", "base_model": b, "models": [_m(e2, 0.7)]},
        "karcher": {"merge_method": "karcher", "models": [{"model": e0}, {"model": e1}, {"model": e2}]},
        "karcher_base_listed": {
            "merge_method": "karcher", "models": [{"model": b}, {"model": e0}, {"model": e1}],
            "parameters": {"max_iter": 3, "tol": 1e-7}},
        "karcher_equal_weights_unlisted_base": {  # the weights are left out, and the base
            "merge_method": "karcher", "base_model": b,
            "models": [_m(e0, 0.5), _m(e2, 0.5)]},
    }


CASES = sorted(_recipes(Path("b"), [Path("x"), Path("y"), Path("z")]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_same_weights_as_mergekit(family, tmp_path, arch, case):
    base, experts = family(arch, 3)
    recipe = Recipe.from_dict(_recipes(base, experts)[case])
    merge(recipe, tmp_path / "ours")
    run_mergekit(yaml.safe_load(yaml.safe_dump(to_mergekit_dict(recipe))), tmp_path / "theirs")
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs")


@pytest.mark.parametrize("arch", ARCHS)
def test_in_small_chunks_same_weights_as_mergekit(family, tmp_path, monkeypatch, arch):
    """The Gram pass and the combination, a few rows at a time."""
    import workers.methods.spherical
    import workers.tensor_merge

    monkeypatch.setattr(workers.methods.spherical, "EAGER_CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(workers.tensor_merge, "CHUNK_ELEMENTS", 150)
    base, experts = family(arch, 3)
    for case in ("nuslerp_columns_task_vectors", "nuslerp_rows", "multislerp_task_vectors", "karcher"):
        recipe = Recipe.from_dict(_recipes(base, experts)[case])
        merge(recipe, tmp_path / case / "ours")
        run_mergekit(to_mergekit_dict(recipe), tmp_path / case / "theirs")
        assert_same_weights(tmp_path / case / "ours", tmp_path / case / "theirs")


def _weighted_karcher(paths: list[Path], alphas: list[float], **options) -> dict[str, torch.Tensor]:
    """mergekit's own weighted Karcher mean (the function its ``karcher`` calls with equal
    weights), tensor by tensor."""
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    models = [LazyModel(str(p)) for p in paths]
    return {name: karcher_merge_tensors([m.get(name).float() for m in models], alphas, **options)
            for name in models[0].tensors}


@pytest.mark.parametrize("arch", ARCHS)
def test_weighted_karcher_is_mergekits_weighted_karcher(family, tmp_path, arch):
    """evomerge's ``weight`` (normalised) is mergekit's ``alphas``; such a recipe has no
    mergekit YAML."""
    _, experts = family(arch, 3)
    weights = [0.2, 1.0, 0.5]
    recipe = Recipe.from_dict({
        "merge_method": "karcher", "parameters": {"max_iter": 20},
        "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(experts, weights)]})
    with pytest.raises(NotExpressible, match="equally"):
        to_mergekit_dict(recipe)
    merge(recipe, tmp_path / "ours")
    ours = LazyModel(str(tmp_path / "ours"))
    want = _weighted_karcher(experts, [w / sum(weights) for w in weights], max_iter=20)
    assert set(ours.tensors) == set(want)
    for name, tensor in want.items():
        assert torch.allclose(ours.get(name), tensor, atol=1e-6, rtol=1e-5), name


# ---- searched: a parameter space of each method, decoded and merged ----------------------
def _space(method: str, base: Path, experts: list[Path], with_base: bool):
    """Per layer and model, attention apart (by a name substring: mergekit's filters are
    substrings, evomerge's categories such as ``attention`` are not mergekit's)."""
    models = experts[:2] if method == "nuslerp" else experts
    return build_space({"kind": "parameter", "method": method, "base_model": str(base) if with_base else None,
                        "models": [str(e) for e in models], "num_layers": 2, "granularity": 1,
                        "module_filters": ["self_attn"], "embedding_genes": False})


@pytest.mark.parametrize(("method", "with_base"), [("nuslerp", True), ("nuslerp", False),
                                                   ("multislerp", True), ("karcher", False)])
def test_a_searched_recipe_merges_as_mergekit_does(family, tmp_path, method, with_base):
    """A point of the parameter space (per layer group, attention apart) decodes to a recipe
    that evomerge merges as mergekit merges the YAML evomerge writes for it."""
    base, experts = family("qwen2", 3)
    space = _space(method, base, experts, with_base)
    assert {g.meta["param"] for g in space.genes} == {"weight"}
    z = [0.15 + (i * 0.37) % 0.8 for i in range(space.dimension)]
    points = [space.genes.denormalize(z)]
    if method == "karcher":  # its start, equal weights, is mergekit's karcher
        points = [space.start()]
    for k, point in enumerate(points):
        recipe = space.decode(point)
        merge(recipe, tmp_path / f"ours{k}")
        run_mergekit(to_mergekit_dict(recipe), tmp_path / f"theirs{k}")
        assert_same_weights(tmp_path / f"ours{k}", tmp_path / f"theirs{k}")


def test_a_searched_weighted_karcher_is_mergekits_weighted_karcher(family, tmp_path):
    """A point away from the start weighs the models differently in each layer group: each
    tensor is mergekit's weighted Karcher mean with that tensor's weights."""
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    from workers.plan import build_plan

    base, experts = family("llama", 3)
    space = _space("karcher", base, experts, with_base=True)  # the study's base is not merged
    recipe = space.decode(space.genes.denormalize([(0.2 + i * 0.37) % 1 for i in range(space.dimension)]))
    with pytest.raises(NotExpressible):
        to_mergekit_dict(recipe)
    merge(recipe, tmp_path / "ours")
    ours = LazyModel(str(tmp_path / "ours"))
    sources = {str(p): LazyModel(str(p)) for p in experts}
    distinct = set()
    for task in build_plan(recipe).tasks:
        weights = [p["weight"] for p in task.model_params]
        distinct.add(tuple(weights))
        alphas = [w / sum(weights) for w in weights]
        want = karcher_merge_tensors([sources[s.model].get(s.name).float() for s in task.inputs], alphas)
        assert torch.allclose(ours.get(task.name), want, atol=1e-6, rtol=1e-5), task.name
    assert len(distinct) > 3 and len(task.inputs) == 3
