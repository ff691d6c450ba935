"""What a user gets by naming only a method (issue 16): the method's declared search
defaults, a search that starts at task arithmetic, stacking that starts from the base's
own layers, and pycma's coarse-to-fine option."""

from __future__ import annotations

import numpy as np
import pytest

from search_spaces import merge_methods
from search_spaces.optimizers import Failure, create_optimizer
from search_spaces.registry import build_space


def parameter_space(**fields):
    return build_space({"kind": "parameter", "base_model": "base", "models": ["a", "b"], "num_layers": 4,
                        **fields})


@pytest.mark.parametrize("method", [d.name for d in merge_methods.declarations() if d.forms_task_vectors
                                    and any(p.name == "weight" for p in d.model_params)])
def test_task_vector_methods_search_wide_unnormalised_weights_by_default(method):
    """(sce weighs its task vectors itself: it has no weights to search.)"""
    declaration = merge_methods.get(method)
    space = parameter_space(method=method)
    assert space.spec.weight_range == declaration.search_weight_range == (-0.5, 3.0)
    assert space.spec.negative_weights
    assert space.spec.parameters.get("normalize", False) is False  # weighted task vectors are added
    # the decoded recipe says so, so an export or a mergekit YAML merges the same way
    recipe = space.decode(space.start())
    if declaration.param("normalize").default is True:
        assert recipe.parameters["normalize"] is False


def test_what_the_user_gives_wins_over_the_declared_defaults():
    space = parameter_space(method="ties", weight_range=[0.0, 2.0], parameters={"normalize": True})
    assert space.spec.weight_range == (0.0, 2.0) and not space.spec.negative_weights
    assert space.spec.parameters == {"normalize": True}
    linear = build_space({"kind": "parameter", "method": "linear", "models": ["a", "b"], "num_layers": 4})
    assert linear.spec.weight_range == (0.0, 1.0) and linear.spec.parameters == {}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs"])
def test_a_search_starts_at_task_arithmetic(method):
    space = parameter_space(method=method, granularity=2)
    start = space.start()
    declaration = merge_methods.get(method)
    for gene in space.genes:
        param = gene.meta["param"]
        expected = {"weight": 1.0, "density": 1.0}.get(param, declaration.param(param).default)
        assert gene.value(start[gene.name]) == pytest.approx(expected), gene.name
    for name in ("optuna-cmaes", "optuna-tpe"):  # Optuna's samplers evaluate it first
        first = create_optimizer({"name": name, "seed": 3}, space).ask(1)[0]
        assert first.params == pytest.approx({n: space.genes[n].value(v) for n, v in start.items()})
    first = create_optimizer({"name": "random", "seed": 3}, space).ask(1)[0]  # a baseline: the box
    assert first.params != pytest.approx({n: space.genes[n].value(v) for n, v in start.items()})
    first = create_optimizer({"name": "cma", "seed": 3, "sigma0": 0.01}, space).ask(1)[0]  # samples around it
    gap = space.genes.to_array(first.params) - space.genes.to_array(
        {n: space.genes[n].value(v) for n, v in start.items()})
    assert np.abs(gap / (space.genes.highs - space.genes.lows)).max() < 0.06


def test_slerp_starts_halfway():
    space = build_space({"kind": "parameter", "method": "slerp", "base_model": "base", "models": ["a"],
                         "num_layers": 4})
    assert {space.genes[n].value(v) for n, v in space.start().items()} == {0.5}


def test_stacking_starts_from_the_base_models_own_layers():
    space = build_space({"kind": "stacking", "base_model": "ps", "repeats": 2,
                         "sources": [{"model": "ps", "num_layers": 4}, {"model": "x", "num_layers": 4}]})
    recipe = space.decode(space.start())
    slices = [(s.sources[0].model, tuple(s.sources[0].layer_range), s.sources[0].scale)
              for s in recipe.slices]
    assert slices == [("ps", (0, 4), None)]  # the default searches no scales
    without_base = build_space({"kind": "stacking", "base_model": "ps", "repeats": 1,
                                "sources": [{"model": "x", "num_layers": 4}]})
    assert without_base.start() is None


def _coarse_space():
    return parameter_space(method="task_arithmetic", granularity=1)


