"""What routes need from the running app: its settings, sessions, and the caller's identity.

Every study is visible to every valid token (a team's shared service); the token's name
is recorded as the study's owner. Without auth (the embedded local default, loopback
only) the owner is ``local``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.api.etags import BodyCache
from service.db.tokens import SCOPES, verify_token
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
    hub: Any = None  # the live streams' EventHub (service.api.event_hub), made by the lifespan
    bodies: BodyCache = field(default_factory=BodyCache)  # response bodies by ETag (service.api.etags)


async def app_state(request: Request) -> AppState:
    """The app's state (async, as every dependency that does no I/O: a sync one costs a thread hop)."""
    state = getattr(request.app.state, "evomerge", None)
    if state is None:  # the lifespan did not run (an ASGI server always runs it)
        raise HTTPException(503, "the service is starting up; try again in a moment")
    return state


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


async def caller(
    request: Request,
    state: AppState = Depends(app_state),
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> str:
    """The caller's name (the token's), or 401. The token is looked up in a threadpool (a database
    lookup); with auth off nothing is. The scopes are left in ``request.state.scopes`` for :func:`require`."""
    if not state.settings.auth:
        request.state.scopes = frozenset(SCOPES)
        return LOCAL_OWNER
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized(
            "this server needs an API token: send 'Authorization: Bearer <token>' "
            "(create one with `evomerge token create NAME`; the CLI reads EVOMERGE_TOKEN or --token)"
        )
    return await run_in_threadpool(_token_owner, request, state, credentials.credentials)


def _token_owner(request: Request, state: AppState, secret: str) -> str:
    with state.sessions.begin() as session:
        token = verify_token(session, secret)
        if token is None:
            raise _unauthorized(
                "the API token is not valid or was revoked: check it, or create a new one with "
                "`evomerge token create NAME` (`evomerge token list` shows the active ones)"
            )
        request.state.scopes = frozenset(token.scopes.split(","))
        return token.name


def require(scope: str) -> Any:
    """A dependency: the caller's name when its token has ``scope``, else 403."""
    assert scope in SCOPES, scope

    async def check(request: Request, who: str = Depends(caller)) -> str:
        if scope not in getattr(request.state, "scopes", frozenset()):
            raise HTTPException(403, f"the token {who!r} may not {_DOING[scope]}: it lacks the {scope!r} "
                                     f"scope (create one with `evomerge token create NAME --scopes "
                                     f"read,write,download`)")
        return who

    check.__name__ = f"require_{scope}"
    return Depends(check)


_DOING = {"read": "read studies", "write": "change studies", "download": "export or download models"}


READ = require("read")
WRITE = require("write")
DOWNLOAD = require("download")
