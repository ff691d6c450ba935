"""Evaluation specs, validation before compute, fitness, the registry (no model needed)."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from evaluators import (
    EvaluationError,
    EvaluationResult,
    EvaluationSpec,
    ObjectiveScore,
    ObjectiveSpec,
    SpecError,
    Timings,
    fitness,
    registry,
    validate_objectives,
)
from evaluators.subsets import select_indices
from evaluators.testing import addition_rows, choice_rows, write_choice_task, write_generate_task, write_group

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("spec_tasks")
    write_generate_task(d, "zz_addition", addition_rows(5))
    write_choice_task(d, "zz_choice", choice_rows(5))
    write_group(d, "zz_group", ["zz_choice"])
    (d / "zz_filtered.yaml").write_text(
        "include: zz_addition.yaml\ntask: zz_filtered\ntag: zz_tag\n"
        "filter_list:\n"
        "  - name: strict\n    filter: [{function: take_first}]\n"
        "  - name: loose\n    filter: [{function: take_first}]\n"
    )
    return d


def test_unknown_task_is_refused_with_close_matches(task_dir):
    # include_defaults=False: not indexing lm-eval's ~10 s of built-in tasks here (the default
    # None indexes them when a name is not found locally)
    with pytest.raises(SpecError) as info:
        validate_objectives([ObjectiveSpec(task="zz_adition", metric="exact_match")], [task_dir],
                            include_defaults=False)
    msg = str(info.value)
    assert "unknown task 'zz_adition'" in msg and "zz_addition" in msg and str(task_dir) in msg


def test_unknown_metric_is_refused_with_close_matches(task_dir):
    with pytest.raises(SpecError) as info:
        validate_objectives([ObjectiveSpec(task="zz_choice", metric="acc_nrom")], [task_dir])
    assert "no metric 'acc_nrom'" in str(info.value) and "acc_norm" in str(info.value)


def test_all_problems_reported_at_once(task_dir):
    with pytest.raises(SpecError) as info:
        validate_objectives([ObjectiveSpec(task="nope", metric="acc"),
                             ObjectiveSpec(task="zz_choice", metric="bleu")], [task_dir],
                            include_defaults=False)
    assert "'nope'" in str(info.value) and "'bleu'" in str(info.value)


def test_filters_tags_groups(task_dir):
    with pytest.raises(SpecError, match=r"several filters.*exact_match,strict, exact_match,loose"):
        validate_objectives([ObjectiveSpec(task="zz_filtered", metric="exact_match")], [task_dir])
    with pytest.raises(SpecError, match=r"no filter 'strct'.*strict"):
        validate_objectives([ObjectiveSpec(task="zz_filtered", metric="exact_match,strct")], [task_dir])
    with pytest.raises(SpecError, match="is a tag"):
        validate_objectives([ObjectiveSpec(task="zz_tag", metric="exact_match")], [task_dir])
    ok = validate_objectives([ObjectiveSpec(task="zz_filtered", metric="exact_match,loose"),
                              ObjectiveSpec(task="zz_group", metric="acc")], [task_dir])
    assert [o.higher_is_better for o in ok] == [True, True]


def test_local_tasks_do_not_index_lm_eval_builtins(task_dir):
    from evaluators.validation import task_manager

    tm = task_manager([task_dir], ["zz_choice"])
    assert "zz_choice" in tm.task_index and "hellaswag" not in tm.task_index


def test_direction_override_and_settings_consistency(task_dir):
    (spec,) = validate_objectives([ObjectiveSpec(task="zz_choice", metric="acc", higher_is_better=False)],
                                  [task_dir])
    assert spec.higher_is_better is False
    with pytest.raises(SpecError, match="disagree"):
        validate_objectives([ObjectiveSpec(task="zz_choice", metric="acc", limit=3),
                             ObjectiveSpec(task="zz_choice", metric="acc_norm", limit=4)], [task_dir])
    with pytest.raises(SpecError, match="does not exist"):
        validate_objectives([ObjectiveSpec(task="zz_choice", metric="acc")], [task_dir / "missing"])
    with pytest.raises(SpecError, match="'evomerge:nope' is not a packaged task folder"):
        validate_objectives([ObjectiveSpec(task="zz_choice", metric="acc")], ["evomerge:nope"])


def test_spec_models():
    with pytest.raises(ValidationError, match="limit"):
        ObjectiveSpec(task="t", metric="m", limit=0)
    with pytest.raises(ValidationError, match="neither a count nor a fraction"):
        ObjectiveSpec(task="t", metric="m", limit=2.5)
    assert ObjectiveSpec(task="t", metric="m", limit=200.0).limit == 200
    with pytest.raises(ValidationError, match="more than once"):
        EvaluationSpec(objectives=[ObjectiveSpec(task="t", metric="m")] * 2)
    with pytest.raises(ValidationError):
        EvaluationSpec(objectives=[])
    spec = EvaluationSpec(objectives=[ObjectiveSpec(task="t", metric="m", limit=0.5)])
    assert spec.holdout().subset == "holdout" and spec.subset == "search"


def test_registry(task_dir, monkeypatch):
    assert {"lm_eval", "loglik"} <= set(registry.available())
    monkeypatch.chdir(task_dir.parent)  # relative task directories are stored absolute
    spec = registry.validate_spec(EvaluationSpec(objectives=[ObjectiveSpec(task="zz_choice", metric="acc")],
                                                 options={"task_dirs": [task_dir.name]}))
    assert spec.options["task_dirs"] == [str(task_dir.resolve())]
    with pytest.raises(SpecError, match="Did you mean 'lm_eval'"):
        registry.get("lm-eval")
    with pytest.raises(ValidationError):  # options are checked against the evaluator's own model
        registry.validate_spec(EvaluationSpec(objectives=[ObjectiveSpec(task="zz_choice", metric="acc")],
                                              options={"task_dir": [str(task_dir)]}))
    with pytest.raises(SpecError, match="held-out"):
        registry.validate_spec(EvaluationSpec(objectives=[ObjectiveSpec(task="zz_choice", metric="acc")],
                                              subset="holdout", options={"task_dirs": [str(task_dir)]}))


def test_select_indices():
    a = select_indices(100, 10, 1, "t")
    assert a == select_indices(100, 10, 1, "t") and len(a) == 10 and a == sorted(a)
    assert a != select_indices(100, 10, 2, "t") and a != select_indices(100, 10, 1, "u")
    assert len(select_indices(100, 0.25, 1, "t")) == 25
    assert select_indices(100, None, 1, "t") is None and select_indices(10, 50, 1, "t") is None
    held = select_indices(100, 10, 1, "t", "holdout")
    assert not set(a) & set(held) and len(held) == 90
    with pytest.raises(SpecError, match="no held-out"):
        select_indices(10, 10, 1, "t", "holdout")


def _result(*scores: tuple[float, float, bool]) -> EvaluationResult:
    return EvaluationResult(
        objectives=[ObjectiveScore(key=f"k{i}", task="t", metric="m", value=v, weight=w, higher_is_better=h)
                    for i, (v, w, h) in enumerate(scores)],
        metrics={}, n_examples={}, timings=Timings(total_s=1, forward_s=0.5, model_calls=1),
    )


def test_fitness_signs_and_weights():
    r = _result((0.8, 2.0, True), (3.0, 0.5, False))
    assert fitness(r) == pytest.approx(2.0 * 0.8 - 0.5 * 3.0)
    assert fitness(r, multi_objective=True) == [0.8, -3.0]
    for bad in (math.nan, math.inf):
        with pytest.raises(EvaluationError, match="not a score"):
            fitness(_result((bad, 1.0, True)))


def test_evaluation_error_survives_pickling():
    err = pickle.loads(pickle.dumps(EvaluationError("metric is nan", task="t", detail="tb")))
    assert (err.reason, err.task, err.detail, str(err)) == ("metric is nan", "t", "tb", "[t] metric is nan")


def test_service_side_stays_light(task_dir):
    """What the API process does (import, discover, validate) imports neither torch nor
    transformers; lm_eval.tasks is loaded only to read the task index."""
    code = (
        "import sys, evaluators\n"
        "from evaluators import registry, EvaluationSpec, ObjectiveSpec\n"
        "assert not [m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules]\n"
        "registry.available()\n"
        "assert not [m for m in ('torch', 'lm_eval', 'transformers') if m in sys.modules]\n"
        f"registry.validate_spec(EvaluationSpec(objectives=[ObjectiveSpec(task='zz_choice', metric='acc')],"
        f" options={{'task_dirs': [{str(task_dir)!r}]}}))\n"
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
