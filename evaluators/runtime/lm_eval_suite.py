"""lm-eval tasks built once per worker, scored per candidate without rebuilding anything.

What ``lm_eval.simple_evaluate`` does per call (index tasks, load datasets, render
prompts, build ``Instance`` objects, collect environment info with subprocesses) is done
here once; a trial only runs the requests through the model, then each task's filters,
``process_results`` and aggregation — lm-eval's own code, so the scores are the same.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.base import EvaluationError, ObjectiveSpec, SpecError
from evaluators.subsets import rung_ranks, select_indices
from evaluators.validation import normalize_dirs, resolve_metric, task_manager

_DOC_FIELDS = ("doc_to_target", "doc_to_choice", "doc_to_text")


def _remember_doc_fields(task, docs: Sequence[Any]) -> None:
    """Compute each scored document's target/choices/text once, not on every trial.

    ``process_results`` calls ``doc_to_target`` (and ``doc_to_choice``) per document, and
    lm-eval compiles the Jinja template anew on each call: for a small model that costs
    more than the forward passes. The values depend on the document only, so they are
    kept, per document object, for the documents this suite scores.
    """
    for name in _DOC_FIELDS:
        original = getattr(type(task), name)
        if name == "doc_to_choice" and getattr(task.config, "doc_to_choice", None) is None:
            continue
        try:
            table = {id(doc): (doc, original(task, doc)) for doc in docs}
        except Exception:  # a field this task does not define: leave it alone
            continue

        def remembered(doc, *args, _table=table, _original=original, **kwargs):
            hit = _table.get(id(doc))
            if hit is None or hit[0] is not doc or args or kwargs:
                return _original(task, doc, *args, **kwargs)
            value = hit[1]
            return list(value) if isinstance(value, list) else value

        setattr(task, name, remembered)


def _forget_doc_fields(task) -> None:
    for name in _DOC_FIELDS:
        task.__dict__.pop(name, None)


class _Indices(list):
    """Document indices with set-speed ``in``: lm-eval filters documents with
    ``i in samples``, quadratic on a plain list of a large subset of a large dataset."""

    def __init__(self, items: Sequence[int]) -> None:
        super().__init__(items)
        self._set = frozenset(items)

    def __contains__(self, item: object) -> bool:
        return item in self._set


def answer_requests(lm, requests: dict[str, list], plans: dict[str, Any]) -> None:
    """Run each request type through the LM (a prepared generation plan where there is one) and
    append every answer to its request's ``resps``."""
    for reqtype, reqs in requests.items():
        plan = plans.get(reqtype)
        if plan is not None:
            resps = lm.run_plan(plan, reqs)
        else:
            resps = getattr(lm, reqtype)(reqs, disable_tqdm=True)
        for resp, req in zip(resps, reqs, strict=True):
            req.resps.append(resp)


@dataclass
class _TaskRun:
    name: str
    task: Any  # lm_eval.api.task.Task
    samples: list[int] | None
    docs: list[tuple[int, Any]] = field(default_factory=list)
    by_doc: list[list[Any]] = field(default_factory=list)  # instances per doc, ordered by idx
    filter_keys: list[str] = field(default_factory=list)
    # (doc position, filtered responses) -> metrics, for tasks whose scoring is a pure function
    # of the generated text: candidates of one study keep giving the same answers
    memo: dict[tuple, dict[str, Any]] | None = None
    ranks: dict[int, int] = field(default_factory=dict)  # search doc id -> position in the seeded order
    positions: list[int] = field(default_factory=list)  # per doc of ``docs``, its position (racing)


@dataclass
class _Objective:
    spec: ObjectiveSpec
    key: str  # "metric,filter" in the task's (or group's) results
    higher_is_better: bool


