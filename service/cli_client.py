"""The client commands (``submit``, ``studies``, ``status``, ``pause``/``resume``/``cancel``,
``download``, ``delete``): they talk to a running server over HTTP (``service.api.client``),
so they need no database and no torch.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any


def _client(args: argparse.Namespace) -> Any:
    from service.api.client import Client

    return Client(args.url, args.token)


def _api_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print the API's refusal (a 422's problems one a line) instead of a traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from service.api.client import ApiError

        try:
            return func(args)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapper


def _fmt(value: Any, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


def _budget(study: dict[str, Any]) -> str:
    parts = []
    if study.get("max_trials") is not None:
        parts.append(f"{study['trials_done']}/{study['max_trials']} trials")
    else:
        parts.append(f"{study['trials_done']} trials")
    if study.get("max_seconds") is not None:
        parts.append(f"{study['elapsed_seconds']:.0f}/{study['max_seconds']:.0f} s")
    return ", ".join(parts)


@_api_errors
def cmd_submit(args: argparse.Namespace) -> int:
    from service.api.client import spec_body

    try:
        body, content_type = spec_body(args.spec)
    except OSError as exc:
        print(f"error: cannot read the spec {args.spec}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    with _client(args) as client:
        study = client.submit(body, content_type)
        print(study["id"])
        for warning in study.get("warnings") or []:
            print(f"warning: {warning}", file=sys.stderr)
        if not args.watch:
            print(f"(study {study['name']!r} queued; follow it with `evomerge status {study['id']}` "
                  f"or `evomerge submit --watch`)", file=sys.stderr)
            return 0
        return watch(client, study)


def watch(client: Any, study: dict[str, Any]) -> int:
    """Follow the study's event stream with a progress bar until it ends; 0 if it completed."""
    from tqdm import tqdm

    bar = None
    last = study
    try:
        for kind, data in client.events(study["id"]):
            if kind not in ("progress", "end") or "trials_done" not in data:
                continue
            last = {**last, **data}
            if bar is None:
                bar = tqdm(total=last.get("max_trials"), initial=last["trials_done"], unit="trial",
                           desc=study["id"], file=sys.stderr, dynamic_ncols=True)
            bar.n = last["trials_done"]
            postfix = {"best": _fmt(last.get("best_value")), "status": last["status"]}
            if last.get("max_seconds") is not None:
                postfix["time left"] = f"{max(0.0, last['max_seconds'] - last['elapsed_seconds']):.0f}s"
            bar.set_postfix(postfix, refresh=True)
    finally:
        if bar is not None:
            bar.close()
    final = client.study(study["id"]) if last.get("status") != "deleted" else last
    at = f" (trial {final['best_trial_number']})" if final.get("best_trial_number") is not None else ""
    print(f"study {study['id']} {final['status']}: {_budget(final)}, "
          f"best fitness {_fmt(final.get('best_value'))}{at}")
    if final.get("error"):
        print(f"error: {final['error']}", file=sys.stderr)
    return 0 if final["status"] == "completed" else 1


@_api_errors
def cmd_studies(args: argparse.Namespace) -> int:
    with _client(args) as client:
        page = client.studies(status=args.status, owner=args.owner, name=args.name, limit=args.limit,
                              offset=args.offset)
    if not page["items"]:
        print("no studies")
        return 0
    print(f"{'ID':12s}  {'STATUS':9s}  {'PROGRESS':24s}  {'BEST':>8s}  {'OWNER':10s}  NAME")
    for s in page["items"]:
        print(f"{s['id']:12s}  {s['status']:9s}  {_budget(s):24s}  {_fmt(s['best_value']):>8s}  "
              f"{(s['owner'] or '-'):10s}  {s['name']}")
    shown = page["offset"] + len(page["items"])
    if shown < page["total"]:
        print(f"({shown} of {page['total']}; --offset {shown} shows more)")
    return 0


@_api_errors
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        s = client.study(args.id)
        best = client.best(args.id)
    print(f"study   {s['id']}  {s['name']!r}")
    print(f"status  {s['status']}  (owner {s['owner'] or '-'}, created {s['created_at']})")
    print(f"budget  {_budget(s)}, {s['trials_failed']} failed")
    if best is not None:
        print(f"best    trial {best['number']}: fitness {_fmt(best['fitness'])}  scores {best['scores']}")
    else:
        print("best    no complete trial yet")
    if s.get("error"):
        print(f"error   {s['error']}")
    for warning in s.get("warnings") or []:
        print(f"warning {warning}")
    return 0


@_api_errors
def cmd_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        study = client.action(args.id, args.action)
    print(f"study {study['id']} is {study['status']}")
    return 0


@_api_errors
def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.id)
    print(f"study {args.id} deleted")
    return 0


@_api_errors
def cmd_download(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tqdm import tqdm

    from service.download import DownloadError, download

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} exists and is not empty (--force replaces it)", file=sys.stderr)
        return 2
    bars: dict[str, Any] = {}

    def progress(phase: str, done: int, total: int | None) -> None:
        if phase not in bars:
            for bar in bars.values():
                bar.close()
            unit = {"export": "‰", "download": "B"}[phase]
            bars[phase] = tqdm(total=total, unit=unit, unit_scale=phase == "download", file=sys.stderr,
                               desc="exporting" if phase == "export" else "downloading", dynamic_ncols=True)
        bars[phase].n = done
        bars[phase].refresh()

    try:
        with _client(args) as client:
            export = download(client, args.id, out, trial=args.trial, keep_archive=args.keep_archive,
                              progress=None if args.quiet else progress)
    except DownloadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():
            bar.close()
    print(f"trial {export['trial_number']} of study {args.id} -> {out} "
          f"({export['size_bytes'] / 1e6:.1f} MB, sha256 {export['sha256'][:16]}… verified)")
    return 0
