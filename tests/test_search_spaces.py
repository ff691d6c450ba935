"""Search spaces: every point decodes to a valid recipe, encode inverts decode, DFS
depth constraints hold, labels and errors say the right thing (no weights needed)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from search_spaces import param_values as pv
from search_spaces.base import RecipeNotInSpace
from search_spaces.genes import Gene, GeneSet, InvalidPoint
from search_spaces.layer_stacking import LayerStackingSpace
from search_spaces.parameter_space import METHODS, ParameterSpace
from search_spaces.recipe import Recipe
from search_spaces.registry import build_space, kinds, parse_space_spec, space_spec_type
from search_spaces.sources import StudyRef, parse_placeholder, resolve_sources, study_refs

# the stacking space before the segments encoding became its default: an include bit and a
# scale per slot (what these tests exercise)
DFS0 = {"encoding": "threshold", "scales": {"search": True}}

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def point_from_unit(space, unit: list[float]) -> dict[str, float]:
    """A point of the space from numbers in [0, 1] (one per gene, recycled)."""
    z = [unit[i % len(unit)] for i in range(space.dimension)]
    return space.genes.denormalize(z)


def recipes_close(a: Recipe, b: Recipe, rel: float = 1e-12) -> bool:
    def walk(x, y) -> bool:
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(walk(x[k], y[k]) for k in x)
        if isinstance(x, list) and isinstance(y, list):
            return len(x) == len(y) and all(walk(u, v) for u, v in zip(x, y))
        if isinstance(x, float) or isinstance(y, float):
            return math.isclose(x, y, rel_tol=rel, abs_tol=1e-15)
        return x == y

    return walk(a.to_dict(), b.to_dict())


def resolved(recipe: Recipe, model: str | None, param: str, probe: pv.Probe, num_layers: int):
    """What the engine's rules give ``param`` of ``model`` (None: global) at a probe."""
    entry = next((e for e in recipe.models or [] if e.model == model), None)
    scopes = [entry.parameters if entry else None, recipe.parameters]
    return pv.resolve(param, scopes, probe, pv.position(probe, num_layers))


# ---- parameter space --------------------------------------------------------------------

ps_specs = st.fixed_dictionaries(
    {
        "method": st.sampled_from(sorted(METHODS)),
        "num_layers": st.integers(1, 7),
        "granularity": st.one_of(st.none(), st.integers(1, 8)),
        "module_filters": st.sampled_from([[], ["attention"], ["attention", "mlp"], ["mlp", "self_attn"],
                                           ["gate_proj"]]),
        "embedding_genes": st.booleans(),
        "n_models": st.integers(1, 3),
        "negative": st.booleans(),
    }
)


def make_ps(d: dict) -> ParameterSpace:
    declared = METHODS[d["method"]].declaration  # as many models as the method takes
    n = min(max(d["n_models"], declared.min_models), declared.max_models or d["n_models"])
    spec = {
        "kind": "parameter",
        "method": d["method"],
        "base_model": "org/base",
        "models": [f"/models/expert{i}" for i in range(n)],
        "num_layers": d["num_layers"],
        "granularity": d["granularity"],
        "module_filters": d["module_filters"],
        "embedding_genes": d["embedding_genes"],
    }
    if d["negative"]:
        spec.update(weight_range=(-1.0, 1.5), negative_weights=True)
    return build_space(spec)


