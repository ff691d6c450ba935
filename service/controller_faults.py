"""The controller's answer to a write fault: a full disk, a read-only or unreachable database.

A write the storage refuses must neither end the controller's loop nor lose a result, and it
must be visible (docs/controller.md, "Write faults"). :class:`WriteFaultRecovery` is the part
of :class:`service.controller.Controller` that does it:

- :meth:`iterate` runs one step; a write fault stalls the controller (the fault is kept in
  memory, shown by ``/health`` and each study's ``status_reason``) and nothing runs while it
  lasts;
- results whose write failed are held, in order, and recorded once writes work again;
- writing is tried again every ``FAULT_RETRY_S``; once a ``study_stalled`` event commits, each
  study the fault held is re-opened (which runs ``_recover``) as soon as none of its trials is
  on a worker, so that our rows, the optimizer and Optuna's trials agree again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from service.db import Event, Study, StudyStatus, utcnow
from service.faults import Stall, write_fault

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from service.runtime import StudyRuntime

log = logging.getLogger("evomerge.controller")

FAULT_RETRY_S = 1.0  # while a write fault lasts: how often writing is tried again


class WriteFaultRecovery:
    """Mixed into the controller: its state (``fault``, ``_needs_repair``, ``_held``) and the
    methods that stall, hold, replay and repair. The controller provides ``step``, ``_record``,
    ``sessions``, ``runtimes``, ``_owner`` and ``_resubmit``."""

    sessions: sessionmaker[Session]
    runtimes: dict[str, StudyRuntime]
    _owner: dict[int, str]
    _resubmit: list[tuple[str, int, Any, int]]

    def _init_fault_state(self) -> None:
        self.fault: Stall | None = None  # the write fault this controller is stalled on (in memory only)
        self._needs_repair: set[str] = set()  # studies to re-open once their trials in flight are back
        self._held: list[Any] = []  # worker results a write fault kept from being recorded, in order
        self._held_fault: BaseException | None = None  # that fault, raised once the batch is held

    def iterate(self) -> bool:
        """One guarded iteration (what :meth:`run_forever` repeats): :meth:`step`, or, while a
        write fault lasts, a try at writing again. Returns True when busy."""
        try:
            if self.fault is not None and not self._clear_fault():
                return False
            return self.step()
        except Exception as exc:  # a database hiccup must not end the service's loop
            if not self._note_fault(exc):
                log.exception("controller iteration failed; retrying")
            return False

    def _note_fault(self, exc: BaseException) -> bool:
        """Stall on a write fault (True; False: ``exc`` is something else). The stall is visible
        (/health, each study's ``status_reason``); nothing runs while it lasts, so results wait in
        the workers' pools (or, those of a batch whose write failed, in ``_held``) rather than
        being lost to a failed write."""
        fault = write_fault(exc)
        if fault is None:
            return False
        if self.fault is None:
            self.fault = Stall(fault, utcnow(), set(self.runtimes))
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            log.error("controller stalled: %s [%s: %s]; writing is tried again every %.0f s",
                      fault.reason, type(exc).__name__, first, FAULT_RETRY_S)
        else:
            self.fault.fault = fault
            self.fault.studies.update(self.runtimes)
            self.fault.retries += 1
        return True

    def _clear_fault(self) -> bool:
        """Try writing again: a ``study_stalled`` event (why, since when, how long) for each study
        the fault held up. Once that commits the fault is over, and each study this controller
        holds is re-opened (:meth:`_repair`)."""
        stall = self.fault
        assert stall is not None
        try:
            with self.sessions.begin() as s:
                ids = sorted(stall.studies | set(self.runtimes))
                active = Study.status.in_((StudyStatus.QUEUED, StudyStatus.RUNNING))
                held = sorted(s.scalars(select(Study.id).where(active | Study.id.in_(ids))))
                data = {"reason": stall.reason, "since": stall.since.isoformat(),
                        "seconds": round(stall.seconds(), 1)}
                for study_id in held:
                    s.add(Event(study_id=study_id, kind="study_stalled", data=data))
        except Exception as exc:
            if not self._note_fault(exc):
                raise
            return False
        log.warning("writes work again after %.0f s: re-opening %d stalled studies", stall.seconds(),
                    len(held))
        self.fault = None
        self._needs_repair.update(self.runtimes)
        return True

    def _repair(self) -> None:
        """Re-open each study a write fault held, once none of its trials is in flight (it starts
        none meanwhile, :meth:`_wants`): :meth:`_open` then runs :meth:`_recover`, which makes the
        rows, the optimizer and Optuna's trials agree (a result whose write failed is run again,
        an Optuna trial left RUNNING is told) — as after a restart, and with no trial run twice."""
        for study_id in sorted(self._needs_repair):
            rt = self.runtimes.get(study_id)
            if rt is not None and rt.in_flight:
                continue
            self._needs_repair.discard(study_id)
            if rt is None:
                continue
            del self.runtimes[study_id]  # its worker pool stays: the re-opened study uses it again
            if rt.heldout is not None:
                rt.heldout.pool.shutdown()  # held-out scoring starts again for what it had not written
            self._resubmit[:] = [r for r in self._resubmit if r[0] != study_id]
            log.info("study %s: re-opened after the write fault", study_id)

    def _record_or_hold(self, result: Any) -> None:
        """:meth:`_record`, or — when its write fails, and for the rest of the batch the pool
        returned — keep the result for when writes work again (a batch is never half lost)."""
        if not self._held:
            self._held_fault = self._try_record(result)
            if self._held_fault is None:
                return
        self._held.append(result)

    def _try_record(self, result: Any) -> BaseException | None:
        """:meth:`_record`; on a write fault, the trial is put back in flight and the fault returned."""
        study_id = self._owner.get(result.trial_id)
        rt = self.runtimes.get(study_id) if study_id is not None else None
        number = rt.in_flight.get(result.trial_id) if rt is not None else None
        try:
            self._record(result)
        except Exception as exc:
            if write_fault(exc) is None:
                raise
            if study_id is not None:
                self._owner[result.trial_id] = study_id
            if rt is not None and number is not None:
                rt.in_flight[result.trial_id] = number
            return exc
        return None

    def _raise_held_fault(self) -> None:
        """End the iteration with the write fault a result was held for (:meth:`iterate` stalls)."""
        fault, self._held_fault = self._held_fault, None
        if fault is not None:
            raise fault

    def _replay_held(self) -> None:
        """Record the held results, in order, now that writes work again (a new fault: the rest wait)."""
        while self._held:
            fault = self._try_record(self._held[0])
            if fault is not None:
                raise fault
            self._held.pop(0)

    def status_reason(self, study_id: str) -> str | None:
        """Why an active study does not progress now (for ``StudyOut.status_reason``), or None."""
        stall = self.fault
        if stall is not None:
            return f"stalled since {stall.since:%Y-%m-%d %H:%M:%S} UTC: {stall.reason}"
        if study_id in self._needs_repair:
            return "recovering from a write fault: new trials start once the trials in flight are back"
        return None
