"""Check objectives against lm-eval's task index before any compute (no model, no torch).

Task names resolve through an lm-eval ``TaskManager`` (one per process and set of task
directories): local task directories first; lm-eval's built-in tasks are indexed only
when a name is not found locally (building that index takes ~10 s, once).
"""

from __future__ import annotations

import contextvars
import difflib
import functools
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluators.base import ObjectiveSpec, SpecError


@functools.lru_cache(maxsize=8)
def _task_manager(task_dirs: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(task_dirs) or None, include_defaults=include_defaults)


# ---- lm-eval's built-in index: ~10–20 s to build, once per process -------------------------------
# A request must not wait that long (validation is bounded in time): where the caller says so
# (the API, through ``builtin_index_policy``), a spec that needs the built-in index while it is
# still being built is answered with ``IndexNotReady`` and the index is built in the background.
builtin_index_policy: contextvars.ContextVar[str] = contextvars.ContextVar("builtin_index_policy",
                                                                          default="wait")
_built: set[tuple[tuple[str, ...], bool]] = set()  # task managers this process has finished
_building: dict[tuple[tuple[str, ...], bool], threading.Thread] = {}
_building_lock = threading.Lock()


class IndexNotReady(SpecError):
    """lm-eval's built-in task index is being built; ask again in a moment."""


def warm_builtin_index(dirs: tuple[str, ...] = ()) -> None:
    """Build the task manager of ``dirs`` with lm-eval's built-in tasks in a background thread
    (once; nothing to do when it is built or being built)."""
    key = (dirs, True)
    with _building_lock:
        if key in _built or (key in _building and _building[key].is_alive()):
            return

        def build() -> None:
            _task_manager(*key)
            _built.add(key)

        _building[key] = threading.Thread(target=build, name="lm-eval-task-index", daemon=True)
        _building[key].start()


def _manager(dirs: tuple[str, ...], with_builtins: bool):
    """The task manager of ``dirs`` (with lm-eval's built-in tasks or not); ``IndexNotReady`` when
    the built-in index is still to be built and the caller's policy is not to wait for it."""
    key = (dirs, with_builtins)
    if with_builtins and key not in _built and builtin_index_policy.get() != "wait":
        warm_builtin_index(dirs)
        raise IndexNotReady(
            "lm-eval's index of its built-in tasks is being built (once per server start, about 20 s); "
            "submit again in a moment, or name task_dirs that hold all the tasks"
        )
    manager = _task_manager(*key)
    _built.add(key)
    return manager


BUILTIN_PREFIX = "evomerge:"  # "evomerge:zoo" is the package's evaluators/tasks/zoo
BUILTIN_TASKS = Path(__file__).resolve().parent / "tasks"
_PACKAGED_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def packaged_task_dirs() -> dict[str, Path]:
    """The task folders shipped in this package, by name (``zoo``): the only folders an
    ``evomerge:NAME`` reference can reach. Listed from the package, never from the user's text."""
    return {p.name: p for p in sorted(BUILTIN_TASKS.iterdir())
            if p.is_dir() and _PACKAGED_NAME.match(p.name)}


def packaged_task_dir(text: str) -> Path:
    """The folder of ``evomerge:NAME``; a ``SpecError`` for anything but a packaged folder's name
    (a path, ``..``, an unknown name): it is looked up by name, never joined as a path."""
    name = text[len(BUILTIN_PREFIX):] if text.startswith(BUILTIN_PREFIX) else text
    known = packaged_task_dirs()
    if name not in known:
        listed = ", ".join(f"{BUILTIN_PREFIX}{n}" for n in known) or "none"
        raise SpecError(f"{text!r} is not a packaged task folder: {BUILTIN_PREFIX} takes a name, never a "
                        f"path; the packaged folders are: {listed}")
    return known[name]