@PROPERTY
@given(ps_specs, st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_every_ps_point_decodes_to_a_valid_recipe_and_encodes_back(d, unit):
    space = make_ps(d)
    point = point_from_unit(space, unit)
    recipe = space.decode(point)
    again = Recipe.from_dict(recipe.to_dict())  # the YAML/JSON form validates too
    assert again == recipe
    assert [e.model for e in recipe.models] == [str(m) for m in space.spec.models]
    # every per-layer list has exactly num_layers values (each layer its own value)
    for entry in recipe.models:
        for value in entry.parameters.values():
            items = value if isinstance(value, list) else [value]
            for item in items:
                inner = item.value if hasattr(item, "value") else item
                if isinstance(inner, list):
                    assert len(inner) == d["num_layers"]
    assert space.encode(recipe) == point
    assert space.decode(space.encode(recipe)) == recipe


@PROPERTY
@given(ps_specs, st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_each_tensor_takes_its_own_gene(d, unit):
    """Decoded values land where the labels say, under the engine's resolution rules."""
    space = make_ps(d)
    point = point_from_unit(space, unit)
    values = space.genes.values(point)
    recipe = space.decode(point)
    L = d["num_layers"]
    k = min(d["granularity"] or L, L)
    owners = [None] if not space.searched_model_params else [str(m) for m in space.spec.models]
    for mi, model in enumerate(owners):
        for param in (METHODS[d["method"]].global_params if model is None else space.searched_model_params):
            prefix = "" if model is None else "ABC"[mi] + "."
            for probe in pv.probes(L):
                got = resolved(recipe, model, param, probe, L)
                if probe.layer is None and d["embedding_genes"]:
                    name = f"{prefix}emb.{param}"
                else:
                    layer = probe.layer or 0
                    a = (layer // k) * k
                    b = min(a + k, L) - 1
                    group = "all" if k >= L else (f"L{a}" if a == b else f"L{a}-{b}")
                    flt = next((f for f in d["module_filters"] if pv.filter_matches(f, probe)), None)
                    name = f"{prefix}{group}." + (f"{flt}." if flt else "") + param
                assert got == values[name], (probe.name, name)


def test_labels_and_dimension_of_a_32_layer_three_model_space():
    space = build_space({"kind": "parameter", "method": "ties", "base_model": "base",
                         "models": ["a", "b", "c"], "num_layers": 32, "granularity": 4})
    assert space.dimension == 8 * 3 * 2 + 3 * 2
    labels = {g.name: g.label for g in space.genes}
    assert labels["B.L4-7.density"] == "layers 4–7 · model B · density"
    assert labels["C.emb.weight"] == "embeddings, final norm, head · model C · weight"
    gene = space.genes["B.L4-7.density"]
    assert gene.meta == {"param": "density", "scope": "layers", "layers": [4, 7], "model": "B",
                         "model_ref": "b", "tie": "B.layers.density"}
    info = json.loads(json.dumps(space.describe()))  # plain JSON for the API and dashboard
    assert info["dimension"] == 54 and info["models"] == {"A": "a", "B": "b", "C": "c"}
    assert "8 layer groups of 4 layers" in info["summary"]
    slerp = build_space({"kind": "parameter", "method": "slerp", "base_model": "base", "models": ["a"],
                         "num_layers": 32, "granularity": 1, "module_filters": ["attention", "mlp"]})
    assert slerp.dimension == 3 * 32 + 1
    assert slerp.genes["L5.mlp.t"].label == "layer 5 · mlp · t"


def test_hand_made_recipe_encodes_to_an_equivalent_point():
    """Scalars, gradients and filters: whatever resolves per gene the same way encodes."""
    space = build_space({"kind": "parameter", "method": "ties", "base_model": "base",
                         "models": ["m1", "m2"], "num_layers": 4, "granularity": 2,
                         "parameters": {"normalize": True}})
    hand = Recipe.from_dict({
        "merge_method": "ties", "base_model": "base",
        "parameters": {"normalize": True, "density": 0.6},
        "models": [
            {"model": "m2", "parameters": {"weight": [0.2, 0.2, 0.8, 0.8]}},
            {"model": "m1", "parameters": {"weight": 0.5, "density": [{"filter": "embeddings", "value": 0.3},
                                                                      {"filter": "model.norm", "value": 0.3},
                                                                      {"value": 0.9}]}},
        ],
    })
    point = space.encode(hand)
    assert point["A.L0-1.density"] == 0.9 and point["A.emb.density"] == 0.3
    assert point["B.L0-1.weight"] == 0.2 and point["B.L2-3.weight"] == 0.8 and point["B.emb.weight"] == 0.2
    decoded = space.decode(point)
    for model in ("m1", "m2"):
        for param in ("weight", "density"):
            for probe in pv.probes(4):
                assert resolved(decoded, model, param, probe, 4) == pytest.approx(
                    resolved(hand, model, param, probe, 4) or 1.0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "dare_ties"}, "merges with dare_ties"),
        ({"models": [{"model": "m1", "parameters": {"weight": [{"filter": "embeddings", "value": 0.1},
                                                               {"value": 0.5}]}},
                     {"model": "m2", "parameters": {"weight": 0.5}}]}, "final norm and head share one gene"),
        ({"models": [{"model": "m1", "parameters": {"weight": 0.5}}]}, "merges models"),
        ({"models": [{"model": "m1", "parameters": {"weight": [0.1, 0.2, 0.3, 0.4]}},
                     {"model": "m2", "parameters": {"weight": 0.5}}]}, "use a smaller granularity"),
        ({"models": [{"model": "m1", "parameters": {"weight": 1.7}},
                     {"model": "m2", "parameters": {"weight": 0.5}}]}, "outside the space's"),
        ({"parameters": {"normalize": False}}, "put the recipe's value in the space's parameters"),
        ({"models": [{"model": "m1", "parameters": {"weight": 0.5, "density": [
            {"filter": "mlp", "value": 0.2}, {"value": 0.5}]}},
                     {"model": "m2", "parameters": {"weight": 0.5}}]}, "module_filters"),
    ],
)
def test_recipes_the_space_cannot_express_are_refused_with_the_reason(change, message):
    space = build_space({"kind": "parameter", "method": "ties", "base_model": "base",
                         "models": ["m1", "m2"], "num_layers": 4, "granularity": 2,
                         "weight_range": [0.0, 1.0], "parameters": {"normalize": True}})
    recipe = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "m1", "parameters": {"weight": 0.5}},
                         {"model": "m2", "parameters": {"weight": 0.5}}], **change}
    with pytest.raises(RecipeNotInSpace, match=message):
        space.encode(Recipe.from_dict(recipe))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "tie"}, "did you mean ties"),
        ({"base_model": None}, "needs base_model"),
        ({"method": "slerp"}, "exactly one other model"),
        ({"weight_range": (-1, 1)}, "negative_weights: true"),
        ({"density_range": (0.5, 1.5)}, r"within \[0.0, 1.0\]"),
        ({"parameters": {"weight": 1.0}}, "searched by this space"),
        ({"parameters": {"gamma": 0.1}}, "no fixed parameter 'gamma'"),
        ({"models": ["m1", "m1"]}, "listed twice"),
        ({"models": ["base", "m1"]}, "also in models"),
        ({"module_filters": ["embeddings"]}, "duplicates the embedding genes"),
        ({"num_layers": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_parameter_space_specs_are_refused(change, message):
    spec = {"kind": "parameter", "method": "ties", "base_model": "base", "models": ["m1", "m2"],
            "num_layers": 4, **change}
    with pytest.raises(ValidationError, match=message):
        build_space(spec)


def test_fixed_parameters_and_merge_settings_reach_the_recipe():
    space = build_space({"kind": "parameter", "method": "breadcrumbs", "base_model": "b", "models": ["m"],
                         "num_layers": 2, "parameters": {"gamma": 0.05, "normalize": True},
                         "search_density": False, "merge_seed": 7, "out_dtype": "bfloat16"})
    recipe = space.decode(space.center())
    assert recipe.parameters == {"gamma": 0.05, "normalize": True}
    assert recipe.seed == 7 and recipe.out_dtype == "bfloat16"
    assert set(recipe.models[0].parameters) == {"weight"}
    assert space.dimension == 2
    # a density not searched may be fixed for every model (searched, it is refused)
    fixed = build_space({"kind": "parameter", "method": "ties", "base_model": "b", "models": ["m"],
                         "num_layers": 2, "search_density": False, "parameters": {"density": 0.8}})
    assert fixed.decode(fixed.center()).parameters["density"] == 0.8
    with pytest.raises(ValidationError, match="'density' is searched by this space"):
        build_space({"kind": "parameter", "method": "ties", "base_model": "b", "models": ["m"],
                     "num_layers": 2, "parameters": {"density": 0.8}})


def test_points_outside_the_space_are_refused():
    space = build_space({"kind": "parameter", "method": "linear", "models": ["a", "b"], "num_layers": 2})
    point = space.center()
    with pytest.raises(InvalidPoint, match="outside its bounds"):
        space.decode({**point, "A.all.weight": 1.5})
    with pytest.raises(InvalidPoint, match="missing genes"):
        space.decode({k: v for k, v in point.items() if k != "A.all.weight"})
    with pytest.raises(InvalidPoint, match="unknown genes"):
        space.decode({**point, "Z.all.weight": 0.5})
    # rounding noise at a bound is clipped, not refused
    nudged = space.decode({**point, "A.all.weight": 1.0 + 1e-12})
    assert nudged.models[0].parameters["weight"][-1].value == 1.0


# ---- layer stacking ---------------------------------------------------------------------

@st.composite
def dfs_specs(draw):
    layers = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    repeats = draw(st.integers(1, 3))
    slots = repeats * sum(layers)
    lo = draw(st.integers(1, slots))
    hi = draw(st.integers(lo, slots))
    sources = [{"model": f"/m/{i}", "num_layers": n} for i, n in enumerate(layers)]
    if draw(st.booleans()):
        sources[0]["model"] = {"study": "ps-1", "trial": "best"}
    return {
        "kind": "stacking", **DFS0,
        "sources": sources,
        "repeats": repeats,
        "min_depth": lo,
        "max_depth": hi,
        "encoding": draw(st.sampled_from(["threshold", "ranked"])),
        "scales": {"search": draw(st.booleans()), "transform": draw(st.sampled_from(["identity", "log"]))},
    }


@PROPERTY
@given(dfs_specs(), st.lists(st.floats(0, 1), min_size=1, max_size=80))
def test_every_dfs_point_decodes_within_the_depth_constraints_and_encodes_back(spec, unit):
    space = build_space(spec)
    assert isinstance(space, LayerStackingSpace)
    recipe = space.decode(point_from_unit(space, unit))
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.merge_method == "passthrough"
    depth = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in recipe.slices)
    assert spec["min_depth"] <= depth <= spec["max_depth"]
    counts = {str(s["model"]) if isinstance(s["model"], str) else "study:ps-1/best": s["num_layers"]
              for s in spec["sources"]}
    for sl in recipe.slices:
        src = sl.sources[0]
        assert src.layer_range[1] <= counts[src.model]
        assert (src.scale is not None) == spec["scales"]["search"]
    assert recipes_close(space.decode(space.encode(recipe)), recipe)


def test_dfs_slots_follow_the_paper_and_labels_name_them():
    space = build_space({"kind": "stacking", **DFS0, "sources": [{"model": "a", "num_layers": 32},
                                                         {"model": "b", "num_layers": 32}],
                         "repeats": 3})
    assert space.spec.num_slots == 192 and space.dimension == 384
    slots = space.slots()
    assert (slots[0].source, slots[0].layer) == (0, 0)
    assert (slots[32].source, slots[32].layer, slots[64].repeat) == (1, 0, 1)
    assert space.genes["s033.include"].label == "slot 33 · model B layer 1 · repeat 1 · include"
    assert space.genes["s033.scale"].meta["param"] == "scale"


def test_dfs_threshold_decoding_repairs_depth_deterministically():
    space = build_space({"kind": "stacking", **DFS0, "repeats": 2,
                         "sources": [{"model": "a", "num_layers": 4}],
                         "min_depth": 3, "max_depth": 4, "scales": {"search": False}})
    u = [0.1, 0.2, 0.9, 0.3, 0.05, 0.45, 0.0, 0.0]  # only slot 2 above 0.5
    point = {f"s{k}.include": v for k, v in enumerate(u)}
    assert space.chosen_slots(point) == [2, 3, 5]  # + the two highest excluded: 0.45 (5), 0.3 (3)
    u = [0.9, 0.8, 0.7, 0.6, 0.95, 0.51, 0.99, 0.52]  # all 8 in, at most 4 allowed
    point = {f"s{k}.include": v for k, v in enumerate(u)}
    assert space.chosen_slots(point) == [0, 1, 4, 6]
    recipe = space.decode(point)
    assert [(s.sources[0].layer_range) for s in recipe.slices] == [(0, 2), (0, 1), (2, 3)]


def test_dfs_ranked_decoding_takes_the_top_priorities():
    space = build_space({"kind": "stacking", **DFS0, "repeats": 2,
                         "sources": [{"model": "a", "num_layers": 3}],
                         "encoding": "ranked", "scales": {"search": False}, "max_depth": 4})
    prio = [0.9, 0.1, 0.8, 0.7, 0.2, 0.3]
    point = {**{f"s{k}.priority": v for k, v in enumerate(prio)}, "depth": 3.4}
    assert space.chosen_slots(point) == [0, 2, 3]
    assert space.genes["depth"].low == 0.5 and space.genes["depth"].high == 4.5


def test_dfs_runs_merge_into_slices_and_scales_reach_the_recipe():
    space = build_space({"kind": "stacking", **DFS0, "sources": [{"model": "a", "num_layers": 3},
                                                         {"model": "b", "num_layers": 3}],
                         "repeats": 1, "base_model": "b",
                         "scales": {"search": True, "low": 0.5, "high": 2.0, "transform": "log"}})
    point = space.center()
    for k in range(6):
        point[f"s{k}.include"] = 0.9 if k in (0, 1, 2, 4) else 0.1
    recipe = space.decode(point)
    assert recipe.base_model == "b"
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in recipe.slices] == [
        ("a", (0, 3)), ("b", (1, 2))]
    assert recipe.slices[0].sources[0].scale == pytest.approx(1.0)  # log-centre of [0.5, 2]
    assert space.genes["s0.scale"].coord_low == pytest.approx(math.log(0.5))


