"""The ``evomerge`` command line."""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any


def _cmd_merge(args: argparse.Namespace) -> int:
    from search_spaces.recipe import Recipe
    from workers.merge import merge
    from workers.methods.base import MergeError
    from workers.model_io import ModelNotFoundError

    try:
        recipe = Recipe.from_file(args.recipe)
    except FileNotFoundError:
        print(f"error: recipe file {args.recipe} not found", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"error: {args.recipe} is not a valid recipe:\n{exc}", file=sys.stderr)
        return 2
    if args.dtype:
        recipe = recipe.model_copy(update={"out_dtype": args.dtype})
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = merge(
            recipe,
            args.out,
            shard_size=args.shard_size,
            device=args.device,
            show_progress=not args.quiet,
        )
    except (MergeError, ModelNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) "
        f"in {len(result.files)} file(s) to {result.out_dir}"
    )
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from workers import methods

    for name in methods.names():
        m = methods.get(name)
        params = ", ".join(p.name for p in m.model_params + m.global_params)
        print(f"{name:18s} {m.description}  [{params}]")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from workers.zoo.build import build_zoo

    zoo = build_zoo(args.out, seed=args.seed, scale=args.scale, force=args.force,
                    log=None if args.quiet else print)
    print(f"zoo (seed {zoo.seed}) at {zoo.root}, built in {zoo.seconds:.0f} s")
    for name, path in zoo.models.items():
        print(f"  {name:9s} {path}")
    print("\nexact match of each source model on every zoo task "
          "(the target is zoo_xl_add / zoo_xl_add_heldout):")
    print(zoo.table())
    return 0


def _database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    from service.settings import get_settings

    return str(get_settings().database_url)


def _database_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a refused or failed database command in one line (password masked), not a traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import SQLAlchemyError

        from service.db.engine import redact_url

        try:
            return func(args)
        except SQLAlchemyError as exc:  # e.g. a database that cannot be reached
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            print(f"error: database {redact_url(_database_url(args))}: {type(exc).__name__}: {reason}",
                  file=sys.stderr)
        except (ValueError, RuntimeError) as exc:  # MigrationError, TokenError, a bad URL or setting
            print(f"error: {exc}", file=sys.stderr)
        return 1

    return wrapper


@_database_errors
def _cmd_migrate(args: argparse.Namespace) -> int:
    from service.db.engine import redact_url
    from service.db.migrate import current, downgrade, upgrade

    url = _database_url(args)
    before = current(url)
    after = downgrade(url, args.revision) if args.downgrade else upgrade(url, args.revision)
    change = "already at" if before == after else f"{before or 'empty'} ->"
    print(f"database {redact_url(url)}: {change} {after or 'base (no evomerge tables)'}")
    return 0


@contextlib.contextmanager
def _token_session(args: argparse.Namespace) -> Iterator[Any]:
    """A session in a transaction on the migrated database (token commands upgrade it
    first, which is idempotent, so `evomerge token create` works on a fresh machine)."""
    from service.db.engine import make_engine, session_factory
    from service.db.migrate import upgrade

    url = _database_url(args)
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


@_database_errors
def _cmd_token_create(args: argparse.Namespace) -> int:
    from service.db.tokens import create_token

    with _token_session(args) as session:
        token = create_token(session, args.name, args.scopes)
    print(token)
    print(f"(token {args.name!r} created; it cannot be shown again: store it now. "
          "Send it as 'Authorization: Bearer <token>'.)", file=sys.stderr)
    return 0


@_database_errors
def _cmd_token_list(args: argparse.Namespace) -> int:
    from service.db.tokens import list_tokens

    with _token_session(args) as session:
        tokens = list_tokens(session, include_revoked=args.all)
        if not tokens:
            print("no tokens" + ("" if args.all else " (--all shows revoked ones)"))
        for t in tokens:
            used = f"{t.last_used_at:%Y-%m-%d %H:%M}" if t.last_used_at else "never"
            state = "revoked" if t.revoked else "active"
            print(f"{t.name:24s} {state:8s} {t.scopes:20s} created {t.created_at:%Y-%m-%d %H:%M} UTC  "
                  f"last used {used}")
    return 0


