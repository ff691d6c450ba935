"""The study controller: ask → dispatch → record → tell, for every active study.

One loop in the service process (``Controller.start()``) runs all studies whose status
is ``queued`` or ``running``. Each iteration (``step()``):

1. loads the active studies and builds a :class:`~service.runtime.StudyRuntime` for new
   ones (re-validating the stored spec, restoring the optimizer, reconciling what a
   previous controller left behind — see :meth:`Controller._recover`);
2. hands idle workers to studies round-robin, one trial at a time: ask one point, decode
   it, INSERT the trial (state running, a lease) and COMMIT, then submit it;
3. collects finished trials: UPDATE the trial, the study's counters and best, add an
   event, COMMIT, then tell the optimizer;
4. ends studies whose budget is spent (held-out re-scoring first, if the spec asks).

Ordering rule: every state change is committed before it is acted on. pycma's state is
saved in the same transaction as the trial row it belongs to, so the two never disagree.
Optuna's storage is a separate connection: a crash can fall between our commit and
Optuna's write, and :meth:`Controller._recover` closes each such gap on restart.

pause / resume / cancel: the API only sets ``Study.status`` (``paused``, ``running``,
``cancelled``) and commits; the controller notices on its next iteration.
"""

from __future__ import annotations

import argparse
import logging
import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.controller_faults import FAULT_RETRY_S, WriteFaultRecovery
from service.db import Baseline, Event, Study, StudyStatus, Trial, TrialState, utcnow
from service.export_runner import ExportRunner
from service.faults import write_fault
from service.runtime import (
    MAX_ATTEMPTS,
    HeldoutRun,
    StudyRuntime,
    make_optimizer,
    pool_key,
    validate_stored,
    worker_spec_data,
)
from service.settings import Settings

log = logging.getLogger("evomerge.controller")

ACTIVE = (StudyStatus.QUEUED, StudyStatus.RUNNING)
SAVE_EVERY_S = 2.0  # elapsed time and leases are written at least this often