@pytest.mark.parametrize(
    ("slices", "message"),
    [
        ([{"sources": [{"model": "a", "layer_range": [2, 4]}]},
          {"sources": [{"model": "a", "layer_range": [1, 2]}]},
          {"sources": [{"model": "a", "layer_range": [0, 1]}]}], "not in the order"),
        ([{"sources": [{"model": "a", "layer_range": [0, 1], "scale": 3.0}]}], "outside the space's"),
        ([{"sources": [{"model": "zz", "layer_range": [0, 1]}]}], "not in the order"),
        ([{"sources": [{"model": "a", "layer_range": [0, 4]}]},
          {"sources": [{"model": "a", "layer_range": [0, 4]}]}], "allows 1–6"),
    ],
)
def test_dfs_recipes_the_space_cannot_express_are_refused(slices, message):
    space = build_space({"kind": "stacking", **DFS0, "repeats": 2,
                         "sources": [{"model": "a", "num_layers": 4}],
                         "max_depth": 6})
    with pytest.raises(RecipeNotInSpace, match=message):
        space.encode(Recipe.from_dict({"merge_method": "passthrough", "base_model": "a", "slices": slices}))


def test_dfs_encodes_a_hand_made_mergekit_style_stack():
    space = build_space({"kind": "stacking", **DFS0, "sources": [{"model": "a", "num_layers": 4},
                                                         {"model": "b", "num_layers": 4}], "repeats": 2})
    hand = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [1, 4]}]},
        {"sources": [{"model": "a", "layer_range": [2, 4], "scale": 0.7}]},
    ]})
    # no base_model: mergekit's rule takes embeddings and head from the first and last
    # slices' model, here "a" both, which is the space's base: equivalent
    decoded = space.decode(space.encode(hand))
    assert decoded.base_model == "a"
    hand_b = hand.model_copy(update={"base_model": "b"})
    with pytest.raises(RecipeNotInSpace, match="embeddings and head from 'b'"):
        space.encode(hand_b)
    decoded = space.decode(space.encode(hand))
    assert [(s.sources[0].model, s.sources[0].layer_range, s.sources[0].scale) for s in decoded.slices] == [
        ("a", (0, 3), 1.0), ("b", (1, 4), 1.0), ("a", (2, 4), 0.7)]


