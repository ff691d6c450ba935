"""Validate a study before any compute: models, compatibility, space, tasks, optimizer, budget.

``validate_study(spec, settings)`` reads only headers (``config.json`` and safetensors
headers, see :mod:`service.model_headers`), builds the search space from the layer counts
it finds, checks the objectives against lm-eval's task index, dry-runs the optimizer
in memory, and plans a worker's memory from the same headers (``workers.memory_plan``,
torch-free: a study that no worker can hold is refused). It collects every problem and
raises one :class:`StudyValidationError`; on success it returns a :class:`ValidatedStudy`
holding what the controller needs: the full space spec, the validated evaluation (and
held-out evaluation), the optimizer spec with its derived fields, the memory plan, and
the fields of a ``workers.trial.WorkerSpec``.

Heavy imports: none, except that checking lm-eval tasks imports ``lm_eval.tasks`` (not
torch or transformers) the first time, in :func:`check_evaluation` — the one place it
happens.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Union

from pydantic import BaseModel, Field, ValidationError

from evaluators.base import EvaluationSpec, SpecError
from search_spaces.base import RecipeNotInSpace, SearchSpace
from search_spaces.optimizers.base import OptimizerSpec
from search_spaces.recipe import Recipe
from search_spaces.sources import StudyRef
from service.model_headers import (
    ModelFormatError,
    ModelHeaders,
    inside,
    read_hub_model,
    read_model_folder,
)
from service.spec import (
    DERIVED_FIELDS,
    Problem,
    StudySpec,
    StudyValidationError,
    problems_from_pydantic,
)
from service.spec_limits import MAX_TASK_DIRS
from workers.memory_plan import (  # torch-free
    MAX_EVAL_TOKENS,
    DoesNotFit,
    MemoryPlan,
    WorkerLimits,
    dtype_name,
    eval_facts,
    facts_from_tensors,
    limits_from_settings,
    plan_json,
    plan_memory,
)

Loc = list[Union[str, int]]
StudyResolver = Callable[[StudyRef], Union[str, Path]]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_BUILTIN_TASKS = "evomerge:"
# dtype names the merge engine knows (workers.model_io.dtype_from_name; keep in step)
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16", "float64", "fp64")


class SettingsLike(Protocol):
    """What validation needs from the server's settings (``service.settings``)."""

    model_roots: Sequence[Path]
    hub_allowlist: Sequence[str]
    trust_remote_code: bool


class ResolvedModel(BaseModel):
    """A model of the study as validation found it."""

    loc: Loc = Field(description="where the spec names it: ['sources', i] or ['base_model']")
    given: str = Field(description="as the spec wrote it (a study reference as its placeholder)")
    ref: str = Field(description="how recipes and workers name it: a real path, a hub id or a placeholder")
    origin: Literal["local", "hub", "study"]
    path: str | None = Field(description="the local folder read (hub: the cached snapshot, if any)")
    model_type: str
    num_layers: int
    hidden_size: int | None
    num_tensors: int


class ValidatedStudy(BaseModel):
    """A study that passed validation, with everything derived from its models filled in."""

    spec: StudySpec = Field(description="the spec as submitted")
    space_spec: dict[str, Any] = Field(description="the full space spec (models, layer counts)")
    space: dict[str, Any] = Field(description="the built space's describe(): dimension, genes, labels")
    evaluation: EvaluationSpec = Field(description="validated: directions resolved, task_dirs absolute")
    heldout_evaluation: EvaluationSpec | None = Field(
        description="what the best trials are re-scored with at the end (None: no held-out scoring)"
    )
    heldout_top_k: int = 0
    optimizer: OptimizerSpec = Field(description="with the study's seed and one direction per fitness value")
    multi_objective: bool
    models: list[ResolvedModel]
    study_refs: list[StudyRef] = Field(description="other studies' models the controller must resolve")
    trust_remote_code: bool = False
    worker_spec: dict[str, Any] = Field(description="fields of workers.trial.WorkerSpec")
    memory_plan: dict[str, Any] | None = Field(
        default=None, description="a worker's memory plan (workers.memory_plan.MemoryPlan as JSON): its "
        "tier, what it needs on the device and the host, and why the other tiers do or do not fit")
    warnings: list[str] = Field(default_factory=list, description="accepted, but worth a look")

    def build_space(self) -> SearchSpace:
        from search_spaces.registry import build_space

        return build_space(self.space_spec)


# ---- collecting problems ---------------------------------------------------------------
class _Refusal(Exception):
    def __init__(self, msg: str, fix: str, kind: str) -> None:
        super().__init__(msg)
        self.msg, self.fix, self.kind = msg, fix, kind


