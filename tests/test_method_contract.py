"""The merge-method contract: every registered method's declaration
(search_spaces.merge_methods) and its implementation (workers.methods) agree.

Each check runs on every registered method, and on a method written in this file
(declaration + implementation class, registered at run time, no other file touched),
which ``workers.merge.merge`` then runs on tiny models.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from search_spaces import merge_methods
from search_spaces.method_declaration import MergeError, MethodDeclaration, ParamSpec
from search_spaces.parameter_space import METHODS as SPACE_METHODS
from search_spaces.recipe import Recipe
from search_spaces.registry import build_space
from workers import methods
from workers.methods.base import MergeInputs, MergeMethod
from workers.methods.task_arithmetic import TaskVectorMethod
from workers.sparsify import RESCALE_MODES, Workspace
from workers.tensor_merge import TensorInputs, merge_into

NAMES = merge_methods.names()


# ---- generic inputs from a declaration ---------------------------------------------------
def n_models(d: MethodDeclaration) -> int:
    """How many non-base inputs a test gives the method: two where it may take two."""
    return max(d.min_models, min(2, d.max_models or 2))


def value_of(p: ParamSpec, i: int = 0) -> Any:
    """A value of a parameter that makes the method do something (density 0.5 drops half)."""
    if p.name == "density":
        return 0.5
    if not p.required:
        return p.default
    if p.kind is bool:
        return True
    if p.kind is str:
        return (p.choices or ("x",))[0]
    if p.minimum is not None and p.maximum is not None:
        return (p.minimum + p.maximum) / 2
    return 0.6 + 0.3 * i


def params_of(d: MethodDeclaration) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    per_model = [{p.name: value_of(p, i) for p in d.model_params} for i in range(n_models(d))]
    return per_model, {p.name: value_of(p) for p in d.global_params}


def tensor_inputs(d: MethodDeclaration, *, seed: int = 0, chunk_elements: int | None = None,
                  shape: tuple[int, int] = (37, 29)) -> TensorInputs:
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(shape, generator=g)
    tensors = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n_models(d))]
    per_model, global_params = params_of(d)
    return TensorInputs(name="model.layers.0.mlp.down_proj.weight", shape=shape,
                        base=base if d.needs_base else None, tensors=tensors,
                        model_params=per_model, global_params=global_params, seed=seed,
                        chunk_elements=chunk_elements or math.prod(shape), device=torch.device("cpu"))


def merged(d: MethodDeclaration, **kw: Any) -> torch.Tensor:
    inputs = tensor_inputs(d, **kw)
    out = torch.empty(inputs.shape, dtype=torch.float32)
    return merge_into(methods.get(d.name), inputs, out, out_dtype=torch.float32, ws=Workspace())


def ps_spec(d: MethodDeclaration) -> dict[str, Any]:
    return {"kind": "parameter", "method": d.name, "base_model": "org/base" if d.needs_base else None,
            "models": [f"/models/expert{i}" for i in range(n_models(d))], "num_layers": 4,
            "granularity": 2, "module_filters": ["attention"]}


# ---- the checks, one per clause of the contract ------------------------------------------
def check_implementation(d: MethodDeclaration) -> None:
    """The implementation loads, is the class the declaration names, and reads its facts
    from the declaration; what the class does agrees with what is declared."""
    method = methods.get(d.name)
    cls = type(method)
    assert isinstance(method, MergeMethod) and cls is methods.implementation(d)
    assert cls.declaration is d and method.declaration is d
    module, _, qualname = d.implementation.partition(":")
    assert (cls.__module__, cls.__qualname__) == (module, qualname)
    assert method.name == d.name and method.is_random == d.random and method.chunked == d.chunked
    assert method.model_params == d.model_params and method.global_params == d.global_params
    assert method.describe() == d.describe()
    if d.fused:  # a fused method has its own kernel per chunk
        assert cls.merge_chunk is not MergeMethod.merge_chunk
    task_vector = issubclass(cls, TaskVectorMethod)
    assert d.forms_task_vectors == task_vector
    sparsification = cls.sparsification if task_vector else None
    assert d.random == (sparsification in ("random", "della"))
    assert d.trims_by_magnitude == (sparsification in ("magnitude", "outliers"))


def check_parameter_space(d: MethodDeclaration) -> None:
    """A method with searchable parameters has a parameter space whose genes are those
    parameters; a point decodes to a recipe the method's planner accepts and encodes back."""
    if not d.searchable:
        assert d.name not in SPACE_METHODS
        return
    info = SPACE_METHODS[d.name]
    assert set(info.model_params) | set(info.global_params) == set(d.searchable)
    assert set(info.fixed) | set(d.searchable) == {p.name for p in (*d.global_params, *d.model_params)}
    space = build_space(ps_spec(d))
    assert {g.meta["param"] for g in space.genes} == set(d.searchable)
    z = [(i * 0.37) % 1 for i in range(space.dimension)]
    point = space.genes.denormalize(z)
    recipe = space.decode(point)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    again = space.encode(recipe)
    assert again.keys() == point.keys()
    assert all(math.isclose(again[k], point[k], rel_tol=1e-9, abs_tol=1e-12) for k in point)
    known = {p.name for p in (*d.global_params, *d.model_params)}
    used = set(recipe.parameters) | {k for e in recipe.models or [] for k in e.parameters}
    assert used <= known