def test_bad_stacking_specs_are_refused():
    base = {"kind": "stacking", **DFS0, "sources": [{"model": "a", "num_layers": 4}], "repeats": 2}
    for change, message in [
        ({"max_depth": 9}, "exceeds the 8 slots"),
        ({"min_depth": 5, "max_depth": 4}, "exceeds max_depth"),
        ({"sources": [{"model": "a", "num_layers": 4, "layer_range": [2, 6]}]}, "start < end <= num_layers"),
        ({"sources": [{"model": "a", "num_layers": 4}, {"model": "a", "num_layers": 4}]}, "listed twice"),
        ({"scales": {"low": 0, "high": 2}}, "0 < low < high"),
        ({"encoding": "binary"}, "threshold"),
    ]:
        with pytest.raises(ValidationError, match=message):
            build_space({**base, **change})


# ---- PS then DFS, registry, genes -----------------------------------------------------------

def test_a_finished_ps_study_is_a_dfs_source_by_reference():
    space = build_space({"kind": "stacking", **DFS0, "repeats": 1, "sources": [
        {"model": {"study": "ps-7"}, "num_layers": 2}, {"model": "/m/b", "num_layers": 2}]})
    recipe = space.decode({**space.center(), **{f"s{k}.include": 1.0 for k in range(4)}})
    assert recipe.base_model == "study:ps-7/best"
    assert study_refs(recipe) == [StudyRef(study="ps-7", trial="best")]
    ready = resolve_sources(recipe, {"study:ps-7/best": "/exports/ps-7"})
    assert ready.base_model == "/exports/ps-7" and study_refs(ready) == []
    assert [s.sources[0].model for s in ready.slices] == ["/exports/ps-7", "/m/b"]
    assert recipe.base_model == "study:ps-7/best"  # the original is untouched
    with pytest.raises(KeyError, match="must be finished"):
        resolve_sources(recipe, {})
    by_function = resolve_sources(recipe, lambda ref: f"/exports/{ref.study}-{ref.trial}")
    assert by_function.base_model == "/exports/ps-7-best"
    assert parse_placeholder("study:x/trial/12") == StudyRef(study="x", trial=12)
    with pytest.raises(ValueError, match="malformed"):
        parse_placeholder("study:x")


