"""Parameter resolution (gradients, filters, precedence) and the recipe schema."""

from __future__ import annotations

from fractions import Fraction

import pytest
import yaml
from pydantic import ValidationError

from search_spaces.mergekit_format import NotExpressible, to_mergekit_dict, to_mergekit_yaml
from search_spaces.recipe import Recipe
from workers import params


def test_gradient_with_one_value_per_layer_is_exact():
    values = [0.1, 0.7, 0.3, 0.9]
    got = [params.evaluate(values, "x", params.layer_position(i, 4)) for i in range(4)]
    assert got == values


def test_gradient_interpolates_between_anchors():
    # 2 anchors over 5 layers: 0, .25, .5, .75, 1 of the way
    got = [params.evaluate([0.0, 1.0], "x", params.layer_position(i, 5)) for i in range(5)]
    assert got == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])


def test_filters_by_category_and_substring():
    setting = [
        {"filter": "attention", "value": 1.0},
        {"filter": "gate_proj", "value": 2.0},
        {"value": 3.0},
    ]
    pos = Fraction(0)
    assert params.evaluate(setting, "model.layers.0.self_attn.q_proj.weight", pos) == 1.0
    assert params.evaluate(setting, "model.layers.0.mlp.gate_proj.weight", pos) == 2.0
    assert params.evaluate(setting, "model.layers.0.mlp.up_proj.weight", pos) == 3.0


def test_filter_categories():
    from workers.architecture import category

    assert category("model.embed_tokens.weight") == "embeddings"
    assert category("lm_head.weight") == "embeddings"
    assert category("model.norm.weight") == "norms"
    assert category("model.layers.3.input_layernorm.weight") == "norms"
    assert category("transformer.h.0.ln_1.weight") == "norms"
    assert category("transformer.h.0.attn.c_attn.bias") == "attention"
    assert category("model.layers.0.mlp.down_proj.weight") == "mlp"
    assert category("transformer.h.0.mlp.c_fc.weight") == "mlp"


def test_precedence_most_specific_first():
    scopes = [None, {"weight": 2.0}, {"weight": 3.0}]
    assert params.resolve("weight", scopes, "t", 0) == 2.0
    assert params.resolve("density", scopes, "t", 0) is None


def test_recipe_needs_models_or_slices_not_both():
    with pytest.raises(ValidationError, match="exactly one"):
        Recipe.from_dict({"merge_method": "linear"})
    with pytest.raises(ValidationError, match="layer_range"):
        Recipe.from_dict(
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]}
        )


def test_mergekit_yaml_reads_as_is():
    text = """
models:
  - model: a
    parameters:
      weight: 0.5
      density: [1, 0.7, 0.1]
  - model: b
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: base
parameters:
  normalize: true
  int8_mask: true
dtype: bfloat16
"""
    r = Recipe.from_text(text)
    assert r.merge_method == "ties" and r.models is not None and len(r.models) == 2
    again = Recipe.from_dict(yaml.safe_load(to_mergekit_yaml(r)))
    assert again.model_dump(exclude={"seed"}) == r.model_dump(exclude={"seed"})


def test_stacking_scale_becomes_mergekit_filtered_scale():
    r = Recipe.from_dict({
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2], "scale": 0.5}]},
            {"sources": [{"model": "b", "layer_range": [1, 3]}]},
        ],
    })
    d = to_mergekit_dict(r)
    scale = d["slices"][0]["sources"][0]["parameters"]["scale"]
    assert {"filter": "o_proj", "value": 0.5} in scale and scale[-1] == {"value": 1.0}
    assert "parameters" not in d["slices"][1]["sources"][0]


def test_inverse_density_is_not_expressible_in_mergekit():
    r = Recipe.from_dict({
        "merge_method": "dare_ties", "base_model": "base",
        "models": [{"model": "a", "parameters": {"weight": 1, "density": 0.5}}],
        "parameters": {"rescale_mode": "inverse_density"},
    })
    with pytest.raises(NotExpressible, match="rescale_mode"):
        to_mergekit_dict(r)
