"""``python -m service.controller``: the controller on its own, without the API."""

from __future__ import annotations

import argparse
import logging
import time

from service.controller.loop import Controller
from service.controller_faults import FAULT_RETRY_S


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