@dataclass
class _Problems:
    items: list[Problem] = field(default_factory=list)

    def add(self, loc: Sequence[Union[str, int]], msg: str, fix: str, kind: str = "invalid") -> None:
        self.items.append(Problem(loc=list(loc), msg=msg, fix=fix, type=kind))

    def refusal(self, loc: Sequence[Union[str, int]], err: _Refusal | ModelFormatError) -> None:
        self.add(loc, err.msg, err.fix, err.kind)

    def under(self, loc: Sequence[Union[str, int]]) -> bool:
        n = len(loc)
        return any(list(p.loc[:n]) == list(loc) for p in self.items)


# ---- paths under the roots -------------------------------------------------------------
def _real_roots(roots: Sequence[Union[str, Path]]) -> list[Path]:
    return [Path(os.path.realpath(r)) for r in roots]


def _roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none)"


def _close_entries(text: str, roots: Sequence[Path]) -> str:
    """' Close matches: …' among the folders next to where a relative path was looked for."""
    rel = Path(text)
    names: list[str] = []
    for root in roots:
        parent = root / rel.parent
        if parent.is_dir() and inside(Path(os.path.realpath(parent)), roots):
            try:
                names += [str(rel.parent / p.name) if str(rel.parent) != "." else p.name
                          for p in parent.iterdir() if p.is_dir()][:1000]
            except OSError:
                continue
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.6)
    return f" Close matches: {', '.join(close)}." if close else ""


def resolve_under_roots(text: str, roots: Sequence[Path], *, what: str = "model") -> Path:
    """The real path of a local path that must lie inside one of ``roots`` (real paths).

    Absolute paths are taken as they are; relative ones are looked up under each root in
    order. Symlinks are followed before the check, so a link that leads out is refused;
    the refusal never says whether the outside path exists.
    """
    missing = what.replace(" ", "_") + "_not_found"
    if not roots:
        raise _Refusal(
            f"{what} {text!r} is a local path, but this server allows no local paths (no model roots)",
            "ask an administrator to set EVOMERGE_MODEL_ROOTS, or use an allowed hub id",
            "no_model_roots",
        )
    if "\x00" in text:
        raise _Refusal(f"{what} path {text!r} is not a valid path", "remove the NUL character", "bad_path")
    path = Path(text)
    if path.is_absolute():
        candidate = path
    else:
        found = [r / path for r in roots if os.path.lexists(r / path)]
        if not found:
            escapes = not all(inside(Path(os.path.realpath(r / path)), roots) for r in roots)
            if ".." in path.parts and escapes:  # worded as for an existing path: existence is not told
                raise _Refusal(
                    f"{what} path {text!r} is outside the allowed roots ({_roots_text(roots)})",
                    f"copy or move the {what} into one of the roots (a symlink that points outside is "
                    "refused)",
                    "path_outside_roots",
                )
            raise _Refusal(
                f"{what} {text!r} not found under the allowed roots ({_roots_text(roots)})."
                f"{_close_entries(text, roots)}",
                "give its path relative to a root, or its absolute path inside one",
                missing,
            )
        candidate = found[0]
    real = Path(os.path.realpath(candidate))
    if not inside(real, roots):
        via = "resolves through a symlink to a location" if real != Path(os.path.abspath(candidate)) else "is"
        raise _Refusal(
            f"{what} path {text!r} {via} outside the allowed roots ({_roots_text(roots)})",
            f"copy or move the {what} into one of the roots (a symlink that points outside is refused)",
            "path_outside_roots",
        )
    if not real.exists():
        raise _Refusal(f"{what} {text!r} not found (looked at {candidate})",
                       "check the path; relative paths are relative to a root", missing)
    return real


# ---- models ----------------------------------------------------------------------------
@dataclass
class _Model:
    info: ResolvedModel
    headers: ModelHeaders
    spec_ref: Union[str, StudyRef]  # what the space spec names it by


def _allowed_hub(repo_id: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(repo_id, p) for p in patterns)


def _resolve_model(loc: Loc, ref: Union[str, StudyRef], settings: SettingsLike, roots: list[Path],
                   resolve_study_ref: StudyResolver | None) -> _Model:
    if isinstance(ref, StudyRef):
        return _resolve_study(loc, ref, resolve_study_ref)
    text = ref
    path = Path(text)
    local = path.is_absolute() or any(os.path.lexists(r / path) for r in roots)
    if not local and _HUB_ID.match(text) and ".." not in text:
        allowlist = list(getattr(settings, "hub_allowlist", []) or [])
        if not _allowed_hub(text, allowlist):
            raise _Refusal(
                f"{text!r} is not a folder under the model roots ({_roots_text(roots)}), and as a hub id it "
                f"is not in the allowlist EVOMERGE_HUB_ALLOWLIST ({', '.join(allowlist) or 'empty'})."
                f"{_close_entries(text, roots)}",
                "for a local model, check the path (relative paths are relative to a model root); for a hub "
                "model, ask an administrator to add it to EVOMERGE_HUB_ALLOWLIST (fnmatch patterns such "
                "as 'org/*')",
                "hub_not_allowed",
            )
        headers = read_hub_model(text, cache_dir=getattr(settings, "hub_cache_dir", None))
        info = _info(loc, text, text, "hub", headers)
        return _Model(info, headers, text)
    real = resolve_under_roots(text, roots)
    headers = read_model_folder(real, ref=text, allowed=roots)  # each file checked before it is opened
    info = _info(loc, text, str(real), "local", headers)
    return _Model(info, headers, str(real))


