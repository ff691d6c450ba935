"""The study spec: parsing (YAML / JSON), shape checks, and how errors are reported."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from search_spaces.sources import StudyRef
from service.spec import (
    DEMO_EXAMPLE,
    MULTI_OBJECTIVE_EXAMPLE,
    Problem,
    StudySpec,
    StudyValidationError,
)

REPO = Path(__file__).resolve().parents[1]


def refusal(data) -> list[Problem]:
    with pytest.raises(StudyValidationError) as info:
        StudySpec.from_data(data) if not isinstance(data, (str, bytes)) else StudySpec.from_text(data)
    return info.value.problems


def demo(**changes) -> dict:
    data = copy.deepcopy(DEMO_EXAMPLE)
    data.update(changes)
    return data


def only(problems: list[Problem], loc: list) -> Problem:
    found = [p for p in problems if p.loc == loc]
    assert found, f"no problem at {loc}: {[(p.loc, p.msg) for p in problems]}"
    return found[0]


def test_the_examples_parse_and_the_schema_shows_them():
    spec = StudySpec.model_validate(DEMO_EXAMPLE)
    assert spec.space.kind == "parameter" and spec.space.method == "ties"
    assert spec.optimizer.name == "optuna-cmaes" and spec.budget.max_trials == 300
    assert spec.heldout.tasks == {"zoo_xl_add": "zoo_xl_add_heldout"}
    multi = StudySpec.model_validate(MULTI_OBJECTIVE_EXAMPLE)
    assert multi.multi_objective and len(multi.evaluation.objectives) == 2
    schema = StudySpec.model_json_schema()
    assert schema["examples"][0]["name"] == DEMO_EXAMPLE["name"]
    # the user's space has no derived fields in the schema
    form = schema["$defs"]["ParameterSpaceForm"]["properties"]
    assert "method" in form and "granularity" in form
    assert not {"models", "num_layers", "base_model"} & set(form)
    stacking = schema["$defs"]["StackingSpaceForm"]["properties"]
    assert "layer_ranges" in stacking and "repeats" in stacking and "sources" not in stacking


def test_yaml_and_json_give_the_same_spec():
    as_json = StudySpec.from_text(json.dumps(DEMO_EXAMPLE))
    as_yaml = StudySpec.from_text(yaml.safe_dump(DEMO_EXAMPLE))
    assert as_json == as_yaml == StudySpec.model_validate(DEMO_EXAMPLE)
    assert StudySpec.from_text(as_json.to_yaml()) == as_json
    assert StudySpec.from_text(as_json.to_yaml().encode()) == as_json


def test_bad_yaml_is_refused_with_its_line():
    (p,) = refusal("name: x\nsources: [a, b\nbudget: {max_trials: 3}\n")
    assert p.type == "spec_syntax" and "line" in p.msg and p.loc == []
    (p,) = refusal("name: x\nbudget:\n  max_trials: 3\nbudget:\n  max_seconds: 4\n")
    assert "'budget' appears twice" in p.msg and "line 2" in p.msg and "line 4" in p.msg
    (p,) = refusal("- just\n- a list\n")
    assert p.type == "spec_not_a_mapping"
    (p,) = refusal("  \n")
    assert p.type == "spec_empty"
    (p,) = refusal(b"\xff\xfe")
    assert p.type == "spec_not_text"


def test_every_shape_problem_is_reported_at_once_with_a_fix():
    problems = refusal(demo(
        space={"kind": "parameter", "method": "tiez", "num_layers": 4, "granularty": 2},
        budget={}, parallelism=0, zz=1,
    ))
    method = only(problems, ["space", "method"])
    assert "did you mean ties" in method.msg
    assert "config.json" in only(problems, ["space", "num_layers"]).msg
    assert "did you mean granularity" in only(problems, ["space", "granularty"]).fix
    assert "the budget is empty" in only(problems, ["budget"]).msg
    only(problems, ["parallelism"])
    assert "remove `zz`" in only(problems, ["zz"]).fix
    assert all(p.fix for p in problems)


def test_derived_fields_of_the_space_are_refused():
    space = {"kind": "parameter", "method": "ties", "models": ["a"], "base_model": "b"}
    problems = refusal(demo(space=space))
    assert "the study's `sources`" in only(problems, ["space", "models"]).msg
    assert "the study's `base_model`" in only(problems, ["space", "base_model"]).msg
    problems = refusal(demo(space={"kind": "stacking", "sources": [{"model": "a", "num_layers": 2}]}))
    assert "layer_ranges" in only(problems, ["space", "sources"]).msg


def test_unknown_space_kind():
    p = only(refusal(demo(space={"kind": "evolution", "method": "ties"})), ["space"])
    assert "parameter" in p.fix and "stacking" in p.fix
    p = only(refusal(demo(space={"method": "ties"})), ["space"])
    assert "space.kind" in p.fix


def test_the_json_schema_marks_space_kind_required():
    """A client that generates forms from the schema must ask for `kind` (the discriminator)."""
    schema = StudySpec.model_json_schema()
    forms = [schema["$defs"][ref.split("/")[-1]] for ref in
             schema["properties"]["space"]["discriminator"]["mapping"].values()]
    assert len(forms) >= 2
    for form in forms:
        assert "kind" in form["required"], form["title"]
        assert "default" not in form["properties"]["kind"]


@pytest.mark.parametrize("budget, words", [
    ({"max_trials": 1_000_000}, "outside 1 … 100000"),
    ({"max_trials": 0}, "at least one trial"),
    ({"max_seconds": -5}, "outside (0"),
    ({"max_seconds": float("inf")}, "finite"),
    ({"max_seconds": 90 * 24 * 3600}, "30 days"),
    ({"max_trials": None, "max_seconds": None}, "empty"),
    ({"max_trial": 10}, "Extra inputs"),
])
def test_absurd_budgets_are_refused(budget, words):
    problems = refusal(demo(budget=budget))
    assert any(p.loc[0] == "budget" and words in p.msg for p in problems), problems


def test_sources_are_paths_hub_ids_or_study_references():
    sources = ["zoo/math", {"study": "ps-7"}, {"study": "ps-7", "trial": 12}]
    spec = StudySpec.model_validate(demo(sources=sources))
    assert spec.sources[1] == StudyRef(study="ps-7", trial="best")
    assert spec.sources[2].placeholder() == "study:ps-7/trial/12"
    problems = refusal(demo(sources=[3, {"study": "bad id!"}, ""]))
    assert "a hub id 'org/name'" in only(problems, ["sources", 0]).msg
    only(problems, ["sources", 1, "study"])
    only(problems, ["sources", 2])
    only(refusal(demo(sources=[])), ["sources"])


def test_other_sections_keep_their_own_checks():
    problems = refusal(demo(optimizer={"name": "cmaa"}, evaluation={"objectives": []},
                            heldout={"limit": 50}))
    assert "Did you mean cma" in only(problems, ["optimizer", "name"]).msg
    only(problems, ["evaluation", "objectives"])
    assert "heldout.tasks" in only(problems, ["heldout"]).msg


def test_the_errors_read_as_a_422_detail():
    with pytest.raises(StudyValidationError) as info:
        StudySpec.from_data(demo(budget={}))
    (item,) = info.value.detail()
    assert set(item) == {"loc", "msg", "fix", "type"} and item["loc"] == ["budget"]
    assert "budget: the budget is empty" in str(info.value)


def test_the_documented_examples_are_valid_specs():
    text = (REPO / "docs" / "study-spec.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if b.startswith("name:")]
    assert len(blocks) >= 3
    for block in blocks:
        StudySpec.from_text(block)
