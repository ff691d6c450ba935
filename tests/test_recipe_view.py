"""The readable form of a recipe (what the dashboard draws): values per layer and model read
with the engine's own rules, filters that change nothing folded away, the stacking path."""

from __future__ import annotations

import pytest

from service.recipe_view import recipe_view


def test_parameter_recipe_becomes_panels_of_layers_by_models():
    recipe = {"merge_method": "ties", "base_model": "/b",
              "models": [{"model": "/m1", "parameters": {
                  "weight": [0.1, 0.5, 0.9],
                  "density": [{"filter": "mlp", "value": 0.3}, {"filter": "model.norm.", "value": 0.9},
                              {"filter": "ln_f.", "value": 0.9}, {"value": 0.7}]}},
                         {"model": "/m2", "parameters": {"weight": 0.5, "density": 1.0}}],
              "parameters": {"normalize": False}}
    view = recipe_view(recipe, num_layers=4, names={"/m1": "math", "/b": "base"})
    assert view["kind"] == "parameter" and view["models"] == ["math", "/m2"] and view["base_model"] == "base"
    panels = {(p["parameter"], p["filter"]): p for p in view["panels"]}
    weight = panels[("weight", None)]
    assert weight["layers"] == [0, 1, 2, 3]
    assert weight["values"][0] == pytest.approx([0.1, 0.1 + 0.8 / 3, 0.1 + 1.6 / 3, 0.9])  # the gradient
    assert weight["values"][1] == [0.5] * 4
    assert panels[("density", None)]["values"] == [[0.7] * 4, [1.0] * 4]
    assert panels[("density", "mlp")]["values"] == [[0.3] * 4, [1.0] * 4]
    assert panels[("density", "model.norm. / ln_f.")]["values"] == [[0.9] * 4, [1.0] * 4]  # folded together
    assert ("weight", "mlp") not in panels  # the filter changes nothing for weight
    assert view["global_parameters"] == {"normalize": False}


def test_stacking_recipe_becomes_the_layer_path():
    recipe = {"merge_method": "passthrough", "base_model": "/b",
              "slices": [{"sources": [{"model": "/m1", "layer_range": [0, 2], "scale": 0.5}]},
                         {"sources": [{"model": "/m2", "layer_range": [1, 3]}]}]}
    view = recipe_view(recipe, names={"/m2": "lang"})
    assert view["kind"] == "stacking" and view["num_layers"] == 4
    assert [(p["model"], p["layer"], p["scale"]) for p in view["path"]] == [
        ("/m1", 0, 0.5), ("/m1", 1, 0.5), ("lang", 1, 1.0), ("lang", 2, 1.0)]
    assert [p["out_layer"] for p in view["path"]] == [0, 1, 2, 3]