@_database_errors
def _cmd_token_revoke(args: argparse.Namespace) -> int:
    from service.db.tokens import revoke_token

    with _token_session(args) as session:
        n = revoke_token(session, args.name)
    if n == 0:
        print(f"error: no active token named {args.name!r} (`evomerge token list` shows them)",
              file=sys.stderr)
        return 1
    print(f"revoked {n} token(s) named {args.name!r}")
    return 0



# ---- client commands (they talk to a running server over HTTP) -----------------------------------
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
def _cmd_submit(args: argparse.Namespace) -> int:
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
        return _watch(client, study)


def _watch(client: Any, study: dict[str, Any]) -> int:
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
def _cmd_studies(args: argparse.Namespace) -> int:
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
def _cmd_status(args: argparse.Namespace) -> int:
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
def _cmd_action(args: argparse.Namespace) -> int:
    with _client(args) as client:
        study = client.action(args.id, args.action)
    print(f"study {study['id']} is {study['status']}")
    return 0


@_api_errors
def _cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.id)
    print(f"study {args.id} deleted")
    return 0


@_api_errors
def _cmd_download(args: argparse.Namespace) -> int:
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


def _cmd_demo(args: argparse.Namespace) -> int:
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


def _cmd_controller(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, get_settings

    try:
        get_settings(**({"database_url": args.database_url} if args.database_url else {})).check_data_dir()
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from service.controller import main as controller_main

    return controller_main(["--database-url", args.database_url] if args.database_url else [])


def _cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, get_settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = get_settings(**overrides).check().check_data_dir()
    except (SettingsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    from service.app import create_app

    uvicorn.run(create_app(settings, start_controller=not args.no_controller), host=settings.host,
                port=settings.port, log_level=args.log_level)
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="the server (default: EVOMERGE_URL, else http://127.0.0.1:8765)")
    p.add_argument("--token", default=None, help="API token (default: EVOMERGE_TOKEN)")


def _add_client_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the API server (and the study controller)")
    p.add_argument("--host", default=None, help="address to bind (default: EVOMERGE_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: EVOMERGE_PORT, else 8765)")
    p.add_argument("--no-controller", action="store_true",
                   help="serve the API only (another process runs studies)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("controller", help="run the study controller alone (beside `serve --no-controller`)")
    p.add_argument("--database-url", default=None, help="default: EVOMERGE_DATABASE_URL")
    p.set_defaults(func=_cmd_controller)

    p = sub.add_parser("submit", help="submit a study spec (YAML or JSON) and print its id")
    p.add_argument("spec", help="the study spec file (docs/study-spec.md)")
    p.add_argument("--watch", action="store_true", help="follow it with a progress bar until it ends")
    _client_options(p)
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("studies", help="list studies, newest first")
    p.add_argument("--status", default=None,
                   help="only this status (queued, running, paused, completed, ...)")
    p.add_argument("--owner", default=None, help="only studies of this token name")
    p.add_argument("--name", default=None, help="only names containing this")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    _client_options(p)
    p.set_defaults(func=_cmd_studies)

    p = sub.add_parser("status", help="a study's status, progress and best trial")
    p.add_argument("id")
    _client_options(p)
    p.set_defaults(func=_cmd_status)

    for action, text in (("pause", "pause a study (running trials finish)"),
                         ("resume", "resume a paused study"), ("cancel", "cancel a study (final)")):
        p = sub.add_parser(action, help=text)
        p.add_argument("id")
        _client_options(p)
        p.set_defaults(func=_cmd_action, action=action)

    p = sub.add_parser("download", help="export a trial's merged model and download it (resumable)")
    p.add_argument("id", help="the study")
    p.add_argument("out", help="folder to put the model in (a Hugging Face model folder)")
    p.add_argument("--trial", type=int, default=None, help="the trial number (default: the best)")
    p.add_argument("--keep-archive", action="store_true", help="keep OUT.tar beside the folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _client_options(p)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("delete", help="delete a completed, failed or cancelled study, with its trials "
                                         "(cancel it first)")
    p.add_argument("id")
    _client_options(p)
    p.set_defaults(func=_cmd_delete)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Evolutionary search for model-merge recipes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge models from a recipe (YAML/JSON, mergekit's too)")
    p.add_argument("recipe", help="recipe file")
    p.add_argument("out", help="output folder (created; replaced if it exists)")
    p.add_argument("--dtype", help="dtype of the written model (float32, bfloat16, float16)")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 2GB (default 5GB)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the arithmetic")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("demo", help="the whole product on the demo zoo: serve, search, download, compare")
    p.add_argument("--serve", action="store_true", help="keep the service running afterwards (dashboard)")
    p.add_argument("--trials", type=int, default=None, help="the study's budget (default: the demo spec's)")
    p.add_argument("--seed", type=int, default=None, help="the study's seed (default: the demo spec's)")
    p.add_argument("--data-dir", default=None, help="default: EVOMERGE_DATA_DIR, else ./evomerge-data")
    p.add_argument("--port", type=int, default=None, help="default: 8765, else a free port")
    p.add_argument("--out", default=None,
                   help="where the best model goes (default: DATA_DIR/demo-best-model)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.set_defaults(func=_cmd_methods)

    zoo = sub.add_parser("zoo", help="the demo zoo: tiny models to merge, built locally")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    p = zoo_sub.add_parser("build", help="build (or reuse) the demo zoo and print its scores")
    p.add_argument("--out", default=None, help="folder (default: ~/.cache/evomerge/zoo/...)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="shorten training (tests use < 1)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_zoo_build)

    url_help = "database URL (default: EVOMERGE_DATABASE_URL, else sqlite under EVOMERGE_DATA_DIR)"
    p = sub.add_parser("migrate", help="bring the database schema up to date (a one-shot deployment step)")
    p.add_argument("--database-url", default=None, help=url_help)
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--downgrade", action="store_true",
                   help="go down to --revision instead (base: drop evomerge's tables; Optuna's stay)")
    p.set_defaults(func=_cmd_migrate)

    token = sub.add_parser("token", help="API tokens (needed when EVOMERGE_AUTH=true)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    p = token_sub.add_parser("create", help="create a token and print it (once)")
    p.add_argument("name", help="a name for the token, e.g. the person or machine using it")
    p.add_argument("--scopes", default=None,
                   help="comma-separated: read (see studies), write (submit and change them), download "
                        "(export and download models); default: all three")
    p.add_argument("--database-url", default=None, help=url_help)
    p.set_defaults(func=_cmd_token_create)
    p = token_sub.add_parser("list", help="list tokens (names and dates, never the secrets)")
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--database-url", default=None, help=url_help)
    p.set_defaults(func=_cmd_token_list)
    p = token_sub.add_parser("revoke", help="revoke the active token(s) with this name")
    p.add_argument("name")
    p.add_argument("--database-url", default=None, help=url_help)
    p.set_defaults(func=_cmd_token_revoke)

    _add_client_commands(sub)
    return parser


WORKER_MODULES = ("torch", "transformers", "accelerate")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as exc:
        if exc.name not in WORKER_MODULES:
            raise
        print(f"error: `evomerge {args.command}` builds or scores models and needs {exc.name}, which this "
              "install lacks (the API-only install has no torch): install the worker extra, "
              "`pip install 'evomerge[worker]'` (torch first, pinned: see the Makefile's TORCH_SPEC)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