def test_registry_builds_spaces_from_mappings_and_as_a_pydantic_type():
    assert kinds() == ["parameter", "stacking"]
    adapter = TypeAdapter(space_spec_type())
    spec = adapter.validate_python({"kind": "stacking", **DFS0, "sources": [{"model": "a", "num_layers": 2}]})
    assert build_space(spec).dimension == 8
    assert parse_space_spec({"kind": "parameter", "method": "linear", "models": ["a"],
                             "num_layers": 1}).kind == "parameter"
    with pytest.raises(ValueError, match=r"[Dd]id you mean"):
        build_space({"kind": "stackin"})
    with pytest.raises(ValueError, match="a mapping with a 'kind'"):
        build_space({"method": "ties"})


def test_gene_transforms_and_geneset_views():
    g = Gene(name="s", low=0.5, high=2.0, transform="log", label="scale")
    assert g.coord(1.0) == 0.0 and g.value(g.coord_high) == 2.0
    genes = GeneSet([g, Gene(name="w", low=-1, high=1, label="w")])
    z = genes.normalize({"s": 0.0, "w": 0.5})
    assert z == pytest.approx([0.5, 0.75])
    assert genes.denormalize(z) == pytest.approx({"s": 0.0, "w": 0.5})
    with pytest.raises(ValueError, match="declared twice"):
        GeneSet([g, g])
    with pytest.raises(ValidationError, match="low > 0"):
        Gene(name="x", low=0, high=1, transform="log", label="x")


