"""nuslerp, multislerp and karcher on small tensors, against results worked out by hand,
and their mergekit YAML (parity with mergekit itself: test_mergekit_parity_spherical.py)."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from search_spaces.mergekit_format import NotExpressible, to_mergekit_dict, to_mergekit_yaml
from search_spaces.recipe import Recipe
from tests.test_methods_math import close, run
from workers.methods.base import MergeError

H = math.sqrt(0.5)


# ---- nuslerp ------------------------------------------------------------------------------
def test_nuslerp_halfway_between_orthogonal_unit_vectors():
    assert close(run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 2}, {"weight": 2}]), [H, H])


def test_nuslerp_t_is_the_second_models_share_of_the_weights():
    # t = 1 / (2 + 1) = 1/3: a third of the right angle from the first vector
    out = run("nuslerp", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 2}, {"weight": 1}])
    assert close(out, [math.cos(math.pi / 6), math.sin(math.pi / 6)])


def test_nuslerp_with_a_base_interpolates_task_vectors():
    out = run("nuslerp", [1.0, 1.0], [[3.0, 1.0], [1.0, 3.0]], [{"weight": 1}, {"weight": 1}])
    assert close(out, [1 + 2 * H, 1 + 2 * H])  # task vectors (2, 0) and (0, 2)


def test_nuslerp_colinear_inputs_are_interpolated_linearly():
    out = run("nuslerp", None, [[1.0, 2.0], [2.0, 4.0]], [{"weight": 3}, {"weight": 1}])
    assert close(out, [1.25, 2.5])


def test_nuslerp_an_unchanged_model_is_a_zero_vector_at_a_right_angle():
    # mergekit: a zero task vector normalises to 0, cos 0: sin(t·π/2) of the other one
    out = run("nuslerp", [1.0, 1.0], [[1.0, 1.0], [3.0, 1.0]], [{"weight": 1}, {"weight": 1}])
    assert close(out, [1 + 2 * math.sin(math.pi / 4), 1.0])


def test_nuslerp_rows_and_columns_each_have_their_own_angle():
    a = [[1.0, 0.0], [1.0, 0.0]]
    b = [[0.0, 1.0], [2.0, 0.0]]
    weights = [{"weight": 1}, {"weight": 1}]
    rows = run("nuslerp", None, [a, b], weights, {"nuslerp_flatten": False})
    assert close(rows, [[H, H], [1.5, 0.0]])  # row 0 orthogonal, row 1 colinear
    columns = run("nuslerp", None, [a, b], weights, {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    # column 0: (1, 1) and (0, 2), 45° apart; column 1: (0, 0) and (1, 0), a zero vector
    theta = math.pi / 4
    c = math.sin(theta / 2) / math.sin(theta)
    assert close(columns, [[c, H], [c + 2 * c, 0.0]])


# ---- multislerp ---------------------------------------------------------------------------
def test_multislerp_of_two_orthogonal_unit_vectors_is_the_midpoint():
    out = run("multislerp", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 1}, {"weight": 1}])
    assert close(out, [H, H])


def test_multislerp_keeps_the_weighted_mean_norm():
    out = run("multislerp", [1.0, 1.0, 1.0], [[3.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 7.0]],
              [{"weight": 1}, {"weight": 1}, {"weight": 2}])
    assert math.isclose(float(torch.linalg.vector_norm(out - 1)), (2 + 4 + 2 * 6) / 4, rel_tol=1e-6)


def test_multislerp_of_one_model_is_that_model():
    assert close(run("multislerp", [1.0, 1.0], [[2.0, -3.0]], [{"weight": 0.3}]), [2.0, -3.0])


def test_multislerp_antipodal_inputs():
    # two: mergekit's fallback, the weighted sum; three: refused
    out = run("multislerp", None, [[1.0, 0.0], [-1.0, 0.0]], [{"weight": 1}, {"weight": 1}])
    assert close(out, [0.0, 0.0])
    with pytest.raises(MergeError, match="antipodal"):
        run("multislerp", None, [[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]], [{"weight": 1}] * 3)


def test_multislerp_refuses_weights_summing_to_zero():
    with pytest.raises(MergeError, match="sum to 0"):
        run("multislerp", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 1}, {"weight": -1}])


# ---- karcher ------------------------------------------------------------------------------
def test_karcher_of_orthogonal_vectors_is_the_midpoint_at_their_mean_norm():
    out = run("karcher", None, [[2.0, 0.0], [0.0, 4.0]], [{}, {}])
    assert close(out, [3 * H, 3 * H])


def test_karcher_weights_move_along_the_geodesic():
    # on a circle the weighted Karcher mean of angles 0 and π/2 is at (1/4)·π/2
    out = run("karcher", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 3}, {"weight": 1}])
    assert close(out, [math.cos(math.pi / 8), math.sin(math.pi / 8)])
    assert close(run("karcher", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 1}, {"weight": 0}]), [1.0, 0.0])


def test_karcher_of_one_model_or_of_zero_vectors():
    assert close(run("karcher", None, [[2.0, -3.0]], [{}]), [2.0, -3.0])
    assert close(run("karcher", None, [[0.0, 0.0], [0.0, 0.0]], [{}, {}]), [0.0, 0.0])


def test_karcher_refuses_weights_summing_to_zero():
    with pytest.raises(MergeError, match="positive weight"):
        run("karcher", None, [[1.0, 0.0], [0.0, 1.0]], [{"weight": 0}, {"weight": 0}])


# ---- mergekit YAML ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_spherical_recipes_round_trip_through_mergekit_yaml(method):
    r = Recipe.from_dict({
        "merge_method": method, "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": [0.2, 0.7]}},
                   {"model": "b", "parameters": {"weight": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}}],
        "parameters": {"nuslerp_flatten": False} if method == "nuslerp" else {"normalize_weights": False},
        "dtype": "bfloat16"})
    again = Recipe.from_dict(yaml.safe_load(to_mergekit_yaml(r)))
    assert again.model_dump(exclude={"seed"}) == r.model_dump(exclude={"seed"})


def test_karcher_yaml_leaves_out_equal_weights_and_an_unlisted_base():
    r = Recipe.from_dict({"merge_method": "karcher", "base_model": "base", "parameters": {"tol": 1e-6},
                          "models": [{"model": "a", "parameters": {"weight": [0.5, 1]}},
                                     {"model": "b", "parameters": {"weight": [0.5, 1]}}]})
    assert to_mergekit_dict(r) == {"merge_method": "karcher", "parameters": {"tol": 1e-6},
                                   "models": [{"model": "a"}, {"model": "b"}]}
    listed = Recipe.from_dict({"merge_method": "karcher", "base_model": "base",
                               "models": [{"model": "a"}, {"model": "base"}]})
    assert to_mergekit_dict(listed)["base_model"] == "base"
    for weights in ([0.5, 0.6], [0.5, None]):
        r = Recipe.from_dict({"merge_method": "karcher", "models": [
            {"model": m, "parameters": {} if w is None else {"weight": w}} for m, w in zip("ab", weights)]})
        with pytest.raises(NotExpressible, match="equally"):
            to_mergekit_dict(r)


def test_linear_yaml_leaves_out_an_unlisted_base():
    """linear merges the models listed; mergekit would add the base as an input (and ask
    for its weight)."""
    r = Recipe.from_dict({"merge_method": "linear", "base_model": "base",
                          "models": [{"model": "a", "parameters": {"weight": 1}},
                                     {"model": "b", "parameters": {"weight": 2}}]})
    assert "base_model" not in to_mergekit_dict(r)


# ---- parameter space ----------------------------------------------------------------------
def test_a_parameter_space_refuses_what_the_method_cannot_merge():
    from pydantic import ValidationError

    from search_spaces.registry import build_space

    spec = {"kind": "parameter", "method": "nuslerp", "base_model": "org/base", "num_layers": 2}
    with pytest.raises(ValidationError, match="at most 2 models; got 3"):
        build_space({**spec, "models": ["org/a", "org/b", "org/c"]})
    with pytest.raises(ValidationError, match="also in models"):  # it would be set apart: one input
        build_space({**spec, "models": ["org/a", "org/base"]})
    # karcher merges a listed base as one more model
    build_space({**spec, "method": "karcher", "models": ["org/a", "org/base"]})