def normalize_dirs(task_dirs: Sequence[str | Path]) -> tuple[str, ...]:
    """Absolute, existing task directories, in a stable form for caching.

    ``evomerge:NAME`` names a task directory shipped in this package (``evomerge:zoo``).
    """
    out = []
    for d in task_dirs:
        text = str(d)
        if text.startswith(BUILTIN_PREFIX):
            p = packaged_task_dir(text)
        else:
            p = Path(d).expanduser().resolve()
        if not p.is_dir():
            raise SpecError(f"task directory {text!r} does not exist (or is not a directory)")
        out.append(str(p))
    return tuple(dict.fromkeys(out))


def needs_defaults(dirs: tuple[str, ...], names: Sequence[str], include_defaults: bool | None) -> bool:
    """Whether lm-eval's built-in tasks must be indexed: only if some name is not local."""
    if include_defaults is not None:
        return include_defaults
    return not dirs or not set(names) <= set(_task_manager(dirs, False).task_index)


def task_manager(task_dirs: Sequence[str | Path] = (), names: Sequence[str] = (),
                 include_defaults: bool | None = None):
    """The process's ``TaskManager`` for these directories (see ``needs_defaults``)."""
    dirs = normalize_dirs(task_dirs)
    return _manager(dirs, needs_defaults(dirs, names, include_defaults))


def _close(word: str, pool: Sequence[str], n: int = 5) -> str:
    close = difflib.get_close_matches(word, list(pool), n=n, cutoff=0.6)
    return f" Close matches: {', '.join(close)}." if close else ""


def _trigrams(word: str) -> set[str]:
    padded = f"  {word.lower()} "
    return {padded[i:i + 3] for i in range(len(padded) - 2)}


class _NameIndex:
    """Close-match lookup over a task index's names (lm-eval's has ~15,000): candidates are the
    names sharing the most character trigrams with the word, then difflib ranks those. A lookup
    costs milliseconds instead of difflib's ~0.1 s over every name."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.by_gram: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            for gram in _trigrams(name):
                self.by_gram.setdefault(gram, []).append(i)

    def close(self, word: str, n: int = 5, pool: int = 200) -> str:
        counts: dict[int, int] = {}
        for gram in _trigrams(word):
            for i in self.by_gram.get(gram, ()):
                counts[i] = counts.get(i, 0) + 1
        best = sorted(counts, key=lambda i: -counts[i])[:pool]
        return _close(word, [self.names[i] for i in best], n=n)


def _declared_metrics(entry) -> tuple[list[str], list[str] | None, dict[str, bool]]:
    """(metric names, filter names or None if unknown, declared higher_is_better)."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    cfg: dict[str, Any] = entry.cfg or {}
    kind = entry.kind.name
    if kind == "GROUP":
        aggs = cfg.get("aggregate_metric_list") or []
        if isinstance(aggs, dict):
            aggs = [aggs]
        names = [str(a["metric"]) for a in aggs if isinstance(a, dict) and "metric" in a]
        filters = sorted({f for a in aggs if isinstance(a, dict) for f in (a.get("filter_list") or [])})
        return names, (filters or None), {}
    metric_list = cfg.get("metric_list")
    if metric_list:
        names = [str(m["metric"]) for m in metric_list if isinstance(m, dict) and "metric" in m]
        hib = {str(m["metric"]): bool(m["higher_is_better"]) for m in metric_list
               if isinstance(m, dict) and "higher_is_better" in m}
    else:
        names, hib = list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), [])), {}
    filter_list = cfg.get("filter_list")
    filters = [str(f["name"]) for f in filter_list if isinstance(f, dict)] if filter_list else ["none"]
    return names, filters, hib