# ---- the probe resolver agrees with the engine's ------------------------------------------

settings_values = st.recursive(
    st.one_of(st.floats(-2, 2), st.lists(st.floats(-2, 2), min_size=1, max_size=6)),
    lambda inner: st.lists(
        st.fixed_dictionaries({"value": inner},
                              optional={"filter": st.sampled_from(["attention", "mlp", "embeddings", "norms",
                                                                   "other", "q_proj", "model.norm.", "*"])}),
        min_size=1, max_size=4),
    max_leaves=6,
)


@PROPERTY
@given(settings_values, st.integers(1, 6))
def test_probe_resolution_matches_the_engine(setting, num_layers):
    from workers import params

    for probe in pv.probes(num_layers):
        pos = pv.position(probe, num_layers)
        engine_pos = Fraction(0) if probe.layer is None else params.layer_position(probe.layer, num_layers)
        assert pos == engine_pos
        assert pv.evaluate(setting, probe, pos) == params.evaluate(setting, probe.name, engine_pos)
        from workers.architecture import category

        assert category(probe.name) == probe.category


def test_search_space_modules_import_no_torch():
    code = (
        "import sys, search_spaces.registry as r, search_spaces.optimizers as o;"
        "r.kinds(); o.names();"
        "import search_spaces.optimizers.optuna_based, search_spaces.optimizers.pycma;"
        "heavy = ('torch', 'ray', 'transformers', 'lm_eval', 'workers');"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_numpy_global_random_state_is_untouched_by_spaces():
    state = np.random.get_state()[1].copy()
    space = build_space({"kind": "stacking", **DFS0, "sources": [{"model": "a", "num_layers": 3}]})
    space.decode(space.center())
    assert (np.random.get_state()[1] == state).all()
