"""The study's evaluation: the evaluator's path options under the roots, the objectives against
the evaluator's own ``validate`` (lm-eval's task index for lm_eval), and the held-out scoring.

Checking lm-eval tasks imports ``lm_eval.tasks`` (not torch or transformers) the first time,
in :func:`check_evaluation`: the one heavy import of validation.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evaluators.base import EvaluationSpec, PathOption, SpecError
from service.spec import StudySpec, problems_from_pydantic
from service.spec_limits import MAX_TASK_DIRS
from service.validation.models import SettingsLike
from service.validation.paths import real_roots, resolve_under_roots
from service.validation.problems import Loc, Problems, Refusal

_BUILTIN_TASKS = "evomerge:"


def check_eval_paths(evaluation: EvaluationSpec, spec: StudySpec, settings: SettingsLike,
                     problems: Problems) -> EvaluationSpec:
    """The evaluator's path options (``Evaluator.path_options``: task directories, text files) must
    lie under the roots too; made absolute and real. An unknown evaluator has none (check_evaluation
    says it is unknown)."""
    roots = real_roots(getattr(settings, "task_roots", None) or getattr(settings, "model_roots", []) or [])
    options = dict(evaluation.options)
    for declared in _path_options(evaluation.evaluator):
        loc: Loc = ["evaluation", "options", declared.key]
        value = options.get(declared.key)
        if declared.holds == "list" and isinstance(value, list):
            if declared.points_to == "task_dir" and len(value) > MAX_TASK_DIRS:
                problems.add(loc, f"{len(value)} task directories, more than {MAX_TASK_DIRS}",
                             "put the task YAML files into fewer folders", "too_many_task_dirs")
                continue
            checked = [_checked_path(declared, v, roots, problems, [*loc, j]) for j, v in enumerate(value)]
            options[declared.key] = [p for p in checked if p is not None]
        elif declared.holds == "mapping" and isinstance(value, Mapping):
            named = {key: _checked_path(declared, v, roots, problems, [*loc, key])
                     for key, v in value.items()}
            options[declared.key] = {key: p for key, p in named.items() if p is not None}
    hflm = options.get("hflm_args")
    if isinstance(hflm, Mapping) and hflm.get("trust_remote_code") and not spec.trust_remote_code:
        problems.add(["evaluation", "options", "hflm_args", "trust_remote_code"],
                     "hflm_args.trust_remote_code needs the study's trust_remote_code",
                     "remove it (evomerge hands lm-eval an in-memory model)", "trust_remote_code_refused")
    return evaluation.model_copy(update={"options": options})


def _path_options(evaluator: str) -> tuple[PathOption, ...]:
    """The options of an evaluator that name paths, as it declares them."""
    from evaluators import registry

    try:
        return tuple(registry.get(evaluator).path_options)
    except SpecError:
        return ()


def _checked_path(declared: PathOption, given: Any, roots: Sequence[Path], problems: Problems,
                  loc: Loc) -> str | None:
    """One value of a path option as the evaluator gets it, or None with a problem."""
    if declared.points_to == "task_dir":
        return _task_dir(given, roots, problems, loc, what=declared.what)
    try:
        return str(resolve_under_roots(str(given), roots, what=declared.what))
    except Refusal as err:
        problems.refusal(loc, err)
        return None


def _task_dir(given: Any, roots: Sequence[Path], problems: Problems, loc: Loc, *,
              what: str = "task directory") -> str | None:
    """A task directory as the evaluator gets it (``evomerge:NAME`` as given, else its real path),
    or None with a problem: a packaged folder is looked up by name only, and a folder under the
    roots must lead nowhere outside them (service.task_dirs)."""
    from evaluators.validation import packaged_task_dir
    from service.task_dirs import TaskDirRefusal, audit_task_dir

    text = str(given)
    if text.startswith(_BUILTIN_TASKS):
        try:
            packaged_task_dir(text)
        except SpecError as err:
            problems.add(loc, str(err), "write evomerge:<name> with one of the names listed, or give a "
                         "folder under the roots", "unknown_packaged_tasks")
            return None
        return text
    try:
        real = resolve_under_roots(text, roots, what=what)
        if not real.is_dir():
            raise Refusal(f"{what} {text!r} is not a folder", "give the folder of the task YAML files",
                          "task_directory_not_found")
        audit_task_dir(real, roots)
    except (Refusal, TaskDirRefusal) as err:
        problems.add(loc, err.msg, err.fix, err.kind)
        return None
    return str(real)


def _objective_loc(prefix: Loc, msg: str, suffix: bool = True) -> tuple[Loc, str, str]:
    """Where an objective's problem is (``suffix``: down to its task or metric field)."""
    if msg.startswith("unknown task") or "is a tag for" in msg or msg.startswith("group "):
        fix = ("check the task name (close matches are listed), or add the folder of its YAML to "
               "evaluation.options.task_dirs")
        return [*prefix, *(["task"] if suffix else [])], fix, "unknown_task"
    if " has no metric " in msg or " has no filter " in msg or "several filters" in msg:
        fix = "use one of the metrics (and filters) the message lists"
        return [*prefix, *(["metric"] if suffix else [])], fix, "unknown_metric"
    return prefix, "change the objective as the message says", "objective_invalid"


