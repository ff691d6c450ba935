"""The search-space contract: every registered space kind (``search_spaces.registry``), built from
the example spec it declares (``SearchSpace.example_spec``) over the tiny Llama family, goes
through the same checks. A new space is checked here with no edit to this file.

- decode → encode → decode gives the same recipe, and the encoded point is a fixed point
  (encode is many-to-one for some encodings, e.g. stacking's threshold genes, so the point a
  recipe encodes to is its canonical one, not the point it was decoded from);
- the centre and random points decode to valid recipes that name only the space's sources;
- decode is deterministic (the same point, a space built again from the same spec);
- a bad point and a bad spec are refused with an error that names the gene or the field;
- what the service reads of a space is declared with values it knows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from search_spaces.base import InvalidPoint, SearchSpace
from search_spaces.recipe import Recipe
from search_spaces.registry import SPACES, build_space, kinds
from search_spaces.sources import model_string

KINDS = kinds()


@pytest.fixture(scope="module")
def models(family) -> tuple[list[str], int]:
    """(the tiny family's base then experts, their layer count)."""
    base, experts = family("llama")
    config = json.loads((Path(base) / "config.json").read_text())
    return [str(base), *map(str, experts)], int(config["num_hidden_layers"])


def example(kind: str, models: tuple[list[str], int]) -> dict[str, Any]:
    return SPACES.get(kind).example_spec(*models)


def space_of(kind: str, models: tuple[list[str], int]) -> SearchSpace:
    return build_space(example(kind, models))


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to 9 significant digits (float tolerance)."""
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def same_recipe(a: Recipe, b: Recipe) -> bool:
    return rounded(a.to_dict()) == rounded(b.to_dict())


def random_points(space: SearchSpace, n: int = 5, seed: int = 0) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    return [space.genes.denormalize(rng.random(space.dimension)) for _ in range(n)]


# ---- the checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_the_example_spec_builds_a_space_of_its_kind(kind, models):
    cls = SPACES.get(kind)
    spec = example(kind, models)
    space = build_space(spec)
    assert type(space) is cls and space.kind == kind and spec["kind"] == kind
    assert 1 <= space.dimension == space.planned_dimension()
    assert cls.derived_fields is not None and set(cls.derived_fields) <= set(cls.spec_class.model_fields)
    described = space.describe()
    assert described["kind"] == kind and described["dimension"] == space.dimension
    assert len(described["genes"]) == space.dimension and space.summary()


@pytest.mark.parametrize("kind", KINDS)
def test_decode_encode_round_trip(kind, models):
    space = space_of(kind, models)
    for point in [space.center(), *random_points(space)]:
        recipe = space.decode(point)
        encoded = space.encode(recipe)
        assert set(encoded) == set(space.genes.names)
        assert same_recipe(space.decode(encoded), recipe)
        again = space.encode(space.decode(encoded))
        assert again == pytest.approx(encoded, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_points_decode_to_valid_recipes_of_the_sources(kind, models):
    space = space_of(kind, models)
    sources = {model_string(r) for r in space.sources()}
    assert sources <= set(models[0])
    for point in [space.center(), *random_points(space, seed=1)]:
        recipe = space.decode(point)
        assert isinstance(recipe, Recipe)
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        named = {e.model for e in recipe.models or []}
        named |= {s.model for sl in recipe.slices or [] for s in sl.sources}
        named |= {recipe.base_model} - {None}
        assert named <= sources, named - sources
        assert recipe.merge_method == space.merge_method()


@pytest.mark.parametrize("kind", KINDS)
def test_decode_is_deterministic(kind, models):
    first, second = space_of(kind, models), space_of(kind, models)
    assert first.genes.names == second.genes.names
    for point in random_points(first, seed=2):
        assert first.decode(point) == first.decode(dict(point)) == second.decode(point)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_point_is_refused_naming_the_gene(kind, models):
    space = space_of(kind, models)
    gene = space.genes.names[-1]
    point = space.center()
    with pytest.raises(InvalidPoint, match="missing genes") as missing:
        space.decode({k: v for k, v in point.items() if k != gene})
    assert gene in str(missing.value)
    with pytest.raises(InvalidPoint, match="unknown genes") as unknown:
        space.decode({**point, "no_such_gene": 0.5})
    assert "no_such_gene" in str(unknown.value)
    g = space.genes[gene]
    for bad in (g.coord_high + (g.coord_high - g.coord_low), math.nan):
        with pytest.raises(InvalidPoint) as outside:
            space.decode({**point, gene: bad})
        assert repr(gene) in str(outside.value)


@pytest.mark.parametrize("kind", KINDS)
def test_a_bad_spec_is_refused_naming_the_field(kind, models):
    spec = example(kind, models)
    for field, value in [("no_such_field", 1), ("merge_seed", -1), ("dtype", ["float32"])]:
        with pytest.raises(ValidationError) as refused:
            build_space({**spec, field: value})
        assert any(field in map(str, e["loc"]) for e in refused.value.errors()), refused.value


@pytest.mark.parametrize("kind", KINDS)
def test_what_the_service_reads_is_declared(kind, models):
    cls = SPACES.get(kind)
    assert cls.compatibility in ("tensors", "layers")
    assert isinstance(cls.task_vector_base, bool) and isinstance(cls.keeps_source_shapes, bool)
    from service.recipe_view import VIEWS, recipe_view

    assert cls.recipe_view is None or cls.recipe_view in VIEWS
    space = space_of(kind, models)
    stacked = space.stacked_layers()
    recipe = space.decode(space.center())
    if stacked is not None:
        depth = sum(s.layer_range[1] - s.layer_range[0] for sl in recipe.slices or [] for s in sl.sources[:1])
        assert 1 <= depth <= stacked
    view = recipe_view(recipe, num_layers=models[1], kind=kind)
    assert view["method"] == recipe.merge_method
    assert view["kind"] == (cls.recipe_view or view["kind"])


def test_every_built_in_kind_is_registered():
    assert {"parameter", "stacking"} <= set(KINDS)
