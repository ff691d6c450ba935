"""Recovery: the controller's studies kept in step with the database, and continued after a restart.

Each iteration reads which studies are active: a new one is opened (its stored spec validated
again, its optimizer restored, what a previous controller left reconciled: :meth:`_recover`);
a paused one stops its clock; a cancelled one has its running trials cancelled; a deleted or
finished one is dropped. Nothing here is kept that the database does not hold (principle 3 of
docs/DESIGN): a new controller rebuilds all of it from the rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.controller.optimizer_store import OptimizerStore
from service.controller.race_board import RaceBoard, pruned_result
from service.db import Event, Study, StudyStatus, Trial, TrialState, utcnow
from service.faults import write_fault
from service.runtime import StudyRuntime, pool_key, validate_stored, worker_spec_data
from service.settings import Settings
from service.spec.fidelity import race_sizes
from workers.retry import CONTROLLER_RESTARTED, MAX_ATTEMPTS, may_retry

if TYPE_CHECKING:
    from service.controller.recorder import ResultRecorder

log = logging.getLogger("evomerge.controller")

ACTIVE = (StudyStatus.QUEUED, StudyStatus.RUNNING)


class Recovery:
    """Mixed into the controller, which provides what is annotated below (``_count_used`` and
    ``_release_unused_pools``: the scheduler; ``_baselines_to_score``: the end-of-study phase)."""

    settings: Settings
    sessions: sessionmaker[Session]
    recorder: ResultRecorder
    runtimes: dict[str, StudyRuntime]
    _owner: dict[int, str]
    _resubmit: list[tuple[str, int, Any, int]]
    _refs_checked: dict[str, float]  # study -> when to look at its exports again
    _storage: Any  # Optuna's RDBStorage on our database, made on first use
    _count_used: Callable[[str], int]
    _release_unused_pools: Callable[[], None]
    _baselines_to_score: Callable[[StudyRuntime], list[tuple[int, dict[str, Any]]]]

    # ---- the active studies ----------------------------------------------------------------------
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
            store = OptimizerStore.open(study_id, validated, space, storage=self._optuna_for_study,
                                        study_name=optuna_name, state=state)
        except Exception as err:
            if write_fault(err) is not None:
                raise  # the database, not the study: stall (iterate), do not fail the study
            self._fail_study(study_id, f"the study cannot start: {err}")
            return
        wspec = worker_spec_data(validated, self.settings, paths=paths)
        rt = StudyRuntime(study_id=study_id, validated=validated, space=space, store=store,
                          pool_key=pool_key(wspec), elapsed_base=float(elapsed),
                          next_number=(next_number + 1) if next_number is not None else 0,
                          used=self._count_used(study_id), paths=paths)
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.id == study_id).values(optuna_study_name=optuna_name))
            # queued -> running only if it is still queued: a cancel (or pause) the API wrote
            # since this study was read must not be overwritten
            started = s.execute(update(Study).where(Study.id == study_id, Study.status == StudyStatus.QUEUED)
                                .values(status=StudyStatus.RUNNING)).rowcount
            if started:
                s.add(Event(study_id=study_id, kind="study_started",
                            data={"warnings": validated.warnings}))
        sizes = race_sizes(validated.spec.fidelity, [o.limit for o in validated.evaluation.objectives])
        if sizes is not None and validated.spec.fidelity is not None:
            with self.sessions() as s:
                rt.race = RaceBoard.load(s, study_id, sizes, validated.spec.fidelity.eta,
                                         validated.spec.fidelity.window)
        self.runtimes[study_id] = rt
        log.info("study %s: controlling it (%s)", study_id, validated.optimizer.name)
        self._recover(rt)
        rt.baselines = self._baselines_to_score(rt)
        rt.count(True)

    def _recover(self, rt: StudyRuntime) -> None:
        """Continue after a previous controller: its running trials are retried or failed, and
        results it committed but never told are told now (each trial is told exactly once).

        - our row finished, the optimizer's storage still has the point untold → the crash fell
          between our commit and the tell: tell it now (values, or a failure);
        - a point untold with no row of ours → asked but never recorded: a failure (no compute
          was spent on it; failures do not count towards a CMA-ES generation);
        - our row running → its worker is gone: re-run the same point (same recipe, same
          optimizer id) if the retry policy allows another attempt (workers/retry.py), else fail
          it and tell the failure.
        """
        with self.sessions() as s:
            trials = s.scalars(select(Trial).where(Trial.study_id == rt.study_id)).all()
        by_point = {t.point_id: t for t in trials if t.point_id is not None}
        for number in rt.store.untold():
            row = by_point.get(str(number))
            if row is None:
                rt.store.tell(number, None, "asked, never recorded (controller restart)")
            elif row.state == TrialState.COMPLETE:
                rt.store.tell(number, row.values, None)
            elif row.state == TrialState.PRUNED and rt.race is not None and row.values:
                rt.store.tell(number, pruned_result(row.values, row.rung or 0, rt.race), None)
            elif row.state.finished:
                rt.store.tell(number, None, row.failure_reason or row.state.value)
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            if may_retry(t.attempts) and t.recipe is not None:
                with self.sessions.begin() as s:
                    row = s.get(Trial, t.id)
                    assert row is not None
                    row.attempts = t.attempts + 1
                    row.lease_expires_at = utcnow() + timedelta(seconds=self.settings.lease_seconds)
                    s.add(Event(study_id=rt.study_id, kind="trial_retried",
                                data={"number": t.number, "attempt": row.attempts,
                                      "why": CONTROLLER_RESTARTED,
                                      "detail": "the controller stopped while the trial ran"}))
                rt.in_flight[t.id] = t.number
                self._resubmit.append((rt.study_id, t.id, t.recipe, t.attempts + 1))
            else:
                reason = (f"{CONTROLLER_RESTARTED}: the controller stopped while the trial ran, and it "
                          f"had been dispatched {t.attempts} time(s), the most allowed ({MAX_ATTEMPTS}, "
                          "docs/workers.md)")
                self.recorder.fail(rt, t.id, reason)

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

    # ---- leaving a study -------------------------------------------------------------------------
    def _drop(self, study_id: str) -> None:
        rt = self.runtimes.pop(study_id, None)
        if rt is not None and rt.heldout is not None:
            rt.heldout.pool.shutdown()
        self._release_unused_pools()

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
            rt.store.tell(int(point) if point is not None else None, None, "cancelled")
        rt.in_flight.clear()
        self._resubmit[:] = [r for r in self._resubmit if r[0] != rt.study_id]
        with self.sessions.begin() as s:
            study = s.get(Study, rt.study_id)
            if study is not None:
                study.elapsed_seconds = rt.elapsed()
                s.add(Event(study_id=rt.study_id, kind="study_cancelled",
                            data={"trials_done": study.trials_done}))
        self._drop(rt.study_id)

    # ---- Optuna's storage ------------------------------------------------------------------------
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