def check_evaluation(evaluation: EvaluationSpec, problems: Problems, loc: Loc,
                     objective_locs: Sequence[Loc] | None = None) -> EvaluationSpec | None:
    """Validate with the evaluator's own ``validate`` (no model); each objective on its own first,
    so a problem names its objective. Imports ``lm_eval.tasks`` for the lm_eval evaluator."""
    from evaluators import registry
    from evaluators.validation import IndexNotReady

    try:
        cls = registry.get(evaluation.evaluator)
    except SpecError as err:
        problems.add([*loc, "evaluator"], str(err), "use one of the evaluators listed", "unknown_evaluator")
        return None
    try:
        cls.Options.model_validate(evaluation.options)
    except ValidationError as err:
        for p in problems_from_pydantic(err, [*loc, "options"]):
            problems.items.append(p)
        return None
    locs = objective_locs or [[*loc, "objectives", i] for i in range(len(evaluation.objectives))]
    bad = False
    for objective, oloc in zip(evaluation.objectives, locs):
        try:
            one = evaluation.model_copy(update={"objectives": [objective], "subset": "search"})
            registry.validate_spec(one)
        except IndexNotReady:
            raise
        except SpecError as err:
            for msg in _split(str(err)):
                where, fix, kind = _objective_loc(oloc, msg, suffix=objective_locs is None)
                problems.add(where, msg, fix, kind)
            bad = True
    if bad:
        return None
    try:
        return registry.validate_spec(evaluation)
    except IndexNotReady:
        raise
    except SpecError as err:
        for msg in _split(str(err)):
            problems.add(loc, msg, "change the evaluation as the message says", "evaluation_invalid")
    except ValidationError as err:
        problems.items.extend(problems_from_pydantic(err, loc))
    return None


def _split(message: str) -> list[str]:
    """``validate_objectives`` joins several problems as '\\n- a\\n- b'."""
    parts = [p.strip() for p in message.split("\n- ") if p.strip()]
    return [p.removeprefix("- ") for p in parts] or [message]


def check_heldout(spec: StudySpec, evaluation: EvaluationSpec,
                  problems: Problems) -> EvaluationSpec | None:
    """The evaluation the best trials are re-scored with at the end (None: none, or a problem)."""
    held = spec.heldout
    if held is None:
        return None
    if held.tasks is None:
        return check_evaluation(evaluation.holdout(), problems, ["heldout"])
    search_tasks = list(dict.fromkeys(o.task for o in evaluation.objectives))
    ok = True
    for key, target in held.tasks.items():
        if key not in search_tasks:
            close = difflib.get_close_matches(key, search_tasks, n=2)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.add(["heldout", "tasks", key], f"{key!r} is not a task of the objectives{hint}",
                         f"map each objective task ({', '.join(search_tasks)}) to its held-out task",
                         "unknown_task")
            ok = False
        elif target == key:
            problems.add(["heldout", "tasks", key],
                         f"{key!r} maps to itself: that re-scores the search's examples",
                         "name a task with other examples, or drop heldout.tasks to use the examples the "
                         "search's limit left out", "heldout_same_task")
            ok = False
    missing = [t for t in search_tasks if t not in held.tasks]
    if missing:
        problems.add(["heldout", "tasks"], f"objective task(s) {missing} have no held-out task",
                     "add `<task>: <held-out task>` for each, or drop heldout.tasks to use the examples the "
                     "search's limit left out", "heldout_incomplete")
        ok = False
    if not ok:
        return None
    objectives = [o.model_copy(update={"task": held.tasks[o.task], "limit": held.limit, "name": o.key})
                  for o in evaluation.objectives]
    heldout = evaluation.model_copy(update={"objectives": objectives, "subset": "search"})
    locs = [["heldout", "tasks", o.task] for o in evaluation.objectives]
    return check_evaluation(heldout, problems, ["heldout"], locs)

