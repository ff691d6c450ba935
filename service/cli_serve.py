"""``evomerge serve``, ``controller`` and ``demo``: run the service (the last also drives it
as a user would, :mod:`service.demo`)."""

from __future__ import annotations

import argparse
import sys


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.demo import run_demo
    from service.settings import SettingsError, get_settings

    try:
        data_dir = Path(args.data_dir) if args.data_dir else get_settings().data_dir
        get_settings(data_dir=data_dir).check_data_dir("--data-dir" if args.data_dir else "EVOMERGE_DATA_DIR")
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        run_demo(data_dir=data_dir, trials=args.trials, seed=args.seed, serve=args.serve, port=args.port,
                 out=Path(args.out) if args.out else None)
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_controller(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, get_settings

    try:
        get_settings(**({"database_url": args.database_url} if args.database_url else {})).check_data_dir()
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from service.controller import main as controller_main

    return controller_main(["--database-url", args.database_url] if args.database_url else [])


def cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, get_settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = get_settings(**overrides).check().check_data_dir()
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from service.app import create_app

    where = "none" if args.no_controller else args.controller
    app = create_app(settings, start_controller=where != "none", controller_process=where == "process")
    # no access log unless debugging: a line per request costs more than answering a cached study read
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                access_log=args.log_level in ("debug", "trace"))
    return 0