def _resolve_study(loc: Loc, ref: StudyRef, resolve_study_ref: StudyResolver | None) -> _Model:
    placeholder = ref.placeholder()
    if resolve_study_ref is None:
        raise _Refusal(
            f"{placeholder} names another study's model, which only the server's controller can resolve",
            "submit the study to the server (POST /studies), which knows the other studies",
            "study_ref_unresolved",
        )
    try:
        folder = Path(resolve_study_ref(ref))
    except (LookupError, ValueError, OSError) as err:
        raise _Refusal(
            f"{placeholder} cannot be used: {err}",
            f"name a study that exists and is finished (its model exported); trial is 'best' or a trial "
            f"number of study {ref.study!r}",
            "study_ref_invalid",
        ) from None
    headers = read_model_folder(folder, ref=placeholder)
    return _Model(_info(loc, placeholder, placeholder, "study", headers), headers, ref)


def _info(loc: Loc, given: str, ref: str, origin: str, headers: ModelHeaders) -> ResolvedModel:
    return ResolvedModel(
        loc=loc, given=given, ref=ref, origin=origin,  # type: ignore[arg-type]
        path=str(headers.path) if headers.path is not None else None,
        model_type=headers.model_type, num_layers=headers.num_layers, hidden_size=headers.hidden_size,
        num_tensors=len(headers.tensors),
    )


def _resolve_models(spec: StudySpec, settings: SettingsLike, problems: _Problems,
                    resolve_study_ref: StudyResolver | None) -> tuple[list[_Model | None], _Model | None]:
    roots = _real_roots(getattr(settings, "model_roots", []) or [])
    named: list[tuple[Loc, Union[str, StudyRef]]] = [(["sources", i], s) for i, s in enumerate(spec.sources)]
    if spec.base_model is not None:
        named.append((["base_model"], spec.base_model))
    out: list[_Model | None] = []
    for loc, ref in named:
        try:
            out.append(_resolve_model(loc, ref, settings, roots, resolve_study_ref))
        except (_Refusal, ModelFormatError) as err:
            problems.refusal(loc, err)
            out.append(None)
    seen: dict[str, Loc] = {}
    for m in out[: len(spec.sources)]:
        if m is None:
            continue
        if m.info.ref in seen:
            first = ".".join(map(str, seen[m.info.ref]))
            problems.add(m.info.loc, f"{m.info.given!r} is the same model as {first}",
                         "list each model once (stacking reuses layers with space.repeats)",
                         "duplicate_model")
        seen.setdefault(m.info.ref, m.info.loc)
    base = out[len(spec.sources)] if spec.base_model is not None else None
    return out[: len(spec.sources)], base


