"""What routes need from the running app: its settings, sessions, and the caller's identity.

Every study is visible to every valid token (a team's shared service); the token's name
is recorded as the study's owner. Without auth (the embedded local default, loopback
only) the owner is ``local``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.db.tokens import verify_token
from service.settings import Settings

LOCAL_OWNER = "local"
_bearer = HTTPBearer(auto_error=False, description="a token from `evomerge token create NAME`")


@dataclass
class AppState:
    """Built by the app's start-up hook (``service.app``); routes read it from ``app.state.evomerge``."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    controller: Any = None
    poll_seconds: float = 0.5


def app_state(request: Request) -> AppState:
    state = getattr(request.app.state, "evomerge", None)
    if state is None:  # the lifespan did not run (an ASGI server always runs it)
        raise HTTPException(503, "the service is starting up; try again in a moment")
    return state


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


def caller(
    state: AppState = Depends(app_state),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> str:
    """The caller's name (the token's), or 401. Runs in a threadpool (a database lookup)."""
    if not state.settings.auth:
        return LOCAL_OWNER
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized(
            "this server needs an API token: send 'Authorization: Bearer <token>' "
            "(create one with `evomerge token create NAME`; the CLI reads EVOMERGE_TOKEN or --token)"
        )
    with state.sessions.begin() as session:
        token = verify_token(session, credentials.credentials)
        if token is None:
            raise _unauthorized(
                "the API token is not valid or was revoked: check it, or create a new one with "
                "`evomerge token create NAME` (`evomerge token list` shows the active ones)"
            )
        return token.name
