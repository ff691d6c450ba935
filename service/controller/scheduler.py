"""The scheduler: worker pools, and the ask → dispatch → tell loop over them.

Idle workers are handed to the active studies round-robin, one trial at a time: a study's
baselines first, then new points (ask one point, decode it, INSERT the trial, state running with
a lease, and COMMIT, then submit it). Finished trials are collected from every busy pool and
recorded (service/controller/recorder.py), which tells the optimizer. A pool is shared by the
studies whose worker spec is the same (``service.runtime.pool_key``).

Handovers are typed: the space's :class:`~search_spaces.recipe.Recipe` goes to the pool as the
object (dumped once, for the trial row), and the pool's ``WorkerSpec`` is validated once per
study; Ray pickles both to the actors, which use them as they are. Recipes read back from rows
(recovered trials, baselines, held-out re-scoring) go as their JSON, validated by the worker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service import score_cache
from service.cost import cost_budget_reached
from service.db import Study, Trial, TrialState, utcnow
from service.runtime import build_worker_spec
from service.settings import Settings

if TYPE_CHECKING:
    from search_spaces.recipe import Recipe
    from service.controller.recorder import ResultRecorder
    from service.runtime import StudyRuntime
    from workers.pool import WorkerPool, WorkerResources
    from workers.retry import RetryNotice
    from workers.trial import TrialResult, WorkerSpec

log = logging.getLogger("evomerge.controller")

SAVE_EVERY_S = 2.0  # elapsed time and leases are written at least this often


class Scheduler:
    """Mixed into the controller: pools, dispatch and collection. The controller provides what
    is annotated below (``_needs_repair`` and ``_record_or_hold``: service.controller_faults)."""

    settings: Settings
    sessions: sessionmaker[Session]
    recorder: ResultRecorder
    runtimes: dict[str, StudyRuntime]
    pools: dict[str, Any]  # pool key -> workers.pool.WorkerPool
    poll_s: float
    _owner: dict[int, str]  # trial row id (negative: a baseline) -> study id, for trials in any pool
    _resubmit: list[tuple[str, int, Any, int]]  # recovered trials: (study, trial row id, recipe, attempt)
    _turn: int
    _needs_repair: set[str]
    _record_or_hold: Callable[[TrialResult], None]

    # ---- pools -----------------------------------------------------------------------------------
    def _pool(self, rt: StudyRuntime) -> WorkerPool | None:
        """The study's worker pool, created on first use (None while the worker cap is reached)."""
        pool = self.pools.get(rt.pool_key)
        if pool is not None:
            return pool
        from workers.pool import WorkerPool
        from workers.ray_init import init_ray

        used = sum(len(p.slots) for p in self.pools.values())
        n = min(rt.parallelism, self.settings.max_workers - used)
        if n < 1:
            return None
        init_ray(self.settings.ray_address)
        pool = WorkerPool(self._worker_spec(rt), n, self._resources(), on_retry=self._on_retry)
        self.pools[rt.pool_key] = pool
        log.info("started %d worker(s) for study %s", n, rt.study_id)
        return pool

    def _worker_spec(self, rt: StudyRuntime) -> WorkerSpec:
        """The study's search workers' spec, validated once per runtime (a pool started again
        after a release reuses it); the pool hands the object itself to its actors."""
        if rt.worker is None:
            rt.worker = build_worker_spec(rt.validated, self.settings, paths=rt.paths)
        return rt.worker

    def _resources(self) -> WorkerResources:
        from workers.pool import WorkerResources

        return WorkerResources(num_cpus=self.settings.worker_num_cpus, num_gpus=self.settings.worker_num_gpus)

    def _release_unused_pools(self) -> None:
        used = {rt.pool_key for rt in self.runtimes.values()}
        for key in list(self.pools):
            pool = self.pools[key]
            if key not in used and not pool.busy():
                pool.shutdown()
                del self.pools[key]

    def _release_search_pool(self, rt: StudyRuntime) -> None:
        """The study's search workers are done: free their CPUs/GPUs for the held-out worker
        (on a small machine it would otherwise wait for them forever), unless another study
        still uses the same pool."""
        shared = any(o is not rt and o.pool_key == rt.pool_key for o in self.runtimes.values())
        pool = self.pools.get(rt.pool_key)
        if pool is not None and not shared and not pool.busy():
            pool.shutdown()
            del self.pools[rt.pool_key]

    # ---- the budget ------------------------------------------------------------------------------
    def _wants(self, rt: StudyRuntime) -> bool:
        """May this study start one more trial now?"""
        if rt.paused or rt.heldout is not None or len(rt.in_flight) >= rt.parallelism:
            return False
        if rt.study_id in self._needs_repair:  # re-opened once its trials in flight are back
            return False
        return bool(rt.baselines) or not self._budget_spent(rt)

    def _budget_spent(self, rt: StudyRuntime) -> bool:
        budget = rt.spec.budget
        timed_out = budget.max_seconds is not None and rt.elapsed() >= budget.max_seconds
        if timed_out or cost_budget_reached(self.sessions, rt):  # max_examples, max_worker_seconds
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
                Trial.state.in_([TrialState.RUNNING, TrialState.COMPLETE, TrialState.FAILED,
                                 TrialState.PRUNED]))) or 0)

    # ---- dispatch --------------------------------------------------------------------------------
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
                    entry = score_cache.check(self.sessions, self.settings, rt, -rt.baselines[0][0],
                                              rt.baselines[0][1])  # scored before (service/score_cache.py)?
                    baseline_id, recipe = rt.baselines.pop(0)
                    if entry is not None:  # a cache hit: recorded now, no worker
                        self.recorder.baseline_cached(rt, baseline_id, entry)
                    else:
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
            pool.submit(trial_id, recipe, attempt=attempt, timeout_s=rt.spec.trial_timeout_seconds,
                        race=rt.race.ticket() if rt.race is not None else None)
            self._owner[trial_id] = study_id
            sent += 1
        return sent

    def _start_trial(self, rt: StudyRuntime, pool: WorkerPool) -> bool:
        """Ask one point and run it; the trial row is committed before the worker sees it."""
        point = rt.store.ask()
        recipe: Recipe | None = None
        stored: dict[str, Any] | None = None  # the recipe's JSON, for the row (its one dump)
        error = None
        try:
            recipe = rt.resolve(rt.space.decode(point.params))
            stored = recipe.model_dump(mode="json")
        except Exception as err:  # a point the space cannot decode is a failed trial
            error = f"the point could not be decoded into a recipe: {err}"
        found = score_cache.probe(self.sessions, self.settings, rt, stored) if stored is not None else None
        now = utcnow()
        with self.sessions.begin() as s:
            trial = Trial(study_id=rt.study_id, number=rt.next_number, point_id=str(point.id),
                          params=dict(point.params), recipe=stored, attempts=1, started_at=now,
                          state=TrialState.RUNNING if error is None else TrialState.FAILED,
                          failure_reason=error, finished_at=None if error is None else now,
                          lease_expires_at=now + timedelta(seconds=self.settings.lease_seconds),
                          metrics={"optimizer": point.info} if point.info else None)
            s.add(trial)
            rt.store.save(s)
            s.flush()
            trial_id = trial.id
        rt.next_number += 1
        rt.used += 1  # the row is committed: running, or failed at once (both count)
        if error is not None:
            self.recorder.fail_unstarted(rt, trial_id, point.id, error)
            return True
        if (entry := score_cache.settle(rt, trial_id, found)) is not None:  # scored before: no worker
            self.recorder.complete_cached(rt, trial_id, entry)
            return True
        rt.in_flight[trial_id] = rt.next_number - 1
        self._owner[trial_id] = rt.study_id
        pool.submit(trial_id, recipe, timeout_s=rt.spec.trial_timeout_seconds,  # the object, not its JSON
                    race=rt.race.ticket() if rt.race is not None else None)
        return True

    # ---- results ---------------------------------------------------------------------------------
    def _collect(self) -> int:
        n = 0
        pools = [p for p in self.pools.values() if p.busy()]
        for pool in pools:
            for result in pool.wait(timeout=self.poll_s / max(len(pools), 1)):
                self._record_or_hold(result)
                n += 1
        return n

    def _record(self, result: TrialResult) -> None:
        """Commit one worker result, then tell the optimizer (service/controller/recorder.py)."""
        study_id = self._owner.pop(result.trial_id, None)
        rt = self.runtimes.get(study_id) if study_id is not None else None
        if rt is None or result.trial_id not in rt.in_flight:
            return  # its study was cancelled or dropped: the row was already finished
        rt.in_flight.pop(result.trial_id)
        if result.trial_id < 0:
            self.recorder.baseline(rt, -result.trial_id, result, heldout=False)
        elif result.state == "pruned":
            self.recorder.pruned(rt, result.trial_id, result)
        elif result.state != "complete":
            self.recorder.fail(rt, result.trial_id, result.error or "the worker reported a failure",
                               result=result)
        else:
            self.recorder.complete(rt, result.trial_id, result)

    def _on_retry(self, notice: RetryNotice) -> bool:
        """A pool is about to dispatch a trial again whose worker was lost: the new attempt count
        and a ``trial_retried`` event are committed first, so that ``attempts`` always equals the
        trial's dispatches. False calls the retry off: the trial's study was cancelled or dropped,
        or its row is finished. An exception (the write failed) leaves the retry with the pool,
        which asks again."""
        study_id = self._owner.get(notice.trial_id)
        rt = self.runtimes.get(study_id) if study_id is not None else None
        if rt is None or notice.trial_id not in rt.in_flight:
            self._owner.pop(notice.trial_id, None)
            return False
        if notice.trial_id < 0:  # a baseline: no trial row, never counted
            log.info("study %s: baseline %d dispatched again (%s)", rt.study_id, -notice.trial_id, notice.why)
            return True
        running = self.recorder.retried(rt, notice)
        if not running:
            self._owner.pop(notice.trial_id, None)
            rt.in_flight.pop(notice.trial_id, None)
        return running

    # ---- clocks and leases -----------------------------------------------------------------------
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
