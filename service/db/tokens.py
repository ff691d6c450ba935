"""API tokens: random secrets shown once; the database keeps only their SHA-256.

The functions flush but do not commit: the caller owns the transaction
(``with Session.begin() as session: token = create_token(session, "ci")``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db.models import ApiToken
from service.db.types import utcnow

TOKEN_PREFIX = "em_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}")
# last_used_at is refreshed at most this often: no database write on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class TokenError(ValueError):
    """A token operation was refused; the message says why."""


def hash_token(token: str) -> str:
    """The SHA-256 (hex) the database stores for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise TokenError(
            f"token name {name!r} is not valid: use 1-100 letters, digits, '.', '_', '@' or '-', "
            "starting with a letter or digit"
        )
    return name


SCOPES = ("read", "write", "download")
"""read: see studies; write: submit, pause/resume/cancel, delete; download: export and
download merged models (weights can be worth more than a view of the scores)."""


def parse_scopes(scopes: str | list[str] | tuple[str, ...] | None) -> str:
    """Validated, canonical scopes (comma-joined, in ``SCOPES`` order); None means all."""
    if scopes is None:
        return ",".join(SCOPES)
    items = [x.strip() for x in (scopes.split(",") if isinstance(scopes, str) else scopes) if x.strip()]
    unknown = sorted(set(items) - set(SCOPES))
    if unknown or not items:
        raise TokenError(f"unknown or empty token scopes {unknown or items!r}: choose from "
                         f"{', '.join(SCOPES)} (comma-separated, e.g. 'read,download')")
    return ",".join(s for s in SCOPES if s in items)


def create_token(session: Session, name: str, scopes: str | list[str] | None = None) -> str:
    """Create a token called ``name`` with ``scopes`` (default: all) and return it: the only
    time it can be seen.

    Refused while another unrevoked token has the same name (revoke it first).
    """
    _check_name(name)
    scope_text = parse_scopes(scopes)
    active = session.scalar(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked.is_(False)))
    if active is not None:
        raise TokenError(
            f"an active token named {name!r} exists (created {active.created_at:%Y-%m-%d %H:%M} UTC); "
            f"revoke it first (`evomerge token revoke {name}`) or choose another name"
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(name=name, token_hash=hash_token(token), scopes=scope_text))
    session.flush()
    return token


def verify_token(session: Session, token: str | None) -> ApiToken | None:
    """The unrevoked token ``token`` is, or None. Looks up by hash (the secret itself is
    never compared), and refreshes ``last_used_at`` at most once a minute."""
    if not token:
        return None
    digest = hash_token(token.strip())
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest))
    if row is None or row.revoked or not hmac.compare_digest(row.token_hash, digest):
        return None
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        row.last_used_at = now
        session.flush()
    return row


def revoke_token(session: Session, name: str) -> int:
    """Revoke every active token called ``name``; returns how many were revoked."""
    rows = session.scalars(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked.is_(False))).all()
    for row in rows:
        row.revoked = True
    session.flush()
    return len(rows)


def list_tokens(session: Session, *, include_revoked: bool = True) -> list[ApiToken]:
    """All tokens (never their secrets), oldest first."""
    query = select(ApiToken).order_by(ApiToken.created_at, ApiToken.id)
    if not include_revoked:
        query = query.where(ApiToken.revoked.is_(False))
    return list(session.scalars(query))
