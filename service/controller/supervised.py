"""The controller's side of ``evomerge serve``'s supervision (``python -m service.controller
--supervised``; the API's side is :mod:`service.controller_process`).

- SIGTERM asks the loop to stop after its iteration (then the workers are shut down); SIGINT is
  left to ``serve``, which stops the controller with SIGTERM once it is shutting down itself;
- stdin is the lifeline: ``serve`` holds the other end and never writes it, so end-of-file
  means ``serve`` is gone (even killed with SIGKILL): the loop stops, and if it is still busy
  after a grace period the process exits at once (its local Ray's processes die with it);
- :class:`StateReporter` writes what ``serve`` shows of the controller as a JSON line each
  time it changes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any

from service.controller_process import GRACE_S, encode_state

log = logging.getLogger("evomerge.controller")


def stop_on_sigterm(stop: threading.Event, *, ignore_sigint: bool) -> None:
    """SIGTERM sets ``stop``; with ``ignore_sigint``, SIGINT (a Ctrl-C that reached the whole
    process group) does nothing. Handlers, not SIG_IGN: the processes started later (Ray's)
    get the default dispositions back."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if ignore_sigint:
        signal.signal(signal.SIGINT, lambda *_: None)


def watch_lifeline(stop: threading.Event, fd: int = 0, grace_s: float = GRACE_S) -> threading.Event:
    """Start a thread that reads ``fd`` until end-of-file, then sets ``stop``, and ends the process
    ``grace_s`` later unless the returned event (the caller's "stopped") is set by then."""
    stopped = threading.Event()

    def watch() -> None:
        try:
            while os.read(fd, 4096):
                pass
        except OSError:
            pass
        if stopped.is_set():
            return
        log.warning("evomerge serve is gone (end of the lifeline): the controller stops")
        stop.set()
        if not stopped.wait(grace_s):
            log.error("the controller did not stop within %.0f s: exiting now", grace_s)
            os._exit(1)

    threading.Thread(target=watch, name="evomerge-lifeline", daemon=True).start()
    return stopped


class StateReporter:
    """Writes :func:`~service.controller_process.encode_state` to ``fd`` when it changes. A
    write that fails means the reader (``serve``) is gone: ``stop`` is set."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._stop = stop
        self._last: dict[str, Any] | None = None

    def report(self, controller: Any) -> None:
        state = encode_state(controller)
        if state == self._last or self._out.closed:
            return
        try:
            self._out.write(json.dumps(state).encode() + b"\n")
        except OSError:
            log.warning("evomerge serve no longer reads the controller's state: the controller stops")
            self._out.close()
            self._stop.set()
            return
        self._last = state

    def close(self) -> None:
        if not self._out.closed:
            try:
                self._out.close()
            except OSError:
                pass
