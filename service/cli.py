"""The ``evomerge`` command line: the argument parser and the dispatch to a command.

The commands live by job: the merge engine run locally (:mod:`service.cli_engine`),
database administration (:mod:`service.cli_admin`), the REST client
(:mod:`service.cli_client`) and running the service (:mod:`service.cli_serve`, with
the demo). Each imports what it needs inside the command, so parsing stays light.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service import cli_admin as admin
from service import cli_client as client
from service import cli_engine as engine
from service import cli_serve as serve


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="the server (default: EVOMERGE_URL, else http://127.0.0.1:8765)")
    p.add_argument("--token", default=None, help="API token (default: EVOMERGE_TOKEN)")


def _add_client_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="run the API server (and the study controller)")
    p.add_argument("--host", default=None, help="address to bind (default: EVOMERGE_HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default: EVOMERGE_PORT, else 8765)")
    p.add_argument("--controller", choices=("process", "in-process", "none"), default="process",
                   help="where the study controller runs: process (default), a child process that serve "
                        "supervises, restarts if it dies and stops on exit; in-process, a thread of the API "
                        "process (tests, debugging); none, see --no-controller")
    p.add_argument("--no-controller", action="store_true",
                   help="serve the API only (another process runs studies: `evomerge controller`)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=serve.cmd_serve)

    p = sub.add_parser("controller", help="run the study controller alone (beside `serve --no-controller`)")
    p.add_argument("--database-url", default=None, help="default: EVOMERGE_DATABASE_URL")
    p.set_defaults(func=serve.cmd_controller)

    p = sub.add_parser("submit", help="submit a study spec (YAML or JSON) and print its id")
    p.add_argument("spec", help="the study spec file (docs/study-spec.md)")
    p.add_argument("--watch", action="store_true", help="follow it with a progress bar until it ends")
    _client_options(p)
    p.set_defaults(func=client.cmd_submit)

    p = sub.add_parser("studies", help="list studies, newest first")
    p.add_argument("--status", default=None,
                   help="only this status (queued, running, paused, completed, ...)")
    p.add_argument("--owner", default=None, help="only studies of this token name")
    p.add_argument("--name", default=None, help="only names containing this")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--offset", type=int, default=0)
    _client_options(p)
    p.set_defaults(func=client.cmd_studies)

    p = sub.add_parser("status", help="a study's status, progress and best trial")
    p.add_argument("id")
    _client_options(p)
    p.set_defaults(func=client.cmd_status)

    for action, text in (("pause", "pause a study (running trials finish)"),
                         ("resume", "resume a paused study"), ("cancel", "cancel a study (final)")):
        p = sub.add_parser(action, help=text)
        p.add_argument("id")
        _client_options(p)
        p.set_defaults(func=client.cmd_action, action=action)

    p = sub.add_parser("download", help="export a trial's merged model and download it (resumable)")
    p.add_argument("id", help="the study")
    p.add_argument("out", help="folder to put the model in (a Hugging Face model folder)")
    p.add_argument("--trial", type=int, default=None, help="the trial number (default: the best)")
    p.add_argument("--keep-archive", action="store_true", help="keep OUT.tar beside the folder")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _client_options(p)
    p.set_defaults(func=client.cmd_download)

    p = sub.add_parser("delete", help="delete a completed, failed or cancelled study, with its trials "
                                         "(cancel it first)")
    p.add_argument("id")
    _client_options(p)
    p.set_defaults(func=client.cmd_delete)


def _add_zoo_commands(sub: Any) -> None:
    from workers.zoo.variants import DEFAULT, VARIANTS  # declarations only, no torch

    zoo = sub.add_parser("zoo", help="the demo zoo family: tiny models to merge, built locally")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    listed = "\n".join(f"  {name:12s} {v.summary}" for name, v in VARIANTS.items())
    raw = argparse.RawDescriptionHelpFormatter
    p = zoo_sub.add_parser("build", help="build (or reuse) a zoo and print its scores",
                           epilog=f"variants:\n{listed}", formatter_class=raw)
    p.add_argument("--variant", default=DEFAULT, choices=list(VARIANTS), metavar="NAME",
                   help=f"which zoo of the family (default {DEFAULT}; the variants are listed below)")
    p.add_argument("--out", default=None, help="folder (default: ~/.cache/evomerge/zoo/...)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="shorten training (tests use < 1)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=engine.cmd_zoo_build)
    p = zoo_sub.add_parser("list", help="the zoo variants: models, target task, what each is for")
    p.set_defaults(func=engine.cmd_zoo_list)


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
    p.set_defaults(func=engine.cmd_merge)

    p = sub.add_parser("demo", help="the whole product on the demo zoo: serve, search, download, compare")
    p.add_argument("--serve", action="store_true", help="keep the service running afterwards (dashboard)")
    p.add_argument("--trials", type=int, default=None, help="the study's budget (default: the demo spec's)")
    p.add_argument("--seed", type=int, default=None, help="the study's seed (default: the demo spec's)")
    p.add_argument("--data-dir", default=None, help="default: EVOMERGE_DATA_DIR, else ./evomerge-data")
    p.add_argument("--port", type=int, default=None, help="default: 8765, else a free port")
    p.add_argument("--out", default=None,
                   help="where the best model goes (default: DATA_DIR/demo-best-model)")
    p.set_defaults(func=serve.cmd_demo)

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.set_defaults(func=engine.cmd_methods)

    _add_zoo_commands(sub)
    url_help = "database URL (default: EVOMERGE_DATABASE_URL, else sqlite under EVOMERGE_DATA_DIR)"
    p = sub.add_parser("migrate", help="bring the database schema up to date (a one-shot deployment step)")
    p.add_argument("--database-url", default=None, help=url_help)
    p.add_argument("--revision", default="head", help="target revision (default: head)")
    p.add_argument("--downgrade", action="store_true",
                   help="go down to --revision instead (base: drop evomerge's tables; Optuna's stay)")
    p.set_defaults(func=admin.cmd_migrate)

    token = sub.add_parser("token", help="API tokens (needed when EVOMERGE_AUTH=true)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    p = token_sub.add_parser("create", help="create a token and print it (once)")
    p.add_argument("name", help="a name for the token, e.g. the person or machine using it")
    p.add_argument("--scopes", default=None,
                   help="comma-separated: read (see studies), write (submit and change them), download "
                        "(export and download models); default: all three")
    p.add_argument("--database-url", default=None, help=url_help)
    p.set_defaults(func=admin.cmd_token_create)
    p = token_sub.add_parser("list", help="list tokens (names and dates, never the secrets)")
    p.add_argument("--all", action="store_true", help="include revoked tokens")
    p.add_argument("--database-url", default=None, help=url_help)
    p.set_defaults(func=admin.cmd_token_list)
    p = token_sub.add_parser("revoke", help="revoke the active token(s) with this name")
    p.add_argument("name")
    p.add_argument("--database-url", default=None, help=url_help)
    p.set_defaults(func=admin.cmd_token_revoke)

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
