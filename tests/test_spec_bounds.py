"""Every number, list and mapping a study spec can hold has a bound (issue 13, item 3).

The check walks the study spec's JSON schema, the one the API publishes: each integer and
number needs a minimum and a maximum, each array a maxItems, each free mapping a
maxProperties. Two parts are bounded elsewhere, and that is tested here too:

- ``optimizer.x0`` is a merge recipe (the engine's own format): the shape check bounds
  its lists and integers, and the space refuses values outside its genes' bounds;
- ``evaluation.options`` belong to the evaluator named: each registered evaluator's
  ``Options`` model must itself be bounded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.spec import StudySpec, StudyValidationError
from service.spec_limits import MAX_DEPTH, MAX_LIST_ITEMS, shape_problems

EXEMPT = ("optimizer.x0", "evaluation.options")
BOUND_KEYS = ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")


def unbounded(schema: dict[str, Any]) -> list[str]:
    """Paths of the numbers, arrays and free mappings of ``schema`` that lack a bound."""
    defs = schema.get("$defs", {})
    out: list[str] = []

    def walk(node: Any, path: str, seen: frozenset[str], inherited: dict[str, Any]) -> None:
        if not isinstance(node, dict) or path.startswith(EXEMPT):
            return
        if "$ref" in node:
            name = node["$ref"].split("/")[-1]
            if name not in seen:
                walk(defs[name], path, seen | {name}, inherited)
            return
        bounds = {**inherited, **{k: node[k] for k in BOUND_KEYS if k in node}}
        for key in ("anyOf", "oneOf", "allOf"):
            for sub in node.get(key, []):
                walk(sub, path, seen, bounds)
        kind = node.get("type")
        if kind in ("integer", "number"):
            low = "minimum" in bounds or "exclusiveMinimum" in bounds
            high = "maximum" in bounds or "exclusiveMaximum" in bounds
            if not (low and high):
                out.append(f"{path} ({kind})")
        elif kind == "array":
            if "maxItems" not in node:
                out.append(f"{path} (array)")
            for i, sub in enumerate(node.get("prefixItems", [])):
                walk(sub, f"{path}[{i}]", seen, {})
            walk(node.get("items"), f"{path}[]", seen, {})
        if kind == "object" or "properties" in node:
            for name, sub in (node.get("properties") or {}).items():
                walk(sub, f"{path}.{name}".lstrip("."), seen, {})
            extra = node.get("additionalProperties")
            if extra is True or isinstance(extra, dict):
                if "maxProperties" not in node:
                    out.append(f"{path} (mapping)")
                walk(extra, f"{path}{{}}", seen, {})

    walk(schema, "", frozenset(), {})
    return sorted(set(out))


def test_every_number_list_and_mapping_of_a_study_spec_is_bounded():
    assert unbounded(StudySpec.model_json_schema()) == []


def test_every_evaluators_options_are_bounded():
    from evaluators import registry

    for name in registry.available():
        assert unbounded(registry.get(name).Options.model_json_schema()) == [], name


def test_the_walk_finds_what_is_unbounded():
    from pydantic import BaseModel

    class Loose(BaseModel):
        n: int
        xs: list[int]
        m: dict[str, float]

    assert unbounded(Loose.model_json_schema()) == ["m (mapping)", "m{} (number)", "n (integer)",
                                                     "xs (array)", "xs[] (integer)"]


@pytest.mark.parametrize("data, word", [
    ({"a": [0] * (MAX_LIST_ITEMS + 1)}, "list of"),
    ({"a": 2**60}, "bits"),
    ({"a": "\x00"}, "NUL"),
    ({"a": "\ud83e"}, "surrogate"),
])
def test_the_shape_check_bounds_what_no_field_declares(data, word):
    (problem,) = shape_problems(data)
    assert word in problem[1]


def test_the_shape_check_is_iterative_and_stops_at_the_depth_limit():
    deep: Any = []
    for _ in range(50_000):  # far past Python's recursion limit
        deep = [deep]
    (problem,) = shape_problems({"x": deep})
    assert f"more than {MAX_DEPTH} levels" in problem[1]


def test_x0_is_bounded_by_the_shape_check():
    with pytest.raises(StudyValidationError, match="list of"):
        StudySpec.from_data({"name": "x", "sources": ["a"],
                             "space": {"kind": "parameter", "method": "linear"},
                             "evaluation": {"objectives": [{"task": "t", "metric": "m"}]},
                             "budget": {"max_trials": 1},
                             "optimizer": {"x0": {"merge_method": "linear",
                                                  "models": [{"model": "a"}] * 5000}}})
