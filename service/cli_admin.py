"""``evomerge migrate`` and ``evomerge token``: administration on the database itself.

They talk to the database directly (not to a server), so they work before anything is
served: a deployment migrates once, then creates the first token.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any


def database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    from service.settings import get_settings

    return str(get_settings().database_url)


def database_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report a refused or failed database command in one line (password masked), not a traceback."""

    @functools.wraps(func)
    def wrapper(args: argparse.Namespace) -> int:
        from sqlalchemy.exc import SQLAlchemyError

        from service.db.engine import redact_url

        try:
            return func(args)
        except SQLAlchemyError as exc:  # e.g. a database that cannot be reached
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            print(f"error: database {redact_url(database_url(args))}: {type(exc).__name__}: {reason}",
                  file=sys.stderr)
        except (ValueError, RuntimeError) as exc:  # MigrationError, TokenError, a bad URL or setting
            print(f"error: {exc}", file=sys.stderr)
        return 1

    return wrapper


@database_errors
def cmd_migrate(args: argparse.Namespace) -> int:
    from service.db.engine import redact_url
    from service.db.migrate import current, downgrade, upgrade

    url = database_url(args)
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

    url = database_url(args)
    upgrade(url)
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


@database_errors
def cmd_token_create(args: argparse.Namespace) -> int:
    from service.db.tokens import create_token

    with _token_session(args) as session:
        token = create_token(session, args.name, args.scopes)
    print(token)
    print(f"(token {args.name!r} created; it cannot be shown again: store it now. "
          "Send it as 'Authorization: Bearer <token>'.)", file=sys.stderr)
    return 0


@database_errors
def cmd_token_list(args: argparse.Namespace) -> int:
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


@database_errors
def cmd_token_revoke(args: argparse.Namespace) -> int:
    from service.db.tokens import revoke_token

    with _token_session(args) as session:
        n = revoke_token(session, args.name)
    if n == 0:
        print(f"error: no active token named {args.name!r} (`evomerge token list` shows them)",
              file=sys.stderr)
        return 1
    print(f"revoked {n} token(s) named {args.name!r}")
    return 0