# ---- compatibility ---------------------------------------------------------------------
def _tensor_diffs(ref: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    diffs = [f"{n} missing" for n in sorted(set(ref) - set(other))]
    diffs += [f"{n} extra" for n in sorted(set(other) - set(ref))]
    diffs += [f"{n} {list(other[n].shape)} vs {list(ref[n].shape)}"
              for n in sorted(set(ref) & set(other)) if ref[n].shape != other[n].shape]
    return diffs


def _diff_text(diffs: list[str]) -> str:
    shown = "; ".join(diffs[:3])
    return f"{shown}{f'; and {len(diffs) - 3} more' if len(diffs) > 3 else ''}"


def _check_compatible(kind: str, models: list[_Model], problems: _Problems) -> None:
    """The first model is the reference (the base for a parameter space)."""
    ref = models[0]
    for other in models[1:]:
        a, b = ref.info, other.info
        if a.ref == b.ref:
            continue
        if a.model_type != b.model_type:
            problems.add(
                b.loc, f"model {b.given!r} is a {b.model_type} model, {a.given!r} a {a.model_type} model",
                "merge models of one architecture"
                + (" fine-tuned from one base" if kind == "parameter" else ""), "models_incompatible")
            continue
        if kind == "parameter":
            diffs = _tensor_diffs(ref.headers.comparable_tensors(), other.headers.comparable_tensors())
            if diffs:
                problems.add(
                    b.loc, f"model {b.given!r} does not match {a.given!r} tensor for tensor "
                    f"({len(diffs)} difference(s): {_diff_text(diffs)})",
                    "a parameter-space merge needs identical tensor names and shapes (models fine-tuned from "
                    "the same base); for models that only share an architecture and width use kind: stacking",
                    "models_incompatible")
            continue
        if a.hidden_size != b.hidden_size:
            problems.add(b.loc,
                         f"model {b.given!r} has hidden size {b.hidden_size}, {a.given!r} {a.hidden_size}",
                         "layer stacking needs one hidden size (layer counts may differ)",
                         "models_incompatible")
            continue
        diffs = _tensor_diffs(ref.headers.layer_tensors(), other.headers.layer_tensors())
        if diffs:
            problems.add(
                b.loc, f"the layers of {b.given!r} differ from those of {a.given!r} "
                f"({len(diffs)} difference(s) in a layer: {_diff_text(diffs)})",
                "layer stacking needs layers that fit into one another: one architecture and width",
                "models_incompatible")


# ---- the space -------------------------------------------------------------------------
def _map_space_loc(loc: Sequence[Union[str, int]]) -> Loc:
    """A location in the full space spec -> where the user wrote it."""
    loc = list(loc)
    if loc[:1] == ["sources"]:  # stacking: sources[i] is the study's sources[i] with its layer range
        return ["space", "layer_ranges", *loc[1:2]]
    if loc[:1] == ["models"]:
        return ["sources", *loc[1:2]]
    if loc[:1] == ["base_model"]:
        return ["base_model"]
    if loc[:1] == ["num_layers"] or not loc:
        return ["space"]
    return ["space", *loc]


def _space_spec(spec: StudySpec, sources: list[_Model], base: _Model | None,
                aliases: Mapping[str, str], problems: _Problems) -> dict[str, Any] | None:
    form = spec.space
    kind = form.kind  # type: ignore[union-attr]
    data = form.model_dump(exclude={*DERIVED_FIELDS[kind], "layer_ranges"})
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        if tok in aliases:
            data["tokenizer_source"] = aliases[tok]
        else:
            problems.add(["space", "tokenizer_source"],
                         f"tokenizer_source {tok!r} is not one of the study's models",
                         "write 'base', or a model exactly as it appears in sources / base_model",
                         "unknown_model")
            return None
    if kind == "parameter":
        from search_spaces.parameter_space import METHODS

        info = METHODS[data["method"]]
        if info.needs_base and base is None:
            problems.add(["base_model"],
                         f"{data['method']} merges task vectors against a base: base_model is missing",
                         "set base_model to the model the sources were fine-tuned from (or use method: "
                         "linear)", "missing_base_model")
            return None
        if info.needs_base and base is not None:
            for m in sources:
                if m.info.ref == base.info.ref:
                    problems.add(m.info.loc,
                                 f"{m.info.given!r} is the base model; the base is not a merged source",
                                 "remove it from sources (it stays base_model)", "base_among_sources")
                    return None
        ref = base or sources[0]
        data.update(models=[m.spec_ref for m in sources], base_model=base.spec_ref if base else None,
                    num_layers=ref.info.num_layers)
    elif kind == "stacking":
        ranges = form.layer_ranges  # type: ignore[union-attr]
        if ranges is not None and len(ranges) != len(sources):
            problems.add(["space", "layer_ranges"],
                         f"layer_ranges has {len(ranges)} entries for {len(sources)} sources",
                         "give one entry per source, in the order of sources (null: all its layers)",
                         "layer_ranges_mismatch")
            return None
        data.update(
            sources=[{"model": m.spec_ref, "num_layers": m.info.num_layers,
                      "layer_range": ranges[i] if ranges else None} for i, m in enumerate(sources)],
            base_model=base.spec_ref if base else None,
        )
    else:  # pragma: no cover - SPACE_FORMS only holds kinds listed in DERIVED_FIELDS
        problems.add(["space", "kind"], f"space kind {kind!r} is not supported by the service",
                     "use kind: parameter or kind: stacking", "unknown_space_kind")
        return None
    return data


def _check_dtypes(spec: StudySpec, problems: _Problems) -> None:
    for key in ("dtype", "out_dtype"):
        value = getattr(spec.space, key, None)
        if value is not None and value not in DTYPE_NAMES:
            close = difflib.get_close_matches(str(value), DTYPE_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.add(["space", key], f"unknown dtype {value!r}{hint}",
                         "use float32, bfloat16, float16 or float64", "unknown_dtype")


def _build_space(data: dict[str, Any], problems: _Problems) -> SearchSpace | None:
    from search_spaces.registry import build_space

    try:
        space = build_space(data)
    except ValidationError as err:
        for p in problems_from_pydantic(err):
            problems.add(_map_space_loc(p.loc), p.msg, "change the space as the message says",
                         "space_invalid")
        return None
    except ValueError as err:
        problems.add(["space"], str(err), "change the space as the message says", "space_invalid")
        return None
    if space.dimension < 1:
        problems.add(["space"], "the space has no genes: there is nothing to search",
                     "search at least one parameter (e.g. search_density: true, or scales)", "space_empty")
        return None
    return space


# ---- evaluation ------------------------------------------------------------------------
def _check_eval_paths(evaluation: EvaluationSpec, spec: StudySpec, settings: SettingsLike,
                      problems: _Problems) -> EvaluationSpec:
    """Task directories and text files must lie under the roots too; made absolute and real."""
    roots = _real_roots(getattr(settings, "task_roots", None) or getattr(settings, "model_roots", []) or [])
    options = dict(evaluation.options)
    task_dirs = options.get("task_dirs")
    if isinstance(task_dirs, list) and len(task_dirs) > MAX_TASK_DIRS:
        problems.add(["evaluation", "options", "task_dirs"],
                     f"{len(task_dirs)} task directories, more than {MAX_TASK_DIRS}",
                     "put the task YAML files into fewer folders", "too_many_task_dirs")
    elif isinstance(task_dirs, list):
        checked = [_task_dir(d, roots, problems, ["evaluation", "options", "task_dirs", j])
                   for j, d in enumerate(task_dirs)]
        options["task_dirs"] = [d for d in checked if d is not None]
    if isinstance(options.get("text_files"), Mapping):
        files = {}
        for key, f in options["text_files"].items():
            try:
                files[key] = str(resolve_under_roots(str(f), roots, what="text file"))
            except _Refusal as err:
                problems.refusal(["evaluation", "options", "text_files", key], err)
        options["text_files"] = files
    hflm = options.get("hflm_args")
    if isinstance(hflm, Mapping) and hflm.get("trust_remote_code") and not spec.trust_remote_code:
        problems.add(["evaluation", "options", "hflm_args", "trust_remote_code"],
                     "hflm_args.trust_remote_code needs the study's trust_remote_code",
                     "remove it (evomerge hands lm-eval an in-memory model)", "trust_remote_code_refused")
    return evaluation.model_copy(update={"options": options})


def _task_dir(given: Any, roots: Sequence[Path], problems: _Problems, loc: Loc) -> str | None:
    """A task directory as the evaluator gets it (``evomerge:NAME`` as given, else its real path),
    or None with a problem: a packaged folder is looked up by name only, and a folder under the
    roots must lead nowhere outside them (service.task_dirs)."""
    from evaluators.base import SpecError
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
        real = resolve_under_roots(text, roots, what="task directory")
        if not real.is_dir():
            raise _Refusal(f"task directory {text!r} is not a folder", "give the folder of the task YAML "
                           "files", "task_directory_not_found")
        audit_task_dir(real, roots)
    except (_Refusal, TaskDirRefusal) as err:
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


def check_evaluation(evaluation: EvaluationSpec, problems: _Problems, loc: Loc,
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


def _heldout(spec: StudySpec, evaluation: EvaluationSpec, problems: _Problems) -> EvaluationSpec | None:
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


# ---- optimizer -------------------------------------------------------------------------
def _canonical_recipe(recipe: Recipe, aliases: Mapping[str, str]) -> Recipe:
    """The recipe with models named as the space names them (real paths)."""
    return recipe.with_models_renamed(lambda name: aliases.get(name, name))


def _optimizer(spec: StudySpec, n_objectives: int | None, space: SearchSpace | None,
               aliases: Mapping[str, str], problems: _Problems) -> OptimizerSpec | None:
    from search_spaces import optimizers

    opt = spec.optimizer
    start = len(problems.items)
    cls = optimizers.get(opt.name)  # known: OptimizerSpec checked the name
    seed = spec.seed
    if "seed" in opt.model_fields_set:
        if "seed" in spec.model_fields_set and opt.seed != spec.seed:
            problems.add(["optimizer", "seed"], f"two seeds: optimizer.seed {opt.seed} and seed {spec.seed}",
                         "set the seed once, at the top level (seed)", "two_seeds")
        seed = opt.seed
    multi = spec.multi_objective
    if multi and n_objectives is not None and n_objectives < 2:
        problems.add(["multi_objective"], f"a multi-objective study needs two or more objectives, "
                     f"it has {n_objectives}", "add objectives, or set multi_objective: false",
                     "multi_objective_one_objective")
    if multi and not cls.multi_objective:
        capable = [n for n in optimizers.names() if optimizers.get(n).multi_objective]
        problems.add(["optimizer", "name"],
                     f"{opt.name} optimizes one objective; this study is multi-objective",
                     f"use {', '.join(capable)} (nsga2 is made for it), or set multi_objective: false to "
                     "optimize the weighted sum", "optimizer_single_objective")
    want = (n_objectives or 0) if multi else 1
    if "directions" in opt.model_fields_set:
        if any(d != "maximize" for d in opt.directions):
            problems.add(["optimizer", "directions"], "a direction is 'minimize', but evomerge orients every "
                         "objective so that higher is better (a lower-is-better metric such as perplexity "
                         "enters negated)", "remove optimizer.directions; override a metric's direction with "
                         "higher_is_better on its objective", "directions_minimize")
        elif n_objectives is not None and len(opt.directions) != want:
            if not multi:
                msg = (f"optimizer.directions has {len(opt.directions)} entries, but the study is single-"
                       "objective (the weighted sum of its objectives)")
                fix = "set multi_objective: true for a Pareto search, or remove optimizer.directions"
            else:
                msg = f"optimizer.directions has {len(opt.directions)} entries for {n_objectives} objectives"
                fix = "remove optimizer.directions (one 'maximize' per objective is derived)"
            problems.add(["optimizer", "directions"], msg, fix, "directions_mismatch")
    unknown = sorted(set(opt.options) - set(cls.known_options))
    for key in unknown:
        problems.add(["optimizer", "options", key], f"{opt.name} has no option {key!r}",
                     f"{opt.name} takes: {', '.join(sorted(cls.known_options)) or 'no options'}",
                     "unknown_option")
    if len(problems.items) > start or n_objectives is None:
        return None
    filled = opt.model_copy(update={"seed": seed, "directions": ["maximize"] * want})
    if space is None:
        return filled
    if filled.x0 is not None:
        x0 = _canonical_recipe(filled.x0, aliases)
        try:
            space.encode(x0)
        except (RecipeNotInSpace, ValueError) as err:
            problems.add(["optimizer", "x0"], f"the start recipe is not in the space: {err}",
                         "change x0 to a recipe the space expresses, or widen the space", "x0_not_in_space")
            return None
        filled = filled.model_copy(update={"x0": x0})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizers.create_optimizer(filled, space)  # a dry run, in memory
    except ValueError as err:  # OptimizerError is a ValueError
        problems.add(["optimizer"], str(err), "change the optimizer as the message says", "optimizer_invalid")
        return None
    return filled


# ---- the whole study -------------------------------------------------------------------
def _budget_warnings(spec: StudySpec, space: SearchSpace | None) -> list[str]:
    out = []
    trials = spec.budget.max_trials
    if trials is not None and trials < spec.parallelism:
        out.append(f"parallelism {spec.parallelism} exceeds max_trials {trials}: some workers will stay idle")
    cma = "cma" in spec.optimizer.name
    if trials is not None and space is not None and cma and trials < 10 * space.dimension:
        out.append(f"CMA-ES needs on the order of 10–30 × d evaluations; with d = {space.dimension} genes, "
                   f"{trials} trials may end before it converges (a coarser granularity lowers d)")
    if spec.heldout is not None and trials is not None and spec.heldout.top_k > trials:
        out.append(f"heldout.top_k {spec.heldout.top_k} exceeds max_trials {trials}: "
                   "every trial is re-scored")
    return out


def validate_study(spec: StudySpec | Mapping[str, Any], settings: SettingsLike, *,
                   resolve_study_ref: StudyResolver | None = None) -> ValidatedStudy:
    """Check everything a study needs before any compute; raise :class:`StudyValidationError`
    listing every problem, or return the :class:`ValidatedStudy`.

    ``resolve_study_ref(StudyRef) -> folder`` gives, for a ``{study: …}`` source, a model
    folder whose headers stand for that study's model (its exported best model, or for a
    parameter-space study any of its sources: the merge keeps their shapes); it raises
    ``LookupError`` (or ``ValueError``) with a message when the study cannot be used.
    """
    if not isinstance(spec, StudySpec):
        spec = StudySpec.from_data(spec)
    problems = _Problems()
    if spec.trust_remote_code and not bool(getattr(settings, "trust_remote_code", False)):
        problems.add(["trust_remote_code"], "this server does not run code shipped with models",
                     "set trust_remote_code: false (or ask an administrator to set "
                     "EVOMERGE_TRUST_REMOTE_CODE)", "trust_remote_code_refused")
    _check_dtypes(spec, problems)
    models = _models_and_space(spec, settings, problems, resolve_study_ref)
    evaluation = heldout = None
    if spec.evaluation.subset != "search":
        problems.add(["evaluation", "subset"], "a search scores its candidates on the search subset",
                     "remove evaluation.subset; held-out scoring at the end is set with `heldout`",
                     "subset_holdout")
    evaluation_in = _check_eval_paths(spec.evaluation, spec, settings, problems)
    if not problems.under(["evaluation", "options"]):
        evaluation = check_evaluation(evaluation_in, problems, ["evaluation"])
    if evaluation is not None:
        heldout = _heldout(spec, evaluation, problems)
    optimizer = _optimizer(spec, len(spec.evaluation.objectives), models.space, models.aliases, problems)
    plan = _memory_plan(spec, models, settings, problems) if models.space is not None else None

    if problems.items:
        raise StudyValidationError(sorted(problems.items, key=_spec_order))
    assert models.space is not None and evaluation is not None and optimizer is not None and plan is not None
    return ValidatedStudy(
        spec=spec,
        space_spec=models.space.spec.model_dump(mode="json"),
        space=models.space.describe(),
        evaluation=evaluation,
        heldout_evaluation=heldout,
        heldout_top_k=spec.heldout.top_k if spec.heldout is not None else 0,
        optimizer=optimizer,
        multi_objective=spec.multi_objective,
        models=[m.info for m in models.resolved],
        study_refs=list(dict.fromkeys(m.spec_ref for m in models.resolved
                                      if isinstance(m.spec_ref, StudyRef))),
        trust_remote_code=spec.trust_remote_code,
        worker_spec=_worker_spec(spec, models, evaluation, plan),
        memory_plan=plan_json(plan),
        warnings=[*models.warnings, *_budget_warnings(spec, models.space)],
    )


@dataclass
class _Models:
    """The study's models as read, and the space built over them (None where they fail)."""

    sources: list[_Model | None]
    base: _Model | None
    space: SearchSpace | None = None
    space_data: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def resolved(self) -> list[_Model]:
        return [m for m in [*self.sources, self.base] if m is not None]

    @property
    def aliases(self) -> dict[str, str]:
        """Model names as the user may write them (in x0, tokenizer_source) -> as the space names them."""
        return {name: m.info.ref for m in self.resolved for name in (m.info.given, m.info.ref)}


def _models_and_space(spec: StudySpec, settings: SettingsLike, problems: _Problems,
                      resolve_study_ref: StudyResolver | None) -> _Models:
    sources, base = _resolve_models(spec, settings, problems, resolve_study_ref)
    out = _Models(sources, base)
    kind = spec.space.kind  # type: ignore[union-attr]
    present = [m for m in sources if m is not None]
    group = ([base] if base is not None else []) + present
    if kind == "stacking" and base is not None and any(m.info.ref == base.info.ref for m in present):
        group = present
    n_before = len(problems.items)
    if group:
        _check_compatible(kind, group, problems)  # among the models that could be read
    models_ok = len(present) == len(sources) and (spec.base_model is None or base is not None)
    if len(problems.items) == n_before and models_ok and not problems.under(["space"]):
        out.space_data = _space_spec(spec, present, base, out.aliases, problems)
        if out.space_data is not None:
            out.space = _build_space(out.space_data, problems)
    for m in out.resolved:
        if m.headers.has_remote_code and not spec.trust_remote_code:
            out.warnings.append(
                f"model {m.info.given!r} names custom code in config.json (auto_map); evomerge loads it "
                f"with transformers' own {m.info.model_type} class and never runs that code")
    tokenizer = _tokenizer_ref(out)
    tok_model = next((m for m in out.resolved if m.info.ref == tokenizer), None)
    if tok_model is not None and tok_model.headers.has_tokenizer is False:
        chosen = out.space_data and out.space_data.get("tokenizer_source") not in (None, "base")
        problems.add(["space", "tokenizer_source"] if chosen else tok_model.info.loc,
                     f"model {tok_model.info.given!r} has no tokenizer files (tokenizer.json, "
                     "tokenizer_config.json, tokenizer.model or vocab.json); candidates are scored with "
                     "its tokenizer",
                     "copy the tokenizer files into that folder, or set space.tokenizer_source to a model "
                     "that has them", "no_tokenizer")
    return out


def _tokenizer_ref(models: _Models) -> str | None:
    """The model whose tokenizer scores the candidates (the recipe's tokenizer source)."""
    tok = (models.space_data or {}).get("tokenizer_source")
    if tok not in (None, "base"):
        return str(tok)
    owner = models.base if models.base is not None else (models.sources[0] if models.sources else None)
    return owner.info.ref if owner is not None else None


def _worker_refs(spec: StudySpec, models: _Models) -> tuple[list[str], str | None]:
    """(every model a worker loads, the base first; the base of the task vectors). A parameter
    space computes task vectors against its base; stacking needs none (its base only lends
    embeddings and head)."""
    base = models.base.info.ref if models.base is not None else None
    task_vector_base = base if spec.space.kind == "parameter" else None  # type: ignore[union-attr]
    refs = list(dict.fromkeys(m.info.ref for m in models.resolved))
    if task_vector_base is not None:
        refs = [task_vector_base, *(r for r in refs if r != task_vector_base)]
    return refs, task_vector_base


def _worker_spec(spec: StudySpec, models: _Models, evaluation: EvaluationSpec,
                 plan: MemoryPlan) -> dict[str, Any]:
    """The fields of ``workers.trial.WorkerSpec``: the models, the evaluation, and the memory plan
    (``dtype`` and ``tier`` as the spec gives them: a worker resolves auto as the plan did, with its
    own resources; the API's plan goes along for the record)."""
    refs, task_vector_base = _worker_refs(spec, models)
    stacking = spec.space.kind == "stacking"  # type: ignore[union-attr]
    depth = getattr(getattr(models.space, "spec", None), "depth_bounds", None)
    return {
        "sources": refs,
        "base_model": task_vector_base,
        "evaluation": evaluation.model_dump(mode="json"),
        "tokenizer": _tokenizer_ref(models),
        "multi_objective": spec.multi_objective,
        "dtype": spec.worker.dtype,
        "tier": spec.worker.tier,
        "cache_task_vectors": spec.worker.cache_task_vectors,
        "method": "passthrough" if stacking else str(models.space.spec.method),  # type: ignore[union-attr]
        "stacking_layers": int(depth[1]) if stacking and depth else None,
        "memory_plan": plan_json(plan),
    }


# ---- memory ----------------------------------------------------------------------------
def worker_limits(settings: SettingsLike) -> WorkerLimits:
    """What one worker may use: the server's ``worker_limits()``, or for a stand-in settings
    object the same rule over its attributes (a CPU worker on this machine by default)."""
    own = getattr(settings, "worker_limits", None)
    if callable(own):
        return own()
    return limits_from_settings(
        num_gpus=float(getattr(settings, "worker_num_gpus", 0.0) or 0.0),
        device_memory=getattr(settings, "worker_device_memory", None),
        host_memory=getattr(settings, "worker_host_memory", None),
        remote=bool(getattr(settings, "ray_address", None)),
        workers_per_host=int(getattr(settings, "max_workers", 1) or 1))


def _eval_tokens(evaluation: EvaluationSpec) -> int | None:
    """The padded length of an evaluation batch, where the evaluation's options say it."""
    options = evaluation.options if isinstance(evaluation.options, Mapping) else {}
    hflm = options.get("hflm_args")
    for value in (options.get("max_length"), hflm.get("max_length") if isinstance(hflm, Mapping) else None):
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_EVAL_TOKENS:
            return value
    return None


def _plan_dtype(spec: StudySpec) -> str:
    """The candidate's dtype as the plan takes it: worker.dtype, or for auto what the worker makes
    of auto (workers.candidate): the space's out_dtype, else the base's own dtype."""
    if spec.worker.dtype != "auto":
        return spec.worker.dtype
    return dtype_name(str(getattr(spec.space, "out_dtype", None) or "")) or "auto"


def _memory_plan(spec: StudySpec, models: _Models, settings: SettingsLike,
                 problems: _Problems) -> MemoryPlan | None:
    """The memory plan of one worker, from the headers already read; a study that no tier (or not
    the tier asked for) can hold is a ``does_not_fit`` problem at ``worker``."""
    assert models.space is not None
    refs, task_vector_base = _worker_refs(spec, models)
    by_ref = {m.info.ref: m for m in models.resolved}
    facts = [facts_from_tensors(ref, ((n, h.shape, h.dtype) for n, h in by_ref[ref].headers.tensors.items()),
                                by_ref[ref].headers.config) for ref in refs]
    stacking = spec.space.kind == "stacking"  # type: ignore[union-attr]
    owner = task_vector_base
    if stacking:
        owner = models.base.info.ref if models.base is not None else refs[0]
    elif owner is None:
        owner = refs[0]
    depth = getattr(getattr(models.space, "spec", None), "depth_bounds", None)
    config = by_ref[owner].headers.config
    try:
        return plan_memory(
            sources=facts, base=owner if stacking else task_vector_base,
            method="passthrough" if stacking else str(models.space.spec.method),  # type: ignore[attr-defined]
            stacking_layers=int(depth[1]) if stacking and depth else None,
            candidate_dtype=_plan_dtype(spec), limits=worker_limits(settings),
            evaluation=eval_facts(config, spec.evaluation.batch_size, _eval_tokens(spec.evaluation)),
            tier=spec.worker.tier, cache_task_vectors=spec.worker.cache_task_vectors)
    except DoesNotFit as err:
        problems.add(["worker"], err.msg, err.fix, "does_not_fit")
    except ValueError as err:  # headers the planner cannot size (every number it reads is bounded)
        problems.add(["worker"], f"the workers' memory cannot be planned: {err}",
                     "check the models' headers (config.json and safetensors); the message names what is "
                     "out of bounds", "memory_plan_invalid")
    return None


def _spec_order(p: Problem) -> tuple[int, int]:
    """Problems in the order of the spec's fields (and of list items within a field)."""
    fields = list(StudySpec.model_fields)
    first = fields.index(p.loc[0]) if p.loc and p.loc[0] in fields else -1
    second = p.loc[1] if len(p.loc) > 1 and isinstance(p.loc[1], int) else -1
    return first, second
