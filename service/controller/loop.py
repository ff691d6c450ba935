"""The controller's loop: one :meth:`Controller.step` after another, in a thread of the service.

:class:`Controller` puts the jobs of the package together (see ``service/controller/__init__``);
it holds what they share in memory, all of it rebuilt from the database by a new controller.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.controller.end_of_study import EndOfStudy
from service.controller.recorder import ResultRecorder
from service.controller.recovery import Recovery
from service.controller.scheduler import Scheduler
from service.controller_faults import FAULT_RETRY_S, WriteFaultRecovery
from service.export_runner import ExportRunner
from service.runtime import StudyRuntime
from service.settings import Settings


class Controller(Recovery, Scheduler, EndOfStudy, WriteFaultRecovery):
    """Runs every active study; see the package docstring for the protocol."""

    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], *,
                 poll_s: float = 0.05, idle_sleep_s: float = 0.2) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.poll_s = poll_s
        self.idle_sleep_s = idle_sleep_s
        self.recorder = ResultRecorder(settings, session_factory)
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

    def health(self) -> dict[str, Any]:
        """For ``/health``: this controller runs in a thread of the API process."""
        return {"mode": "in-process", "running": self._thread is not None and self._thread.is_alive()}

    def run_forever(self) -> None:
        while not self._stop.is_set():
            if not self.iterate():
                self._stop.wait(FAULT_RETRY_S if self.fault is not None else self.idle_sleep_s)

    def step(self) -> bool:
        """One iteration; returns True when anything was (or is being) worked on."""
        self._sync_studies()  # recovery
        self._replay_held()  # write faults
        self._repair()
        dispatched = self._dispatch()  # the scheduler
        collected = self._collect()
        self._raise_held_fault()
        self._heldout_step()  # the end of a study
        self._finish_ended()
        self._save_clocks()
        exporting = self.exports.step()
        # in flight: pool.wait() above already waited poll_s, so the caller need not sleep
        waiting = bool(self._owner) or any(rt.heldout is not None for rt in self.runtimes.values())
        return bool(dispatched or collected or waiting or exporting)