def resolve_metric(entry, spec: ObjectiveSpec) -> tuple[str, bool]:
    """The results key (``metric,filter``) and direction of ``spec`` on a task index entry."""
    from lm_eval.api.registry import is_higher_better

    kind = entry.kind.name
    if kind == "TAG":
        members = sorted(entry.tags)
        raise SpecError(
            f"{spec.task!r} is a tag for {len(members)} tasks ({', '.join(members[:8])}"
            f"{', …' if len(members) > 8 else ''}): name the tasks one objective each"
        )
    metric, _, wanted_filter = spec.metric.partition(",")
    if kind == "PY_TASK":  # a Python-defined task: its metrics are known only once it runs
        key = spec.metric if wanted_filter else f"{metric},none"
        hib = spec.higher_is_better
        return key, hib if hib is not None else bool(is_higher_better(metric) is not False)
    names, filters, declared = _declared_metrics(entry)
    if kind == "GROUP" and not names:
        raise SpecError(
            f"group {spec.task!r} reports no aggregate metric (no aggregate_metric_list): "
            "score its tasks as separate objectives instead"
        )
    if metric not in names:
        raise SpecError(
            f"task {spec.task!r} has no metric {metric!r}.{_close(metric, names)} "
            f"Its metrics: {', '.join(names) or '(none declared)'}"
        )
    if wanted_filter:
        if filters is not None and wanted_filter not in filters:
            raise SpecError(
                f"task {spec.task!r} has no filter {wanted_filter!r} for {metric!r}."
                f"{_close(wanted_filter, filters)} Its filters: {', '.join(filters)}"
            )
        filt = wanted_filter
    elif filters is None or len(filters) == 1:
        filt = filters[0] if filters else "none"
    else:
        options = ", ".join(f"{metric},{f}" for f in filters)
        raise SpecError(
            f"task {spec.task!r} reports {metric!r} under several filters; name one as the metric: {options}"
        )
    if spec.higher_is_better is not None:
        hib = spec.higher_is_better
    elif metric in declared:
        hib = declared[metric]
    else:
        hib = is_higher_better(metric)
        hib = True if hib is None else bool(hib)
    return f"{metric},{filt}", hib


def validate_objectives(specs: Sequence[ObjectiveSpec], task_dirs: Sequence[str | Path] = (),
                        *, include_defaults: bool | None = None) -> list[ObjectiveSpec]:
    """Check that every objective names a known task and one of its metrics.

    Returns the specs with ``higher_is_better`` filled in. Raises ``SpecError`` listing
    every problem, each with the close matches among known names.
    """
    dirs = normalize_dirs(task_dirs)
    with_defaults = needs_defaults(dirs, [s.task for s in specs], include_defaults)
    manager = _manager(dirs, with_defaults)
    index = manager.task_index
    names = _index_names(manager)
    where = " and ".join(
        [*([", ".join(dirs)] if dirs else []), *(["lm-eval's built-in tasks"] if with_defaults else [])]
    ) or "nowhere: no task directories and built-in tasks off"
    problems: list[str] = []
    out: list[ObjectiveSpec] = []
    for spec in specs:
        entry = index.get(spec.task)
        if entry is None:
            close = names.close(spec.task)
            problems.append(f"unknown task {spec.task!r} (looked in {where}).{close}")
            continue
        try:
            _, hib = resolve_metric(entry, spec)
        except SpecError as err:
            problems.append(str(err))
            continue
        out.append(spec.model_copy(update={"higher_is_better": hib}))
    problems += _inconsistent_settings(specs)
    if problems:
        raise SpecError("; ".join(problems) if len(problems) == 1 else "\n- " + "\n- ".join(problems))
    return out


def _index_names(manager) -> _NameIndex:
    """The task index's names, indexed for close matches once per task manager."""
    names = getattr(manager, "_evomerge_names", None)
    if names is None:
        names = _NameIndex(list(manager.task_index))
        manager._evomerge_names = names
    return names


def _inconsistent_settings(specs: Sequence[ObjectiveSpec]) -> list[str]:
    """A task is built once per worker: its objectives must agree on how it is run."""
    seen: dict[str, tuple] = {}
    problems = []
    for s in specs:
        setting = (s.limit, s.num_fewshot, s.split)
        if seen.setdefault(s.task, setting) != setting:
            problems.append(
                f"objectives on task {s.task!r} disagree on (limit, num_fewshot, split): "
                f"{seen[s.task]} vs {setting}; use the same settings for one task"
            )
    return problems
