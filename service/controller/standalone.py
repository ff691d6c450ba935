"""``python -m service.controller``: the controller on its own, without the API."""

from __future__ import annotations

import argparse
import logging
import threading

from service.controller.loop import Controller
from service.controller_faults import FAULT_RETRY_S

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.controller",
                                     description="run the controller without the API (tests, debugging)")
    parser.add_argument("--database-url", help="default: EVOMERGE_DATABASE_URL")
    parser.add_argument("--exit-when-idle", action="store_true",
                        help="return once no study is queued, running or paused with work in flight")
    parser.add_argument("--supervised", action="store_true",
                        help="run under `evomerge serve` (service/controller_process.py): stop when stdin "
                             "reaches its end (serve is gone, even killed with SIGKILL); Ctrl-C is left to "
                             "serve, which stops the controller with SIGTERM")
    parser.add_argument("--status-fd", type=int, default=None,
                        help="write the controller's state (a write fault, studies in repair) to this file "
                             "descriptor as JSON lines when it changes (serve shows it)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m service.controller``: run the controller without the API (tests, debugging).
    SIGTERM stops it after its iteration, as SIGINT does."""
    from service.controller.supervised import StateReporter, stop_on_sigterm, watch_lifeline
    from service.db import make_engine, session_factory, upgrade
    from service.settings import get_settings

    args = _parser().parse_args(argv)
    overrides = {"database_url": args.database_url} if args.database_url else {}
    settings = get_settings(**overrides)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    stop = threading.Event()
    stop_on_sigterm(stop, ignore_sigint=args.supervised)
    stopped = watch_lifeline(stop) if args.supervised else None
    reporter = StateReporter(args.status_fd, stop) if args.status_fd is not None else None
    upgrade(settings.database_url)
    controller = Controller(settings, session_factory(make_engine(settings.database_url)))
    try:
        while not stop.is_set():
            busy = controller.iterate()
            if reporter is not None:
                reporter.report(controller)
            if args.exit_when_idle and not controller.runtimes and not controller._owner:
                return 0
            if not busy:
                stop.wait(FAULT_RETRY_S if controller.fault is not None else controller.idle_sleep_s)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        controller.stop()
        if reporter is not None:
            reporter.close()
        if stopped is not None:
            stopped.set()