class Controller(WriteFaultRecovery):
    """Runs every active study; see the module docstring for the protocol."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 poll_s: float = 0.05, idle_sleep_s: float = 0.2) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.poll_s = poll_s
        self.idle_sleep_s = idle_sleep_s
        self.runtimes: dict[str, StudyRuntime] = {}
        self.pools: dict[str, Any] = {}  # pool key -> workers.pool.WorkerPool
        self._owner: dict[int, str] = {}  # trial row id -> study id (trials in any pool)
        self._turn = 0  # round-robin start
        # recovered trials to run again: (study, trial row id, recipe, attempt)
        self._resubmit: list[tuple[str, int, Any, int]] = []
        self._storage: Any = None
        self.exports = ExportRunner(settings, session_factory)
        self._refs_checked: dict[str, float] = {}  # study -> when to look at its exports again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._init_fault_state()  # service.controller_faults

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`run_forever` in a background thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="evomerge-controller", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop and the workers. Trials still running stay ``running`` in the
        database: the next controller retries them (as after a crash)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for pool in self.pools.values():
            pool.shutdown()
        for rt in self.runtimes.values():
            if rt.heldout is not None:
                rt.heldout.pool.shutdown()
        self.exports.stop()
        self.pools.clear()
        self.runtimes.clear()
        self._owner.clear()

    def run_forever(self) -> None:
        while not self._stop.is_set():
            if not self.iterate():
                self._stop.wait(FAULT_RETRY_S if self.fault is not None else self.idle_sleep_s)

    def step(self) -> bool:
        """One iteration; returns True when anything was (or is being) worked on."""
        self._sync_studies()
        self._replay_held()
        self._repair()
        dispatched = self._dispatch()
        collected = self._collect()
        self._raise_held_fault()
        self._heldout_step()
        self._finish_ended()
        self._save_clocks()
        exporting = self.exports.step()
        # in flight: pool.wait() above already waited poll_s, so the caller need not sleep
        waiting = bool(self._owner) or any(rt.heldout is not None for rt in self.runtimes.values())
        return bool(dispatched or collected or waiting or exporting)

    # ---- studies -----------------------------------------------------------------------
    def _sync_studies(self) -> None:
        with self.sessions() as s:
            rows = s.execute(select(Study.id, Study.status).where(
                Study.status.in_(ACTIVE) | Study.id.in_(list(self.runtimes)))).all()
        status = {sid: st for sid, st in rows}
        for sid, st in status.items():
            if st in ACTIVE and sid not in self.runtimes:
                self._open(sid)
        for sid in list(self.runtimes):
            st = status.get(sid)
            rt = self.runtimes[sid]
            if st is None:  # deleted under us
                self._drop(sid)
            elif st == StudyStatus.CANCELLED:
                self._cancel(rt)
            elif st.finished and not rt.in_flight and rt.heldout is None:
                self._drop(sid)
            else:
                rt.paused = st == StudyStatus.PAUSED
                rt.count(not rt.paused)

    def _open(self, study_id: str) -> None:
        """Build the runtime of an active study, continuing whatever a previous controller left."""
        if self._refs_checked.get(study_id, 0.0) > time.monotonic():
            return  # waiting for another study's export: looked at again in a moment, not every iteration
        with self.sessions() as s:
            study = s.get(Study, study_id)
            if study is None:
                return
            spec, state, elapsed = study.spec, study.optimizer_state, study.elapsed_seconds or 0.0
            optuna_name = study.optuna_study_name or f"evomerge-{study_id}"
            next_number = s.scalar(select(func.max(Trial.number)).where(Trial.study_id == study_id))
        paths = self._other_studies_models(study_id, spec)
        if paths is None:
            return  # waiting for another study's model to be exported (or the study failed)
        try:
            validated = validate_stored(spec, self.settings, paths)
            space = validated.build_space()
            storage = self._optuna_for_study()
            optimizer, uses_state = make_optimizer(validated, space, storage=storage,
                                                   study_name=optuna_name, state=state)
        except Exception as err:
            if write_fault(err) is not None:
                raise  # the database, not the study: stall (iterate), do not fail the study
            self._fail_study(study_id, f"the study cannot start: {err}")
            return
        wspec = worker_spec_data(validated, self.settings, paths=paths)
        rt = StudyRuntime(study_id=study_id, validated=validated, space=space, optimizer=optimizer,
                          pool_key=pool_key(wspec), uses_state=uses_state, elapsed_base=float(elapsed),
                          next_number=(next_number + 1) if next_number is not None else 0,
                          used=self._count_used(study_id), optuna_storage=None if uses_state else storage,
                          paths=paths)
        with self.sessions.begin() as s:
            study = s.get(Study, study_id)
            assert study is not None
            study.optuna_study_name = optuna_name
            if study.status == StudyStatus.QUEUED:
                study.status = StudyStatus.RUNNING
                s.add(Event(study_id=study_id, kind="study_started",
                            data={"warnings": validated.warnings}))
        self.runtimes[study_id] = rt
        log.info("study %s: controlling it (%s)", study_id, validated.optimizer.name)
        self._recover(rt)
        rt.baselines = self._baselines_to_score(rt)
        rt.count(True)

    def _recover(self, rt: StudyRuntime) -> None:
        """Continue after a previous controller: its running trials are retried or failed, and
        results it committed but never told are told now (each trial is told exactly once).

        - our row finished, Optuna's trial still RUNNING → the crash fell between our commit
          and the tell: tell it now (values, or a failure);
        - an Optuna trial RUNNING with no row of ours → asked but never recorded: a failure
          (no compute was spent on it; failures do not count towards a CMA-ES generation);
        - our row running → its worker is gone: re-run the same point (same recipe, same
          optimizer id) if it has attempts left, else fail it and tell the failure.
        """
        with self.sessions() as s:
            trials = s.scalars(select(Trial).where(Trial.study_id == rt.study_id)).all()
        by_point = {t.point_id: t for t in trials if t.point_id is not None}
        if not rt.uses_state:
            import optuna

            study = rt.optimizer.study  # type: ignore[attr-defined]
            for ot in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                row = by_point.get(str(ot.number))
                if row is None:
                    self._tell(rt, ot.number, None, "asked, never recorded (controller restart)")
                elif row.state == TrialState.COMPLETE:
                    self._tell(rt, ot.number, row.values, None)
                elif row.state.finished:
                    self._tell(rt, ot.number, None, row.failure_reason or row.state.value)
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            if t.attempts < MAX_ATTEMPTS and t.recipe is not None:
                with self.sessions.begin() as s:
                    row = s.get(Trial, t.id)
                    assert row is not None
                    row.attempts = t.attempts + 1
                    row.lease_expires_at = utcnow() + timedelta(seconds=self.settings.lease_seconds)
                    s.add(Event(study_id=rt.study_id, kind="trial_retried",
                                data={"number": t.number, "attempt": row.attempts,
                                      "why": "controller restarted",
                                      "detail": "the controller stopped while the trial ran"}))
                rt.in_flight[t.id] = t.number
                self._resubmit.append((rt.study_id, t.id, t.recipe, t.attempts + 1))
            else:
                reason = (f"controller restarted: the controller stopped while the trial ran, and it had "
                          f"been dispatched {t.attempts} time(s), the most allowed ({MAX_ATTEMPTS}, "
                          "docs/workers.md)")
                self._record_failure(rt, t.id, reason)

    def _other_studies_models(self, study_id: str, stored: Any) -> dict[str, str] | None:
        """Export folders of the other studies' models this study builds on ({} when none);
        None while they are being exported (asked for here) or when the study cannot start."""
        from service.study_refs import export_paths, stored_refs

        refs = stored_refs(stored)
        if not refs:
            return {}
        self._refs_checked[study_id] = time.monotonic() + 1.0  # _open skips the study until then
        try:
            with self.sessions.begin() as s:
                paths = export_paths(s, refs, requested_by=f"study {study_id}")
        except LookupError as err:
            self._fail_study(study_id, f"the study cannot start: {err}")
            return None
        if paths is None:
            log.info("study %s waits for another study's model to be exported", study_id)
        return paths

    def _drop(self, study_id: str) -> None:
        rt = self.runtimes.pop(study_id, None)
        if rt is not None and rt.heldout is not None:
            rt.heldout.pool.shutdown()
        self._release_unused_pools()

    def _release_unused_pools(self) -> None:
        used = {rt.pool_key for rt in self.runtimes.values()}
        for key in list(self.pools):
            pool = self.pools[key]
            if key not in used and not pool.busy():
                pool.shutdown()
                del self.pools[key]

    def _fail_study(self, study_id: str, error: str) -> None:
        log.warning("study %s failed: %s", study_id, error)
        with self.sessions.begin() as s:
            study = s.get(Study, study_id)
            if study is None:
                return
            study.status = StudyStatus.FAILED
            study.error = error
            s.add(Event(study_id=study_id, kind="study_failed", data={"error": error}))
        self._drop(study_id)

    def _cancel(self, rt: StudyRuntime) -> None:
        """A cancelled study: its running trials become ``cancelled`` (told as failures) at once;
        results that still come back for them are dropped."""
        for trial_id, number in list(rt.in_flight.items()):
            with self.sessions.begin() as s:
                row = s.get(Trial, trial_id)
                if row is None or row.state != TrialState.RUNNING:
                    continue
                row.state = TrialState.CANCELLED
                row.failure_reason = "the study was cancelled"
                row.finished_at = utcnow()
                s.add(Event(study_id=rt.study_id, kind="trial_cancelled", data={"number": number}))
                point = row.point_id
            self._tell(rt, int(point) if point is not None else None, None, "cancelled")
        rt.in_flight.clear()
        self._resubmit[:] = [r for r in self._resubmit if r[0] != rt.study_id]
        with self.sessions.begin() as s:
            study = s.get(Study, rt.study_id)
            if study is not None:
                study.elapsed_seconds = rt.elapsed()
                s.add(Event(study_id=rt.study_id, kind="study_cancelled",
                            data={"trials_done": study.trials_done}))
        self._drop(rt.study_id)

    # ---- dispatch ----------------------------------------------------------------------
    def _pool(self, rt: StudyRuntime) -> Any | None:
        """The study's worker pool, created on first use (None while the worker cap is reached)."""
        pool = self.pools.get(rt.pool_key)
        if pool is not None:
            return pool
        from workers.pool import WorkerPool, init_ray
        from workers.trial import WorkerSpec

        used = sum(len(p.slots) for p in self.pools.values())
        n = min(rt.parallelism, self.settings.max_workers - used)
        if n < 1:
            return None
        init_ray(self.settings.ray_address)
        spec = worker_spec_data(rt.validated, self.settings, paths=rt.paths)
        pool = WorkerPool(WorkerSpec.model_validate(spec), n, self._resources(),
                          max_attempts=MAX_ATTEMPTS, on_retry=self._on_retry)
        self.pools[rt.pool_key] = pool
        log.info("started %d worker(s) for study %s", n, rt.study_id)
        return pool

    def _resources(self) -> Any:
        from workers.pool import WorkerResources

        return WorkerResources(num_cpus=self.settings.worker_num_cpus, num_gpus=self.settings.worker_num_gpus)

    def _wants(self, rt: StudyRuntime) -> bool:
        """May this study start one more trial now?"""
        if rt.paused or rt.heldout is not None or len(rt.in_flight) >= rt.parallelism:
            return False
        if rt.study_id in self._needs_repair:  # re-opened once its trials in flight are back
            return False
        return bool(rt.baselines) or not self._budget_spent(rt)

    def _budget_spent(self, rt: StudyRuntime) -> bool:
        budget = rt.spec.budget
        if budget.max_seconds is not None and rt.elapsed() >= budget.max_seconds:
            return True
        if budget.max_trials is not None:
            return rt.used >= budget.max_trials
        return False

    def _count_used(self, study_id: str) -> int:
        """Trials that count towards max_trials: running, complete and failed ones (counted from
        the rows when a study is opened; ``StudyRuntime.used`` then adds the rows this runtime
        inserts, so that no dispatch needs a COUNT)."""
        with self.sessions() as s:
            return int(s.scalar(select(func.count(Trial.id)).where(
                Trial.study_id == study_id,
                Trial.state.in_([TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAILED]))) or 0)

    def _dispatch(self) -> int:
        """Hand idle workers out round-robin, one trial per study per round."""
        sent = self._resubmit_recovered()
        order = list(self.runtimes.values())
        if not order:
            return sent
        self._turn = (self._turn + 1) % len(order)
        order = order[self._turn:] + order[:self._turn]
        progress = True
        while progress:
            progress = False
            for rt in order:
                if rt.study_id not in self.runtimes or not self._wants(rt):
                    continue
                pool = self._pool(rt)
                if pool is None or not pool.idle():
                    continue
                if rt.baselines:  # references first: they are few and the dashboard shows them at once
                    baseline_id, recipe = rt.baselines.pop(0)
                    rt.in_flight[-baseline_id] = -1
                    self._owner[-baseline_id] = rt.study_id
                    pool.submit(-baseline_id, recipe, timeout_s=rt.spec.trial_timeout_seconds)
                    sent += 1
                    progress = True
                    continue
                if self._start_trial(rt, pool):
                    sent += 1
                    progress = True
        return sent

    def _resubmit_recovered(self) -> int:
        sent = 0
        for item in list(self._resubmit):
            study_id, trial_id, recipe, attempt = item
            rt = self.runtimes.get(study_id)
            if rt is None:
                self._resubmit.remove(item)
                continue
            pool = self._pool(rt)
            if pool is None or not pool.idle():
                continue
            self._resubmit.remove(item)
            pool.submit(trial_id, recipe, attempt=attempt, timeout_s=rt.spec.trial_timeout_seconds)
            self._owner[trial_id] = study_id
            sent += 1
        return sent

    def _start_trial(self, rt: StudyRuntime, pool: Any) -> bool:
        """Ask one point and run it; the trial row is committed before the worker sees it."""
        (point,) = rt.optimizer.ask(1)
        if rt.optuna_storage is not None:  # Optuna's trial and its point, committed before our row
            rt.optuna_storage.flush()
        recipe: dict[str, Any] | None = None
        error = None
        try:
            recipe = rt.resolve(rt.space.decode(point.params).model_dump(mode="json"))
        except Exception as err:  # a point the space cannot decode is a failed trial
            error = f"the point could not be decoded into a recipe: {err}"
        now = utcnow()
        with self.sessions.begin() as s:
            trial = Trial(study_id=rt.study_id, number=rt.next_number, point_id=str(point.id),
                          params=dict(point.params), recipe=recipe, attempts=1, started_at=now,
                          state=TrialState.RUNNING if error is None else TrialState.FAILED,
                          failure_reason=error, finished_at=None if error is None else now,
                          lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds),
                          metrics={"optimizer": point.info} if point.info else None)
            s.add(trial)
            if rt.uses_state:
                s.execute(update(Study).where(Study.id == rt.study_id)
                          .values(optimizer_state=rt.optimizer.state()))
            s.flush()
            trial_id = trial.id
        rt.next_number += 1
        rt.used += 1  # the row is committed: running, or failed at once (both count)
        if error is not None:
            self._finish_failed_unstarted(rt, trial_id, point.id, error)
            return True
        rt.in_flight[trial_id] = rt.next_number - 1
        self._owner[trial_id] = rt.study_id
        pool.submit(trial_id, recipe, timeout_s=rt.spec.trial_timeout_seconds)
        return True

    def _finish_failed_unstarted(self, rt: StudyRuntime, trial_id: int, point_id: int, error: str) -> None:
        with self.sessions.begin() as s:
            self._update_counters(s, rt, None, None)
            s.add(Event(study_id=rt.study_id, kind="trial_failed",
                        data={"trial_id": trial_id, "error": error}))
        self._tell(rt, point_id, None, error)

    # ---- results -----------------------------------------------------------------------
    def _collect(self) -> int:
        n = 0
        pools = [p for p in self.pools.values() if p.busy()]
        for pool in pools:
            for result in pool.wait(timeout=self.poll_s / max(len(pools), 1)):
                self._record_or_hold(result)
                n += 1
        return n

    def _on_retry(self, notice: Any) -> bool:
        """A pool is about to dispatch a trial again whose worker was lost (a
        ``workers.pool.RetryNotice``): the new attempt count and a ``trial_retried`` event are
        committed first, so that ``attempts`` always equals the trial's dispatches. False calls
        the retry off: the trial's study was cancelled or dropped, or its row is finished. An
        exception (the write failed) leaves the retry with the pool, which asks again."""
        study_id = self._owner.get(notice.trial_id)
        rt = self.runtimes.get(study_id) if study_id is not None else None
        if rt is None or notice.trial_id not in rt.in_flight:
            self._owner.pop(notice.trial_id, None)
            return False
        if notice.trial_id < 0:  # a baseline: no trial row, never counted
            log.info("study %s: baseline %d dispatched again (%s)", rt.study_id, -notice.trial_id, notice.why)
            return True
        with self.sessions.begin() as s:
            row = s.get(Trial, notice.trial_id)
            running = row is not None and row.state == TrialState.RUNNING
            if row is not None and running:
                row.attempts = notice.attempt
                row.lease_expires_at = utcnow() + timedelta(seconds=self.settings.lease_seconds)
                s.add(Event(study_id=rt.study_id, kind="trial_retried",
                            data={"number": row.number, "attempt": notice.attempt, "why": notice.why,
                                  "detail": notice.detail}))
        if not running:
            self._owner.pop(notice.trial_id, None)
            rt.in_flight.pop(notice.trial_id, None)
        return running

    def _record(self, result: Any) -> None:
        """Commit one worker result, then tell the optimizer."""
        study_id = self._owner.pop(result.trial_id, None)
        rt = self.runtimes.get(study_id) if study_id is not None else None
        if rt is None or result.trial_id not in rt.in_flight:
            return  # its study was cancelled or dropped: the row was already finished
        rt.in_flight.pop(result.trial_id)
        if result.trial_id < 0:
            self._record_baseline(rt, -result.trial_id, result, heldout=False)
            return
        if result.state != "complete":
            self._record_failure(rt, result.trial_id, result.error or "the worker reported a failure",
                                 result=result)
            return
        values = [float(v) for v in result.values]
        fitness = values[0] if len(values) == 1 else None
        with self.sessions.begin() as s:
            row = s.get(Trial, result.trial_id)
            if row is None or row.state != TrialState.RUNNING:
                return
            self._fill(row, result)
            row.state = TrialState.COMPLETE
            row.values = values
            row.fitness = fitness
            point = int(row.point_id) if row.point_id is not None else None
            if rt.uses_state and point is not None:  # tell in memory, save in this transaction
                self._tell(rt, point, values, None)
                s.execute(update(Study).where(Study.id == rt.study_id)
                          .values(optimizer_state=rt.optimizer.state()))
            self._update_counters(s, rt, row.number, fitness)
            s.add(Event(study_id=rt.study_id, kind="trial_complete",
                        data={"number": row.number, "values": values, "scores": result.scores}))
        if not rt.uses_state:
            self._tell(rt, point, values, None)

    def _record_failure(self, rt: StudyRuntime, trial_id: int, reason: str, result: Any = None) -> None:
        rt.in_flight.pop(trial_id, None)
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
            if rt.uses_state and point is not None:
                self._tell(rt, point, None, reason)
                s.execute(update(Study).where(Study.id == rt.study_id)
                          .values(optimizer_state=rt.optimizer.state()))
            self._update_counters(s, rt, None, None)
            s.add(Event(study_id=rt.study_id, kind="trial_failed",
                        data={"number": row.number, "error": reason}))
        if not rt.uses_state:
            self._tell(rt, point, None, reason)

    # ---- baselines (service.baselines) ----------------------------------------------------
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

    def _record_baseline(self, rt: StudyRuntime, baseline_id: int, result: Any, *, heldout: bool) -> None:
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
            if not ok:
                row.error = result.error or "the worker reported a failure"
            kind = "baseline_heldout_scored" if heldout else "baseline_scored"
            s.add(Event(study_id=rt.study_id, kind=kind,
                        data={"name": row.name, "scores": dict(result.scores), "error": result.error}))

    @staticmethod
    def _fill(row: Trial, result: Any) -> None:
        row.scores = dict(result.scores) or row.scores
        row.metrics = {**(row.metrics or {}), **result.metrics} if result.metrics else row.metrics
        row.timings = {**result.timings.model_dump(), "peak_memory_bytes": result.peak_memory_bytes}
        row.worker = result.worker or None
        row.attempts = max(row.attempts, result.attempts)
        row.finished_at = utcnow()

    def _update_counters(self, s: Session, rt: StudyRuntime, number: int | None,
                         fitness: float | None) -> None:
        """Recount (never increment) so that a replayed result cannot count twice; one UPDATE
        (the best is kept by the database: ``CASE WHEN best_value IS NULL OR best_value < :f``)."""
        s.flush()
        # count(*): SQLite answers from the (study_id, state) index alone; still a scan of the
        # study's rows (about 0.06 ms per 1000 trials), the price of never incrementing
        counts = dict(s.execute(select(Trial.state, func.count()).where(Trial.study_id == rt.study_id)
                                .group_by(Trial.state)).all())
        values: dict[str, Any] = {
            "trials_done": counts.get(TrialState.COMPLETE, 0) + counts.get(TrialState.FAILED, 0),
            "trials_failed": counts.get(TrialState.FAILED, 0),
            "elapsed_seconds": rt.elapsed(),
        }
        if fitness is not None:
            better = or_(Study.best_value.is_(None), Study.best_value < fitness)
            values["best_value"] = case((better, fitness), else_=Study.best_value)
            values["best_trial_number"] = case((better, number), else_=Study.best_trial_number)
        s.execute(update(Study).where(Study.id == rt.study_id).values(**values)
                  .execution_options(synchronize_session=False))
        rt.last_saved = time.monotonic()

    def _tell(self, rt: StudyRuntime, point_id: int | None, values: Iterable[float] | None, reason: str | None
              ) -> None:
        from search_spaces.optimizers.base import Failure, OptimizerError

        if point_id is None:
            return
        try:
            rt.optimizer.tell(point_id, list(values) if values is not None else Failure(reason or ""))
        except OptimizerError as err:  # already told (e.g. a replay after a restart): nothing to do
            log.info("study %s: tell(%s) skipped: %s", rt.study_id, point_id, err)

    # ---- the end of a study ------------------------------------------------------------
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
        from workers.pool import WorkerPool, init_ray
        from workers.trial import WorkerSpec

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
        spec = WorkerSpec.model_validate(worker_spec_data(rt.validated, self.settings, heldout=True,
                                                          paths=rt.paths))
        pool = WorkerPool(spec, 1, self._resources())
        pending = {**{t.id: t.number for t in top}, **{i: -1 for i, _ in refs}}
        rt.heldout = HeldoutRun(pool=pool, pending=pending, queue=[(t.id, t.recipe) for t in top] + refs)
        with self.sessions.begin() as s:
            s.add(Event(study_id=rt.study_id, kind="heldout_started",
                        data={"numbers": [t.number for t in top]}))
        return True

    def _release_search_pool(self, rt: StudyRuntime) -> None:
        """The study's search workers are done: free their CPUs/GPUs for the held-out worker
        (on a small machine it would otherwise wait for them forever), unless another study
        still uses the same pool."""
        shared = any(o is not rt and o.pool_key == rt.pool_key for o in self.runtimes.values())
        pool = self.pools.get(rt.pool_key)
        if pool is not None and not shared and not pool.busy():
            pool.shutdown()
            del self.pools[rt.pool_key]

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
                    self._record_baseline(rt, -result.trial_id, result, heldout=True)
                    continue
                with self.sessions.begin() as s:
                    row = s.get(Trial, result.trial_id)
                    if row is None:
                        continue
                    held = {"state": result.state, "scores": dict(result.scores),
                            "values": list(result.values), "metrics": dict(result.metrics),
                            "fitness": result.values[0] if len(result.values) == 1 else None,
                            "error": result.error}
                    row.metrics = {**(row.metrics or {}), "heldout": held}
                    s.add(Event(study_id=rt.study_id, kind="heldout_scored",
                                data={"number": number, "scores": held["scores"], "error": result.error}))
            if not run.pending and not queue:
                run.pool.shutdown()
                rt.heldout = None
                self._complete(rt)

    def _complete(self, rt: StudyRuntime) -> None:
        log.info("study %s completed", rt.study_id)
        with self.sessions.begin() as s:
            self._update_counters(s, rt, None, None)
            study = s.get(Study, rt.study_id)  # read after the recount: the event carries it
            if study is None:
                return
            if study.status in ACTIVE:
                study.status = StudyStatus.COMPLETED
            s.add(Event(study_id=rt.study_id, kind="study_completed",
                        data={"trials_done": study.trials_done, "best_trial_number": study.best_trial_number,
                              "best_value": study.best_value}))
        self._drop(rt.study_id)

    # ---- clocks and leases -------------------------------------------------------------
    def _save_clocks(self) -> None:
        """Persist elapsed time, and renew the leases of trials this process is running."""
        now = time.monotonic()
        for rt in self.runtimes.values():
            if now - rt.last_saved < min(SAVE_EVERY_S, self.settings.lease_seconds / 3):
                continue
            rt.last_saved = now
            with self.sessions.begin() as s:
                s.execute(update(Study).where(Study.id == rt.study_id).values(elapsed_seconds=rt.elapsed()))
                if rt.in_flight:
                    lease = utcnow() + timedelta(seconds=self.settings.lease_seconds)
                    s.execute(update(Trial).where(Trial.id.in_(list(rt.in_flight)),
                                                  Trial.state == TrialState.RUNNING)
                              .values(lease_expires_at=lease))

    def _optuna(self) -> Any:
        """Optuna's ``RDBStorage`` on our database (one engine for all studies)."""
        if self._storage is None:
            from service.db import optuna_storage

            self._storage = optuna_storage(self.settings.database_url)
        return self._storage

    def _optuna_for_study(self) -> Any:
        """A storage for one study being opened: writes go to the database at once, reads come
        from memory (this controller is its only writer; service.db.optuna_cache). A new one per
        opening, so that reopening a study reads everything the database holds."""
        from service.db.optuna_cache import SoleWriterStorage

        return SoleWriterStorage(self._optuna())


# ---- running it on its own ------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python -m service.controller``: run the controller without the API (tests, debugging)."""
    from service.db import make_engine, session_factory, upgrade
    from service.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m service.controller", description=main.__doc__)
    parser.add_argument("--database-url", help="default: EVOMERGE_DATABASE_URL")
    parser.add_argument("--exit-when-idle", action="store_true",
                        help="return once no study is queued, running or paused with work in flight")
    args = parser.parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = get_settings(**overrides)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    upgrade(settings.database_url)
    controller = Controller(settings, session_factory(make_engine(settings.database_url)))
    try:
        while True:
            busy = controller.iterate()
            if args.exit_when_idle and not controller.runtimes and not controller._owner:
                return 0
            if not busy:
                time.sleep(FAULT_RETRY_S if controller.fault is not None else controller.idle_sleep_s)
    except KeyboardInterrupt:
        return 0
    finally:
        controller.stop()


if __name__ == "__main__":
    raise SystemExit(main())