def test_coarse_to_fine_moves_each_models_layers_together_then_apart():
    space = _coarse_space()
    opt = create_optimizer({"name": "cma", "seed": 1, "options": {"coarse_to_fine": True,
                                                                  "coarse_evaluations": 24}}, space)
    rng = np.random.default_rng(0)

    def layer_weights(point):
        return [[point.params[f"{m}.L{i}.weight"] for i in range(4)] for m in "AB"]

    coarse = fine = 0
    for _ in range(12):
        for p in opt.ask(4):
            rows = layer_weights(p)
            if p.info["phase"] == "coarse":
                coarse += 1
                assert all(max(r) - min(r) < 1e-12 for r in rows)  # tied: one value per model
            else:
                fine += 1
                assert any(max(r) - min(r) > 1e-6 for r in rows)
            opt.tell(p.id, [float(-sum((x - 1.3) ** 2 for r in rows for x in r) + rng.normal(0, 0.01))])
    assert coarse >= 24 and fine > 0


def test_coarse_to_fine_state_resumes_bit_for_bit_and_failures_are_not_told():
    space = _coarse_space()
    spec = {"name": "cma", "seed": 2, "options": {"coarse_to_fine": True, "coarse_evaluations": 16}}
    a = create_optimizer(spec, space)
    for step in range(6):
        for p in a.ask(3):
            a.tell(p.id, Failure("boom") if step == 2 else [float(sum(p.params.values()))])
    b = create_optimizer(spec, space, state=a.state())
    assert [p.params for p in a.ask(5)] == [p.params for p in b.ask(5)]
    assert a.progress()["failed"] == 3


def test_without_the_option_every_gene_is_searched_from_the_start():
    space = _coarse_space()
    opt = create_optimizer({"name": "cma", "seed": 1}, space)
    p = opt.ask(1)[0]
    assert p.info["phase"] == "fine"
    assert any(abs(p.params["A.L0.weight"] - p.params[f"A.L{i}.weight"]) > 1e-9 for i in range(1, 4))


def test_cma_es_steps_far_from_the_start_unless_told():
    space = parameter_space(method="ties")
    assert create_optimizer({"name": "optuna-cmaes"}, space).spec.sigma0 == space.start_sigma() == 0.25
    assert create_optimizer({"name": "cma", "sigma0": 0.05}, space).spec.sigma0 == 0.05
    stacking = build_space({"kind": "stacking", "base_model": "a",
                            "sources": [{"model": "a", "num_layers": 2}]})
    assert create_optimizer({"name": "cma"}, stacking).spec.sigma0 is None  # the optimizer's 1/6


def test_segments_round_off_and_repair_depth_deterministically():
    from search_spaces.stacking_segments import runs, segments

    segs = segments([range(0, 4), range(0, 4)], 1)
    assert runs(segs, [0.2, 0.9], [1.6, 3.7], (1, 8)) == [(0, 0, 2), (1, 0, 4)]
    assert runs(segs, [3.9, 0.0], [4.0, 0.0], (1, 8)) == [(0, 3, 1)]  # stops at the end
    assert runs(segs, [2.0, 0.0], [0.0, 0.0], (3, 8)) == [(0, 1, 3)]  # grown, then earlier
    assert runs(segs, [0.0, 0.0], [4.0, 4.0], (1, 5)) == [(0, 0, 4), (1, 0, 1)]  # the last shortened


def test_segments_encode_a_mergekit_stack_and_refuse_one_out_of_order():
    from search_spaces.base import RecipeNotInSpace
    from search_spaces.recipe import Recipe

    space = build_space({"kind": "stacking", "base_model": "b", "repeats": 1,
                         "sources": [{"model": "r", "num_layers": 4}, {"model": "m", "num_layers": 4}]})
    stack = {"merge_method": "passthrough", "base_model": "b", "slices": [
        {"sources": [{"model": "r", "layer_range": [0, 2]}]},
        {"sources": [{"model": "m", "layer_range": [1, 4]}]}]}
    decoded = space.decode(space.encode(Recipe.from_dict(stack)))
    assert [(s.sources[0].model, tuple(s.sources[0].layer_range)) for s in decoded.slices] == [("r", (0, 2)),
                                                                                             ("m", (1, 4))]
    stack["slices"].reverse()  # m before r: one repeat has no segment of r after m's
    with pytest.raises(RecipeNotInSpace, match="raise repeats"):
        space.encode(Recipe.from_dict(stack))
