"""The result recorder: every trial result, failure, retry and baseline score the controller writes.

Each method is one transaction: the trial (or baseline) row, the study's counters and an event
commit together, and the optimizer is told through the study's :class:`OptimizerStore` (inside
the transaction or after it, as the optimizer's persistence wants). The recorder keeps no state:
which study a result belongs to is the scheduler's business (service/controller/scheduler.py).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import score_cache
from service.controller.race_board import keep_rungs, pruned_result
from service.cost import full_examples, recount
from service.db import Baseline, Event, Study, Trial, TrialState, utcnow
from service.settings import Settings

if TYPE_CHECKING:
    from service.db import ScoreCacheEntry
    from service.runtime import StudyRuntime
    from workers.retry import RetryNotice
    from workers.trial import TrialResult

log = logging.getLogger("evomerge.controller")


class ResultRecorder:
    """Writes what comes back from the workers (and what restart recovery decides)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    # ---- trials ----------------------------------------------------------------------------------
    def complete(self, rt: StudyRuntime, trial_id: int, result: TrialResult) -> None:
        """A trial's values and scores; the optimizer is told."""
        self._scored(rt, trial_id, result, pruned=False)

    def pruned(self, rt: StudyRuntime, trial_id: int, result: TrialResult) -> None:
        """A trial racing stopped after a rung: recorded ``pruned`` with its partial values and
        scores (``fitness`` stays empty: a partial score is never a study's best), told to the
        optimizer as pruned (search_spaces.optimizers.base.Pruned), never as a full score."""
        if rt.race is None or not result.rungs:
            self.fail(rt, trial_id, "the worker pruned a trial of a study that is not raced", result=result)
            return
        self._scored(rt, trial_id, result, pruned=True)

    def _scored(self, rt: StudyRuntime, trial_id: int, result: TrialResult, *, pruned: bool) -> None:
        values = [float(v) for v in result.values]
        fitness = values[0] if len(values) == 1 and not pruned else None
        told = pruned_result(values, result.rungs[-1].rung, rt.race) if pruned and rt.race else values
        with self.sessions.begin() as s:
            row = s.get(Trial, trial_id)
            if row is None or row.state != TrialState.RUNNING:
                return
            self._fill(row, result)
            keep_rungs(row, result.rungs)
            row.state = TrialState.PRUNED if pruned else TrialState.COMPLETE
            row.values = values
            row.fitness = fitness
            point = int(row.point_id) if row.point_id is not None else None
            rt.store.tell_in(s, point, told, None)
            self.update_counters(s, rt, None if pruned else row.number, fitness)
            data = {"number": row.number, "values": values, "scores": result.scores}
            if pruned:
                data.update(rung=row.rung, examples=result.rungs[-1].examples)
            s.add(Event(study_id=rt.study_id, kind="trial_pruned" if pruned else "trial_complete", data=data))
        rt.store.tell_after(point, told, None)
        if rt.race is not None:
            rt.race.record(result.rungs)
        if not pruned:
            score_cache.keep(self.sessions, rt, trial_id, result)  # under the key it was dispatched with

    def fail(self, rt: StudyRuntime, trial_id: int, reason: str, result: TrialResult | None = None) -> None:
        """A trial failed for ``reason`` (with what its worker reported, if it did); told as a failure."""
        with self.sessions.begin() as s:
            row = s.get(Trial, trial_id)
            if row is None or row.state.finished:
                return
            if result is not None:
                self._fill(row, result)
            row.state = TrialState.FAILED
            row.failure_reason = reason
            row.finished_at = row.finished_at or utcnow()
            point = int(row.point_id) if row.point_id is not None else None
            rt.store.tell_in(s, point, None, reason)
            self.update_counters(s, rt, None, None)
            s.add(Event(study_id=rt.study_id, kind="trial_failed",
                        data={"number": row.number, "error": reason}))
        rt.store.tell_after(point, None, reason)

    def fail_unstarted(self, rt: StudyRuntime, trial_id: int, point_id: int, error: str) -> None:
        """A trial whose point could not become a recipe (its row is already committed as failed)."""
        with self.sessions.begin() as s:
            self.update_counters(s, rt, None, None)
            s.add(Event(study_id=rt.study_id, kind="trial_failed",
                        data={"trial_id": trial_id, "error": error}))
        rt.store.tell(point_id, None, error)

    def retried(self, rt: StudyRuntime, notice: RetryNotice) -> bool:
        """A trial about to be dispatched again (its worker was lost): its new attempt count and a
        ``trial_retried`` event, committed first. False: its row is no longer running."""
        with self.sessions.begin() as s:
            row = s.get(Trial, notice.trial_id)
            running = row is not None and row.state == TrialState.RUNNING
            if row is not None and running:
                row.attempts = notice.attempt
                row.lease_expires_at = utcnow() + timedelta(seconds=self.settings.lease_seconds)
                s.add(Event(study_id=rt.study_id, kind="trial_retried",
                            data={"number": row.number, "attempt": notice.attempt, "why": notice.why,
                                  "detail": notice.detail}))
        return running

    def heldout(self, rt: StudyRuntime, number: int | None, result: TrialResult) -> None:
        """A trial's score on the held-out evaluation, kept beside its search scores."""
        with self.sessions.begin() as s:
            row = s.get(Trial, result.trial_id)
            if row is None:
                return
            held = {"state": result.state, "scores": dict(result.scores),
                    "values": list(result.values), "metrics": dict(result.metrics),
                    "fitness": result.values[0] if len(result.values) == 1 else None,
                    "error": result.error}
            row.metrics = {**(row.metrics or {}), "heldout": held}
            s.add(Event(study_id=rt.study_id, kind="heldout_scored",
                        data={"number": number, "scores": held["scores"], "error": result.error}))

    # ---- baselines (service.baselines) -------------------------------------------------------------
    def baseline(self, rt: StudyRuntime, baseline_id: int, result: TrialResult, *, heldout: bool) -> None:
        """A baseline's score (on the search or, ``heldout``, the held-out evaluation); never told."""
        ok = result.state == "complete"
        values = [float(v) for v in result.values] if ok else None
        with self.sessions.begin() as s:
            row = s.get(Baseline, baseline_id)
            if row is None:
                return
            if heldout:
                row.heldout_scores = dict(result.scores) if ok else None
            else:
                row.state = TrialState.COMPLETE if ok else TrialState.FAILED
                row.scores = dict(result.scores) if ok else None
                row.values = values
                row.fitness = values[0] if values is not None and len(values) == 1 else None
                row.finished_at = utcnow()
                row.examples, row.tokens = result.cost.examples, result.cost.tokens
                row.worker_seconds = result.cost.worker_seconds
            if not ok:
                row.error = result.error or "the worker reported a failure"
            kind = "baseline_heldout_scored" if heldout else "baseline_scored"
            s.add(Event(study_id=rt.study_id, kind=kind,
                        data={"name": row.name, "scores": dict(result.scores), "error": result.error}))
            if not heldout:
                self.update_counters(s, rt, None, None)  # the study's cost counts its baselines
        if not heldout:
            score_cache.keep(self.sessions, rt, -baseline_id, result)

    # ---- score cache hits (service/score_cache.py) ---------------------------------------------------
    # A hit never reaches a worker. On its row (``cached`` true) ``examples``, ``tokens`` and
    # ``worker_seconds`` are what the hit saved (the cost of the first scoring), not what it spent.
    def complete_cached(self, rt: StudyRuntime, trial_id: int, entry: ScoreCacheEntry) -> None:
        """A trial whose candidate was scored before: completed at once and told as :meth:`complete`."""
        values = [float(v) for v in entry.values]
        fitness = values[0] if len(values) == 1 else None
        with self.sessions.begin() as s:
            row = s.get(Trial, trial_id)
            if row is None or row.state != TrialState.RUNNING:
                return
            row.state, row.values, row.fitness = TrialState.COMPLETE, values, fitness
            row.scores = entry.scores
            row.metrics = {**(row.metrics or {}), **entry.metrics} if entry.metrics else row.metrics
            self._saved(row, entry)
            point = int(row.point_id) if row.point_id is not None else None
            rt.store.tell_in(s, point, values, None)
            self.update_counters(s, rt, row.number, fitness)
            s.add(Event(study_id=rt.study_id, kind="trial_complete",
                        data={"number": row.number, "values": values, "scores": entry.scores,
                              "cached": True}))
        rt.store.tell_after(point, values, None)

    def baseline_cached(self, rt: StudyRuntime, baseline_id: int, entry: ScoreCacheEntry) -> None:
        """A baseline scored before (in this study or another): recorded at once."""
        values = [float(v) for v in entry.values]
        with self.sessions.begin() as s:
            row = s.get(Baseline, baseline_id)
            if row is None:
                return
            row.state, row.values, row.scores = TrialState.COMPLETE, values, entry.scores
            row.fitness = values[0] if len(values) == 1 else None
            self._saved(row, entry)
            s.add(Event(study_id=rt.study_id, kind="baseline_scored",
                        data={"name": row.name, "scores": entry.scores, "error": None, "cached": True}))
            self.update_counters(s, rt, None, None)

    @staticmethod
    def _saved(row: Trial | Baseline, entry: ScoreCacheEntry) -> None:
        row.cached = True
        row.examples, row.tokens, row.worker_seconds = entry.examples, entry.tokens, entry.worker_seconds
        row.finished_at = utcnow()

    # ---- the study's counters ----------------------------------------------------------------------
    def update_counters(self, s: Session, rt: StudyRuntime, number: int | None,
                        fitness: float | None) -> None:
        """Recount (never increment) so that a replayed result cannot count twice; one UPDATE
        (the best is kept by the database: ``CASE WHEN best_value IS NULL OR best_value < :f``)."""
        s.flush()
        # count(*): SQLite answers from the (study_id, state) index alone; still a scan of the
        # study's rows (about 0.06 ms per 1000 trials), the price of never incrementing
        counts = dict(s.execute(select(Trial.state, func.count()).where(Trial.study_id == rt.study_id)
                                .group_by(Trial.state)).all())
        values: dict[str, Any] = {
            "trials_done": sum(counts.get(state, 0) for state in
                               (TrialState.COMPLETE, TrialState.FAILED, TrialState.PRUNED)),
            "trials_failed": counts.get(TrialState.FAILED, 0),
            "elapsed_seconds": rt.elapsed(),
        }
        rt.cost = recount(s, rt.study_id, full_examples(rt.validated.evaluation))  # service/cost.py
        values["cost"] = rt.cost.model_dump(mode="json")
        if fitness is not None:
            better = or_(Study.best_value.is_(None), Study.best_value < fitness)
            values["best_value"] = case((better, fitness), else_=Study.best_value)
            values["best_trial_number"] = case((better, number), else_=Study.best_trial_number)
        s.execute(update(Study).where(Study.id == rt.study_id).values(**values)
                  .execution_options(synchronize_session=False))
        rt.last_saved = time.monotonic()

    @staticmethod
    def _fill(row: Trial, result: TrialResult) -> None:
        row.scores = dict(result.scores) or row.scores
        row.metrics = {**(row.metrics or {}), **result.metrics} if result.metrics else row.metrics
        row.timings = {**result.timings.model_dump(), "peak_memory_bytes": result.peak_memory_bytes}
        row.worker = result.worker or None
        row.attempts = max(row.attempts, result.attempts)
        row.examples, row.tokens = result.cost.examples, result.cost.tokens
        # a failed trial reports no cost, yet held its worker: its wall time there
        t = result.timings
        ran = max(t.finished_at - t.started_at, 0.0) if t.started_at else 0.0
        row.worker_seconds = result.cost.worker_seconds or ran
        row.finished_at = utcnow()
