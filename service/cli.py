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
        token = create_token(session, args.name)
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
            print(f"{t.name:24s} {state:8s} created {t.created_at:%Y-%m-%d %H:%M} UTC  last used {used}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