def check_base_is_required(d: MethodDeclaration, base: Path, experts: list[Path]) -> None:
    """A method that needs a base refuses a recipe without one, naming the field, both in a
    parameter-space spec and in the merge planner."""
    if not d.needs_base:
        return
    if d.searchable:
        with pytest.raises(ValidationError, match="base_model"):
            build_space({**ps_spec(d), "base_model": None})
    from workers.plan import build_plan

    per_model, global_params = params_of(d)
    recipe = Recipe.from_dict({
        "merge_method": d.name, "parameters": global_params,
        "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, per_model)]})
    with pytest.raises(MergeError, match="base_model"):
        build_plan(recipe)


def check_seed(d: MethodDeclaration) -> None:
    """A random method gives the same tensor for a seed and another for another seed; any
    other method ignores the seed."""
    first, again, other = merged(d, seed=3), merged(d, seed=3), merged(d, seed=4)
    assert torch.equal(first, again)
    assert torch.equal(first, other) != d.random


def check_chunks(d: MethodDeclaration) -> None:
    """A chunked method gives the same tensor merged a few rows at a time as whole."""
    if not d.chunked:
        return
    whole = merged(d, seed=5)
    for rows in (1, 4, 16):
        assert torch.allclose(merged(d, seed=5, chunk_elements=rows * 29), whole, rtol=1e-6, atol=1e-6), rows


# ---- every registered method -------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_the_implementation_is_the_declared_one(name):
    check_implementation(merge_methods.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_searchable_parameters_round_trip_through_the_parameter_space(name):
    check_parameter_space(merge_methods.get(name))


@pytest.mark.parametrize("name", [n for n in NAMES if merge_methods.get(n).needs_base])
def test_a_method_that_needs_a_base_refuses_a_recipe_without_one(family, name):
    base, experts = family("llama")
    check_base_is_required(merge_methods.get(name), base, experts)


@pytest.mark.parametrize("name", NAMES)
def test_random_methods_are_deterministic_for_a_seed(name):
    check_seed(merge_methods.get(name))


@pytest.mark.parametrize("name", [n for n in NAMES if merge_methods.get(n).chunked])
def test_chunked_methods_give_the_same_tensor_in_chunks(name):
    check_chunks(merge_methods.get(name))


def test_the_declarations_are_torch_free_and_shared():
    """The declarations' constants are the engine's; declaring a fact on the class is refused."""
    assert merge_methods.RESCALE_MODES == RESCALE_MODES
    with pytest.raises(MergeError, match="Did you mean ties"):
        merge_methods.get("tie")
    with pytest.raises(TypeError, match="declaration"):
        @methods.implements("linear")
        class Wrong(MergeMethod):
            chunked = False

            def merge(self, inputs: MergeInputs) -> torch.Tensor:
                raise AssertionError


def test_a_second_declaration_of_a_name_is_refused():
    with pytest.raises(ValueError, match="registered twice"):
        merge_methods.register(MethodDeclaration(name="ties", implementation="x:Y"))


# ---- a method written here ---------------------------------------------------------------
class ScaledSum(MergeMethod):
    """``gain * sum(weight_i * model_i)``: unnormalised, unlike linear."""

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        total = sum(p["weight"] * t for p, t in zip(inputs.model_params, inputs.tensors))
        return inputs.global_params["gain"] * total


SCALED_SUM = MethodDeclaration(
    name="test_scaled_sum", implementation=f"{ScaledSum.__module__}:ScaledSum",
    description="gain * sum(weight_i * model_i)",
    global_params=(ParamSpec("gain", float, 1.0, help="multiplies the sum"),),
    model_params=(ParamSpec("weight", float, help="this model's weight"),),
    searchable=("weight",), needs_base=False, base_is_input=True, chunked=True,
)


@pytest.fixture
def scaled_sum():
    """The method registered for one test, then forgotten."""
    merge_methods.register(SCALED_SUM)
    methods.implements(SCALED_SUM.name)(ScaledSum)
    try:
        yield SCALED_SUM
    finally:
        merge_methods.METHODS.unregister(SCALED_SUM.name)


def test_a_method_from_a_test_file_passes_the_contract_and_merges(scaled_sum, family, tmp_path):
    from workers.merge import merge
    from workers.model_io import LazyModel

    assert scaled_sum.name in methods.names() and scaled_sum.name in SPACE_METHODS
    check_implementation(scaled_sum)
    check_parameter_space(scaled_sum)
    check_seed(scaled_sum)
    check_chunks(scaled_sum)

    _, experts = family("llama")
    recipe = Recipe.from_dict({
        "merge_method": scaled_sum.name, "parameters": {"gain": 0.5},
        "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0}},
                   {"model": str(experts[1]), "parameters": {"weight": 3.0}}]})
    merge(recipe, tmp_path / "out")
    out, a, b = (LazyModel(str(p)) for p in (tmp_path / "out", *experts))
    assert set(out.tensors) == set(a.tensors)
    for name in out.tensors:
        want = 0.5 * (a.get(name).float() + 3.0 * b.get(name).float())
        assert torch.allclose(out.get(name).float(), want.to(out.get(name).dtype).float(), atol=1e-6), name


def test_a_forgotten_method_is_unknown_again(scaled_sum):
    merge_methods.METHODS.unregister(scaled_sum.name)
    with pytest.raises(MergeError, match="unknown merge method"):
        methods.get(scaled_sum.name)
    assert scaled_sum.name not in SPACE_METHODS
    merge_methods.register(scaled_sum)  # for the fixture to forget