class LmEvalSuite:
    """The tasks of a study's objectives, their documents and their requests."""

    def __init__(self, objectives: Sequence[ObjectiveSpec], *, task_dirs: Sequence[str | Path] = (),
                 include_defaults: bool | None = None, seed: int = 1234, subset: str = "search") -> None:
        names = list(dict.fromkeys(o.task for o in objectives))
        dirs = normalize_dirs(task_dirs)
        self.task_manager = task_manager(dirs, names, include_defaults)
        index = self.task_manager.task_index
        missing = [n for n in names if n not in index]
        if missing:  # validate_objectives gives the full message; keep this one short
            raise SpecError(f"unknown task(s) {missing}: run validate_objectives for close matches")
        self.objectives = []
        for spec in objectives:
            key, hib = resolve_metric(index[spec.task], spec)
            self.objectives.append(_Objective(spec, key, hib))
        self.tasks, self.groups = self._load(names, index)
        self.seed = seed
        self.runs: list[_TaskRun] = []
        for name, task in self.tasks.items():
            spec = self._settings_for(name, objectives)
            self._configure(task, spec, seed)
            chosen = select_indices(len(task.eval_docs), spec.limit, seed, name, subset)
            ranks = rung_ranks(len(task.eval_docs), spec.limit, seed, name) if subset == "search" else {}
            self.runs.append(_TaskRun(name, task, None if chosen is None else _Indices(chosen), ranks=ranks))
        self._requests: dict[str, list] = {}
        self._plans: dict[str, Any] = {}

    def _load(self, names: list[str], index) -> tuple[dict[str, Any], dict[str, Any]]:
        """Leaf tasks and groups; a task named both alone and inside a named group is built once."""
        groups = [n for n in names if index[n].kind.name == "GROUP"]
        try:
            loaded = self.task_manager.load(groups) if groups else {"tasks": {}, "groups": {}}
            tasks, found_groups = dict(loaded["tasks"]), dict(loaded.get("groups") or {})
            rest = [n for n in names if n not in groups and n not in tasks]
            if rest:
                tasks.update(self.task_manager.load(rest)["tasks"])
        except (KeyError, ValueError) as err:
            raise SpecError(f"lm-eval could not load tasks {names}: {err}") from err
        return tasks, found_groups

    def _settings_for(self, task_name: str, objectives: Sequence[ObjectiveSpec]) -> ObjectiveSpec:
        """The objective that decides how a (leaf) task is run: it or its group names it."""
        owners = []
        for spec in objectives:
            group = self.groups.get(spec.task)
            members = {t.task_name for t in group.get_all_tasks()} if group is not None else {spec.task}
            if task_name in members:
                owners.append(spec)
        settings = {(o.limit, o.num_fewshot, o.split) for o in owners}
        if len(settings) > 1:
            raise SpecError(
                f"task {task_name!r} is scored by objectives with different (limit, num_fewshot, split): "
                f"{sorted(settings, key=str)}; use one setting per task"
            )
        return owners[0]

    @staticmethod
    def _configure(task, spec: ObjectiveSpec, seed: int) -> None:
        if spec.split is not None:
            splits = list(getattr(task, "dataset", None) or [])
            if splits and spec.split not in splits:
                raise SpecError(f"task {task.task_name!r} has no split {spec.split!r}; its splits: {splits}")
            task.set_config("test_split", spec.split)
        if spec.num_fewshot is not None:
            task.set_config("num_fewshot", spec.num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config("num_fewshot", 0)
        task.set_fewshot_seed(seed=seed)

    @property
    def samples(self) -> dict[str, list[int] | None]:
        """Per task, the document indices scored (None: all), e.g. for ``simple_evaluate(samples=...)``."""
        return {r.name: None if r.samples is None else list(r.samples) for r in self.runs}

    def build_requests(self, lm, *, apply_chat_template: bool = False, fewshot_as_multiturn: bool = False,
                       system_instruction: str | None = None, fast_generate: bool = True) -> None:
        """Render prompts and build the requests (once per worker and tokenizer)."""
        requests: dict[str, list] = defaultdict(list)
        for run in self.runs:
            _forget_doc_fields(run.task)
            run.task.build_all_requests(
                limit=None, samples=run.samples, rank=0, world_size=1, cache_requests=False,
                system_instruction=system_instruction, apply_chat_template=apply_chat_template,
                fewshot_as_multiturn=fewshot_as_multiturn,
                chat_template=lm.apply_chat_template if apply_chat_template else None,
                tokenizer_name=lm.tokenizer_name if apply_chat_template else "",
            )
            run.docs = list(run.task.doc_iterator(rank=0, limit=None, world_size=1, samples=run.samples))
            by_id: dict[int, list] = defaultdict(list)
            for inst in run.task.instances:
                by_id[inst.doc_id].append(inst)
                requests[inst.request_type].extend([inst] * inst.repeats)
            run.by_doc = [sorted(by_id[doc_id], key=lambda i: i.idx) for doc_id, _ in run.docs]
            run.filter_keys = [f.name for f in run.task._filters]
            # lm-eval numbers the selected documents 0…k-1 in index order: back to dataset indices
            originals = [doc_id if run.samples is None else run.samples[doc_id] for doc_id, _ in run.docs]
            run.positions = [run.ranks.get(i, -1) for i in originals]
            _remember_doc_fields(run.task, [doc for _, doc in run.docs])
            pure = run.task.OUTPUT_TYPE == "generate_until" and run.task.config.process_results is None
            run.memo = {} if pure else None
        self._requests = dict(requests)
        self._plans = {}
        if fast_generate and "generate_until" in self._requests and hasattr(lm, "plan_generation"):
            self._plans["generate_until"] = lm.plan_generation(self._requests["generate_until"])

    def run(self, lm) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """Score the LM's current model: per task (and group) results, and examples per task."""
        for run in self.runs:
            for inst in run.task.instances:
                inst.resps.clear()
                inst.filtered_resps.clear()
        answer_requests(lm, self._requests, self._plans)
        results: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        for run in self.runs:
            results[run.name], counts[run.name] = self._score(run)
        for group in self._groups_bottom_up():
            results[group.name] = group.aggregate(results)
        return results, counts

    @staticmethod
    def _score(run: _TaskRun) -> tuple[dict[str, Any], int]:
        run.task.apply_filters()
        return LmEvalSuite.aggregate(run, LmEvalSuite.doc_metrics(run, range(len(run.docs))))

    @staticmethod
    def doc_metrics(run: _TaskRun, doc_positions: Sequence[int],
                    raw: dict[tuple[str, str], list] | None = None) -> dict[tuple[str, str], list]:
        """Each filter's per-document metrics of the documents at ``doc_positions`` (indices
        into ``run.docs``, filters applied), appended to ``raw``."""
        raw = defaultdict(list) if raw is None else raw
        memo = run.memo
        if memo is not None and len(memo) > 500_000:
            memo.clear()
        task = run.task
        for key in run.filter_keys:
            for pos in doc_positions:
                doc, insts = run.docs[pos][1], run.by_doc[pos]
                responses = [i.filtered_resps[key] for i in insts]
                metrics = None
                if memo is not None:
                    try:
                        memo_key = (pos, *responses)
                        metrics = memo.get(memo_key)
                    except TypeError:  # unhashable responses: score them every time
                        memo_key = None
                if metrics is None:
                    metrics = task.process_results(doc, responses)
                    if memo is not None and memo_key is not None:
                        memo[memo_key] = metrics
                for metric, value in metrics.items():
                    raw[(metric, key)].append(value)
        return raw

    @staticmethod
    def aggregate(run: _TaskRun, raw: dict[tuple[str, str], list]) -> tuple[dict[str, Any], int]:
        """The task's results from per-document metrics (its own aggregations), and the count."""
        from lm_eval.api.metrics import mean

        aggregations = run.task.aggregation()
        out: dict[str, Any] = {}
        n = 0
        for (metric, key), items in raw.items():
            out[f"{metric},{key}"] = aggregations.get(metric, mean)(items)
            n = max(n, len(items))
        out["sample_len"] = n
        return out, n

    def _groups_bottom_up(self) -> list:
        from lm_eval.api.group import Group

        ordered, seen = [], set()

        def visit(group) -> None:
            if group.name in seen:
                return
            for child in group:
                if isinstance(child, Group):
                    visit(child)
            seen.add(group.name)
            ordered.append(group)

        for group in self.groups.values():
            visit(group)
        return ordered

    def objective_values(self, results: dict[str, dict[str, Any]]) -> list[tuple[_Objective, float]]:
        """Each objective's value; a missing or non-finite one is an ``EvaluationError``."""
        out = []
        for obj in self.objectives:
            task_results = results.get(obj.spec.task, {})
            if obj.key not in task_results:
                have = sorted(k for k in task_results if "," in k and "_stderr" not in k)
                raise EvaluationError(
                    f"the results have no {obj.key!r}; they have: {', '.join(have) or 'nothing'}",
                    task=obj.spec.task,
                )
            value = task_results[obj.key]
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise EvaluationError(f"metric {obj.key!r} is not a number: {value!r}",
                                      task=obj.spec.task) from None
            if not math.isfinite(value):
                raise EvaluationError(f"metric {obj.key!r} is {value}", task=obj.spec.task)
            out.append((obj, value))
        return out
