"""The end-of-study phase: baselines, held-out re-scoring, and completing a study.

A study's baselines (its sources and simple merges of them, service.baselines) are scored
first, on the search evaluation, beside its trials. Once its budget is spent and nothing is in
flight, the top-k trials (by fitness, or k of the Pareto front) and the baselines are re-scored
on the held-out evaluation by one extra worker, if the spec asks; then the study is completed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.db import Baseline, Event, Study, StudyStatus, Trial, TrialState
from service.runtime import HeldoutRun, build_worker_spec
from service.settings import Settings

if TYPE_CHECKING:
    from service.controller.recorder import ResultRecorder
    from service.runtime import StudyRuntime

log = logging.getLogger("evomerge.controller")

ACTIVE = (StudyStatus.QUEUED, StudyStatus.RUNNING)


class EndOfStudy:
    """Mixed into the controller, which provides what is annotated below (``_budget_spent``,
    ``_release_search_pool`` and ``_resources``: the scheduler; ``_drop``: recovery)."""

    settings: Settings
    sessions: sessionmaker[Session]
    recorder: ResultRecorder
    runtimes: dict[str, StudyRuntime]
    poll_s: float
    _resubmit: list[tuple[str, int, Any, int]]
    _needs_repair: set[str]
    _budget_spent: Callable[[StudyRuntime], bool]
    _release_search_pool: Callable[[StudyRuntime], None]
    _resources: Callable[[], Any]
    _drop: Callable[[str], None]

    def _baselines_to_score(self, rt: StudyRuntime) -> list[tuple[int, dict[str, Any]]]:
        """Create the study's baseline rows the first time; the ones not yet scored, to dispatch
        (negative ids on the workers: a baseline is never a trial, never told, never counted)."""
        from service.baselines import baseline_recipes

        with self.sessions.begin() as s:
            rows = list(s.scalars(select(Baseline).where(Baseline.study_id == rt.study_id)))
            if not rows:
                for name, kind, recipe in baseline_recipes(rt.validated):
                    row = Baseline(study_id=rt.study_id, name=name, kind=kind, recipe=rt.resolve(recipe),
                                   state=TrialState.PENDING)
                    s.add(row)
                    rows.append(row)
                s.flush()
            return [(b.id, dict(b.recipe)) for b in rows
                    if b.state in (TrialState.PENDING, TrialState.RUNNING) and b.recipe]

    def _finish_ended(self) -> None:
        for rt in list(self.runtimes.values()):
            if rt.in_flight or rt.heldout is not None or rt.paused or rt.baselines:
                continue
            if rt.study_id in self._needs_repair:
                continue
            if any(r[0] == rt.study_id for r in self._resubmit):
                continue
            if not self._budget_spent(rt):
                continue
            if rt.validated.heldout_evaluation is not None and rt.validated.heldout_top_k > 0:
                if self._start_heldout(rt):
                    continue
            self._complete(rt)

    def _start_heldout(self, rt: StudyRuntime) -> bool:
        """Re-score the top-k complete trials on the held-out evaluation (one extra worker): by
        fitness, or for a multi-objective study k trials of the Pareto front (by number)."""
        from service.pareto import pareto_front
        from workers.pool import WorkerPool
        from workers.ray_init import init_ray

        k = rt.validated.heldout_top_k
        with self.sessions() as s:
            complete = select(Trial).where(Trial.study_id == rt.study_id, Trial.state == TrialState.COMPLETE)
            if rt.validated.multi_objective:
                rows = list(s.scalars(complete.order_by(Trial.number)))
                front = set(pareto_front([(t.number, [float(v) for v in t.values]) for t in rows
                                          if isinstance(t.values, list) and t.values]))
                top = [t for t in rows if t.number in front][:k]
            else:
                top = list(s.scalars(complete.where(Trial.fitness.is_not(None))
                                     .order_by(Trial.fitness.desc(), Trial.number).limit(k)))
        top = [t for t in top if not (t.metrics or {}).get("heldout")]
        with self.sessions() as s:
            refs = [(-b.id, b.recipe) for b in s.scalars(select(Baseline).where(
                Baseline.study_id == rt.study_id, Baseline.state == TrialState.COMPLETE,
                Baseline.heldout_scores.is_(None)))]
        if not top and not refs:
            return False
        init_ray(self.settings.ray_address)
        self._release_search_pool(rt)
        spec = build_worker_spec(rt.validated, self.settings, heldout=True, paths=rt.paths)
        pool = WorkerPool(spec, 1, self._resources())
        pending = {**{t.id: t.number for t in top}, **{i: -1 for i, _ in refs}}
        rt.heldout = HeldoutRun(pool=pool, pending=pending, queue=[(t.id, t.recipe) for t in top] + refs)
        with self.sessions.begin() as s:
            s.add(Event(study_id=rt.study_id, kind="heldout_started",
                        data={"numbers": [t.number for t in top]}))
        return True

    def _heldout_step(self) -> None:
        for rt in list(self.runtimes.values()):
            run = rt.heldout
            if run is None:
                continue
            queue = run.queue
            while queue and run.pool.idle():
                trial_id, recipe = queue.pop(0)
                run.pool.submit(trial_id, recipe, timeout_s=rt.spec.trial_timeout_seconds)
            for result in run.pool.wait(timeout=self.poll_s):
                number = run.pending.pop(result.trial_id, None)
                if result.trial_id < 0:
                    self.recorder.baseline(rt, -result.trial_id, result, heldout=True)
                else:
                    self.recorder.heldout(rt, number, result)
            if not run.pending and not queue:
                run.pool.shutdown()
                rt.heldout = None
                self._complete(rt)

    def _complete(self, rt: StudyRuntime) -> None:
        log.info("study %s completed", rt.study_id)
        with self.sessions.begin() as s:
            self.recorder.update_counters(s, rt, None, None)
            study = s.get(Study, rt.study_id)  # read after the recount: the event carries it
            if study is None:
                return
            if study.status in ACTIVE:
                study.status = StudyStatus.COMPLETED
            s.add(Event(study_id=rt.study_id, kind="study_completed",
                        data={"trials_done": study.trials_done, "best_trial_number": study.best_trial_number,
                              "best_value": study.best_value}))
        self._drop(rt.study_id)
