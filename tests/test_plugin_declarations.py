"""What the service reads from a plugin's declaration instead of knowing it: a space's derived
fields, an evaluator's path options; and the stored study, read back in either form."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from evaluators import registry as evaluator_registry
from evaluators.base import Evaluator, PathOption
from search_spaces import registry as space_registry
from search_spaces.sources import StudyRef
from service.spec import DEMO_EXAMPLE, DERIVED_FIELDS, SPACE_FORMS, StudySpec, StudyValidationError
from service.stored_study import StoredStudy
from service.validation import validate_study
from tests.test_validation import Settings, fake_model


# ---- search spaces ---------------------------------------------------------------------------
def test_every_registered_space_has_a_form_and_declared_derived_fields():
    assert {"parameter", "stacking"} <= set(DERIVED_FIELDS) <= set(SPACE_FORMS) <= set(space_registry.kinds())
    stacking = space_registry.space_class("stacking")
    assert DERIVED_FIELDS["stacking"] == stacking.derived_fields
    for kind, derived in DERIVED_FIELDS.items():  # derived fields are fields of the space's spec
        assert set(derived) <= set(space_registry.space_class(kind).spec_class.model_fields), kind


# ---- evaluators: path options ------------------------------------------------------------------
class _FilesOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    corpus: dict[str, str] = {}
    folders: list[str] = []


class _FilesEvaluator(Evaluator):
    """An evaluator written here, never registered: validation finds it through registry.get."""

    name = "declares_paths"
    Options = _FilesOptions
    path_options = (PathOption("corpus", holds="mapping", points_to="file", what="corpus file"),
                    PathOption("folders", holds="list", points_to="task_dir", what="task directory"))

    def evaluate(self, model, tokenizer):  # pragma: no cover - never scored here
        raise NotImplementedError


@pytest.fixture
def files_evaluator(monkeypatch):
    real_get = evaluator_registry.get
    monkeypatch.setattr(evaluator_registry, "get",
                        lambda name: _FilesEvaluator if name == _FilesEvaluator.name else real_get(name))
    return _FilesEvaluator


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("decl_root")
    for name in ("base", "a", "b"):
        fake_model(root / name)
    (root / "texts.txt").write_text("one\ntwo\n")
    (root / "tasks").mkdir()
    outside = tmp_path_factory.mktemp("decl_outside") / "secret.txt"
    outside.write_text("no\n")
    return root, outside


def _spec(options: dict, evaluator: str = _FilesEvaluator.name) -> StudySpec:
    data = copy.deepcopy(DEMO_EXAMPLE)
    data.update(sources=["a", "b"], base_model="base")
    data.pop("heldout")
    data["evaluation"] = {"evaluator": evaluator, "objectives": [{"task": "t", "metric": "m"}],
                          "options": options}
    return StudySpec.model_validate(data)


def test_an_evaluators_declared_path_options_are_checked_and_made_real(files_evaluator, roots):
    root, outside = roots
    settings = Settings(model_roots=[root])
    validated = validate_study(_spec({"corpus": {"x": "texts.txt"}, "folders": ["tasks"]}), settings)
    assert validated.evaluation.options == {"corpus": {"x": os.path.realpath(root / "texts.txt")},
                                            "folders": [os.path.realpath(root / "tasks")]}
    with pytest.raises(StudyValidationError) as info:
        validate_study(_spec({"corpus": {"x": str(outside)}, "folders": ["nowhere"]}), settings)
    found = {tuple(p.loc): p for p in info.value.problems}
    corpus = found[("evaluation", "options", "corpus", "x")]
    assert corpus.type == "path_outside_roots" and corpus.msg.startswith("corpus file path ")
    assert found[("evaluation", "options", "folders", 0)].type == "task_directory_not_found"


def test_options_an_evaluator_does_not_declare_are_not_paths(roots):
    """noop declares no path options: an option named like another evaluator's is just unknown."""
    root, outside = roots
    with pytest.raises(StudyValidationError) as info:
        validate_study(_spec({"text_files": {"x": str(outside)}}, evaluator="noop"),
                       Settings(model_roots=[root]))
    assert [(p.loc, p.type) for p in info.value.problems] == [
        (["evaluation", "options", "text_files"], "extra_forbidden")]


def test_the_builtin_evaluators_declare_their_path_options():
    declared = {name: [o.key for o in evaluator_registry.get(name).path_options]
                for name in evaluator_registry.available()}
    assert declared["lm_eval"] == ["task_dirs"] and declared["loglik"] == ["text_files"]
    assert declared["noop"] == []


# ---- the stored study ----------------------------------------------------------------------------
def test_the_stored_study_reads_the_validated_form_and_a_bare_spec():
    bare = {"name": "x", "sources": ["a", {"study": "s1", "trial": "best"}],
            "base_model": {"study": "s1", "trial": "best"}}
    stored = StoredStudy.load(bare)
    assert stored.spec == bare and stored.warnings == [] and stored.memory_plan is None
    assert stored.refs() == [StudyRef(study="s1")]
    wrapped = {"spec": bare, "worker_spec": {}, "warnings": ["w"], "memory_plan": {"tier": "resident"},
               "models": [{"ref": "/r/a", "given": "a", "path": "/r/a"}, "junk", {"ref": 3}],
               "space_spec": {"kind": "parameter", "num_layers": 2}, "study_refs": []}
    stored = StoredStudy.load(wrapped)
    assert stored.spec == bare and stored.warnings == ["w"] and stored.memory_plan == {"tier": "resident"}
    assert stored.refs() == []  # the validated form's own list, not the spec's sources
    assert stored.model_names() == {"/r/a": "a"} and stored.space_spec["num_layers"] == 2
    for blob in (None, [], "text", {"spec": "not a mapping"}):
        assert StoredStudy.load(blob).refs() == []


# ---- optimizers: what the budget needs -----------------------------------------------------------
@pytest.mark.parametrize("optimizer, warned", [("optuna-cmaes", True), ("cma", True), ("optuna-tpe", False)])
def test_a_budget_too_small_for_the_optimizer_is_a_warning(roots, optimizer, warned):
    root, _ = roots
    data = _spec({}, evaluator="noop").model_dump(mode="json", exclude_unset=True)
    data.update(optimizer={"name": optimizer}, budget={"max_trials": 5}, parallelism=1)
    validated = validate_study(StudySpec.model_validate(data), Settings(model_roots=[root]))
    d = validated.space["dimension"]
    expected = (f"CMA-ES needs on the order of 10–30 × d evaluations; with d = {d} genes, 5 trials may end "
                "before it converges (a coarser granularity lowers d)")
    assert (expected in validated.warnings) is warned, validated.warnings
