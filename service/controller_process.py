"""``evomerge serve``'s study controller in a process of its own, supervised by the API process.

The API and the controller share nothing but the database, so the controller can run beside
the API instead of in one of its threads (where it competes with the request threads for the
interpreter lock). :class:`ControllerProcess` keeps ``python -m service.controller
--supervised`` running:

- it starts it with the API's settings (``EVOMERGE_*`` in its environment: :func:`settings_env`);
- it restarts it when it exits or is killed, after a pause that doubles from ``BACKOFF_MIN_S``
  up to ``BACKOFF_MAX_S`` while it keeps dying young (a run of ``STABLE_S`` resets it), and
  logs each exit with its exit code or signal;
- it stops it on exit: SIGTERM, then SIGKILL after ``GRACE_S``;
- the child's stdin is a pipe that the API process never writes: when the API process dies,
  even by SIGKILL, the child reads end-of-file and stops itself (``service.controller.supervised``);
- the child reports what the API shows of it — a write fault it is stalled on, studies in
  repair — as JSON lines on a second pipe (:func:`encode_state`, :func:`decode_state`), so
  ``fault`` and ``status_reason`` read as those of an in-process :class:`~service.controller.Controller`.

Only the standard library is imported here: the API process never imports the controller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from service.faults import Stall, WriteFault

GRACE_S = 20.0  # SIGTERM → SIGKILL: the controller stops its workers (and its own local Ray) first
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # a controller that ran this long before it died is restarted after BACKOFF_MIN_S again

# uvicorn's error logger: its handlers print these with serve's own lines, at serve's --log-level
log = logging.getLogger("uvicorn.error.controller")

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the folder holding `service` (the child imports it)


def settings_env(settings: Any) -> dict[str, str | None]:
    """``settings`` as the ``EVOMERGE_*`` variables that give them back (None: unset it)."""
    env: dict[str, str | None] = {}
    for name, value in settings.model_dump(mode="json").items():
        key = f"EVOMERGE_{name.upper()}"
        if value is None:
            env[key] = None
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif isinstance(value, (list, dict)):
            env[key] = json.dumps(value)
        else:
            env[key] = str(value)
    return env


def exit_description(returncode: int) -> str:
    """``exit code 1`` or ``killed by SIGKILL`` (Popen's negative return codes)."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _exited(last_exit: str) -> str:
    """``was killed by SIGKILL``, ``ended with exit code 1``, ``could not be started (...)``."""
    if last_exit.startswith("killed"):
        return f"was {last_exit}"
    return f"ended with {last_exit}" if last_exit.startswith("exit code") else last_exit


# ---- what the child reports (one JSON line each time it changes) -------------------------------
def encode_state(controller: Any) -> dict[str, Any]:
    """What the API shows of a controller: its write fault, and the reason of each study it repairs."""
    stall = getattr(controller, "fault", None)
    fault = None
    if stall is not None:
        fault = {"kind": stall.fault.kind, "what": stall.fault.what, "error": stall.fault.error,
                 "since": stall.since.isoformat()}
    reasons = {sid: controller.status_reason(sid) for sid in sorted(getattr(controller, "_needs_repair", ()))}
    return {"fault": fault, "every_study": controller.status_reason(""),
            "studies": {sid: r for sid, r in reasons.items() if r}}


def decode_state(message: dict[str, Any]) -> tuple[Stall | None, str | None, dict[str, str]]:
    """``encode_state``'s message read back: (the stall, the reason for every study, per study)."""
    fault = message.get("fault")
    stall = None
    if fault:
        stall = Stall(WriteFault(str(fault["kind"]), str(fault["what"]), str(fault["error"])),
                      datetime.fromisoformat(fault["since"]))
    studies = {str(k): str(v) for k, v in (message.get("studies") or {}).items()}
    every = message.get("every_study")
    return stall, (str(every) if every else None), studies


class ControllerProcess:
    """Runs the study controller as a supervised child process (see the module docstring).

    Reads like an in-process controller where the API looks: ``fault``, ``status_reason``,
    ``stop``; and :meth:`health` says whether the process is up and how often it was restarted.
    """

    def __init__(self, settings: Any, *, log_level: str | None = None, command: list[str] | None = None,
                 grace_s: float = GRACE_S, backoff_s: tuple[float, float] = (BACKOFF_MIN_S, BACKOFF_MAX_S),
                 stable_s: float = STABLE_S) -> None:
        self.settings = settings
        self.log_level = log_level
        self.command = command  # tests: another child in place of the controller
        self.grace_s = grace_s
        self.backoff_s = backoff_s
        self.stable_s = stable_s
        self.restarts = 0
        self.last_exit: str | None = None
        self.fault: Stall | None = None
        self._every_study: str | None = None
        self._studies: dict[str, str] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at: float | None = None  # monotonic, of the running child
        self._up_since: datetime | None = None
        self._next_start: float | None = None  # monotonic, while waiting to restart
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what the API reads ---------------------------------------------------------------------
    def status_reason(self, study_id: str) -> str | None:
        return self._studies.get(study_id) or self._every_study

    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def health(self) -> dict[str, Any]:
        proc = self._proc
        running = proc is not None and proc.poll() is None
        wait = None if self._next_start is None else max(0.0, self._next_start - time.monotonic())
        return {"mode": "process", "running": running, "pid": proc.pid if running and proc else None,
                "restarts": self.restarts, "last_exit": self.last_exit,
                "up_since": self._up_since if running else None,
                "next_start_in_s": None if running else wait}

    def problem(self) -> str | None:
        """Why /health is degraded because of this process, or None."""
        if self.running() or self._stopping.is_set():
            return None
        why = f"it {_exited(self.last_exit)}" if self.last_exit else "it is starting"
        wait = self.health()["next_start_in_s"]
        when = f"it is started again in {wait:.1f} s" if wait is not None else "it is being started again"
        return (f"the study controller process is not running ({why}; restarted {self.restarts} times so "
                f"far); {when}, and studies continue where they were (serve logs each exit)")

    # ---- start and stop ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the controller and the thread that supervises it."""
        if self._thread is not None:
            return
        if self.log_level is None:
            level = logging.getLogger("uvicorn.error").getEffectiveLevel()
            name = logging.getLevelName(level).lower()
            self.log_level = name if name in ("critical", "error", "warning", "info", "debug") else "info"
        self._spawn()
        self._thread = threading.Thread(target=self._supervise, name="evomerge-controller-supervisor",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop supervising, then stop the controller: SIGTERM, and SIGKILL after the grace period."""
        grace = self.grace_s if timeout is None else timeout
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("the study controller (pid %d) did not stop within %.0f s of SIGTERM: SIGKILL",
                            proc.pid, grace)
                proc.kill()
                proc.wait()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    # ---- the child ----------------------------------------------------------------------------------
    def _argv(self, status_fd: int) -> list[str]:
        if self.command is not None:
            return [*self.command, str(status_fd)]
        return [sys.executable, "-m", "service.controller", "--supervised", "--status-fd", str(status_fd),
                "--log-level", self.log_level or "info"]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key, value in settings_env(self.settings).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH")) if p)
        return env

    def _spawn(self) -> bool:
        """Start a child (under the lock, never once stopping); False when it could not be started."""
        with self._lock:
            if self._stopping.is_set():
                return False
            read_fd, write_fd = os.pipe()
            try:
                # stdin: the lifeline (never written; end-of-file when this process is gone)
                proc = subprocess.Popen(self._argv(write_fd), stdin=subprocess.PIPE, pass_fds=(write_fd,),
                                        env=self._env())
            except OSError as exc:
                os.close(read_fd)
                self.last_exit = f"could not be started ({type(exc).__name__}: {exc.strerror or exc})"
                log.error("the study controller %s", self.last_exit)
                return False
            finally:
                os.close(write_fd)
            self._proc = proc
            self._started_at = time.monotonic()
            self._up_since = datetime.now(timezone.utc)
            self._next_start = None
        threading.Thread(target=self._read_state, args=(read_fd,), name="evomerge-controller-state",
                         daemon=True).start()
        return True

    def _read_state(self, read_fd: int) -> None:
        """The child's state lines, until it exits; then nothing of it is shown any more."""
        with os.fdopen(read_fd, "rb") as pipe:
            for line in pipe:
                try:
                    self.fault, self._every_study, self._studies = decode_state(json.loads(line))
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("the study controller sent an unreadable state line (%s)", type(exc).__name__)
        self.fault, self._every_study, self._studies = None, None, {}

    def _supervise(self) -> None:
        delay = self.backoff_s[0]
        while not self._stopping.is_set():
            proc = self._proc
            if proc is not None:
                returncode = proc.wait()
                if self._stopping.is_set():
                    return
                ran = time.monotonic() - (self._started_at or time.monotonic())
                self.last_exit = exit_description(returncode)
                if ran >= self.stable_s:
                    delay = self.backoff_s[0]
                log.warning("the study controller (pid %d) %s after %.1f s; starting it again in %.1f s "
                            "(restart %d)", proc.pid, _exited(self.last_exit), ran, delay, self.restarts + 1)
            self._next_start = time.monotonic() + delay
            if self._stopping.wait(delay):
                return
            self.restarts += 1
            if not self._spawn():
                self._proc = None
            delay = min(delay * 2, self.backoff_s[1])
