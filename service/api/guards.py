"""What stands between a hostile or unlucky request and a 500.

- :class:`BodyGuard` (ASGI middleware) caps every request body before any route reads it
  (413) and refuses a JSON body nested deeper than :data:`MAX_JSON_DEPTH` levels (400),
  with one cheap pass over the bytes, before any parser recurses into it.
- :func:`add_error_handlers` maps what is left to a clear 4xx or 5xx: a ``RecursionError``
  to 400, a request that does not validate to a 422 that does not echo it, a write that the
  disk or database refused to 507 (full) or 503 (read-only, unreachable), never a bare 500
  (``service.faults``).
"""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.faults import write_fault

log = logging.getLogger("evomerge.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: No body this API reads nests deeper (a study spec needs fewer than 10 levels).
MAX_JSON_DEPTH = 64
#: The cap of every body but a study spec's (an export request is a few bytes).
SMALL_BODY_BYTES = 64 * 1024
#: Routes whose body may be as large as EVOMERGE_MAX_BODY_BYTES: (method, path).
LARGE_BODY_ROUTES = {("POST", "/studies")}
_READS_BODY = {"POST", "PUT", "PATCH"}
_MAX_LENGTH_DIGITS = 18  # a Content-Length longer than this is larger than any cap (and than int64)

# a JSON string (escapes included; an unterminated one runs to the end) or one bracket
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_BRACKETS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def json_depth(body: bytes) -> int:
    """How deep the brackets of a JSON text nest (brackets inside strings do not count).

    Linear in the body: strings are cut out by one regular expression (no backtracking),
    the brackets left become +1/-1 bytes, and the deepest running sum is the depth.
    """
    brackets = _STRING.sub(b"", body).translate(None, _NOT_BRACKETS).translate(_BRACKETS)
    if not brackets:
        return 0
    return max(0, max(itertools.accumulate(memoryview(brackets).cast("b"))))


def _json_like(scope: Scope) -> bool:
    """Is the body meant to be JSON? (What FastAPI parses as JSON: no type, or a JSON type.)"""
    for name, value in scope.get("headers") or ():
        if name == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            return not kind or kind.endswith(b"json")
    return True


def _declared_length(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            return value.decode("latin-1").strip()
    return None


def _too_large_message(size: int | None, limit: int, large: bool) -> str:
    what = f"is {size} bytes" if size is not None else "is larger than that"
    if large:
        return (f"the request body {what}; this server accepts at most {limit} (EVOMERGE_MAX_BODY_BYTES): "
                "a study spec names its models, it does not carry them")
    return (f"the request body {what}; this route accepts at most {limit} bytes (its body is a small "
            "JSON object: see the API reference)")


class BodyGuard:
    """Caps and checks request bodies (see the module docstring); ``max_body_bytes`` is the cap
    of :data:`LARGE_BODY_ROUTES`, every other route gets ``min(max_body_bytes, SMALL_BODY_BYTES)``."""

    def __init__(self, app: Any, *, max_body_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        large = (scope["method"], scope["path"].rstrip("/") or "/") in LARGE_BODY_ROUTES
        limit = self.max_body_bytes if large else min(self.max_body_bytes, SMALL_BODY_BYTES)
        declared = _declared_length(scope)
        if declared is not None and declared.isascii() and declared.isdigit():
            if len(declared) > _MAX_LENGTH_DIGITS or int(declared) > limit:
                size = int(declared) if len(declared) <= _MAX_LENGTH_DIGITS else None
                await _refuse(send, 413, _too_large_message(size, limit, large))
                return
        if scope["method"] not in _READS_BODY:
            await self.app(scope, receive, send)
            return
        body = await _read_capped(receive, limit)
        if body is None:
            await _refuse(send, 413, _too_large_message(None, limit, large))
            return
        if _json_like(scope) and (depth := json_depth(body)) > self.max_depth:
            await _refuse(send, 400, f"the JSON body nests {depth} levels deep; this server accepts at most "
                                     f"{self.max_depth} levels (no request it takes needs more): flatten it")
            return
        await self.app(scope, _replay(body, receive), send)


async def _read_capped(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None as soon as it exceeds ``limit`` bytes (the rest is not read)."""
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client left
            return bytes(body)
        body.extend(message.get("body", b""))
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then waits on the real one (for the disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _refuse(send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# ---- exception handlers ---------------------------------------------------------------------------
async def _recursion(_request: Request, _exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"the request nests too deeply to be read; send at most {MAX_JSON_DEPTH} "
                                   "levels of nesting"}, status_code=400)


async def _storage(request: Request, exc: Exception) -> JSONResponse:
    """A write the disk or the database refused: 507 (full) or 503 (read-only, unreachable)."""
    fault = write_fault(exc)
    if fault is None:
        raise exc  # not a fault of the storage: the server's own 500 (and its log)
    log.warning("%s %s: %s", request.method, request.url.path, fault.reason)
    retry = {"Retry-After": "30"}
    return JSONResponse({"detail": f"the server cannot store this now: {fault.reason}"},
                        status_code=fault.status_code, headers=retry)


def _clean(value: Any, limit: int = 200) -> Any:
    """A location part or message safe to send back: ints as they are; text shortened, with
    lone surrogates (valid in a JSON escape, not in UTF-8) written as escapes."""
    if isinstance(value, int):
        return value
    text = str(value)[:limit]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


async def _invalid_request(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 without the ``input`` it would echo: an echo can be megabytes, and can hold
    what JSON cannot carry back (an infinite float, a lone surrogate), which made it a 500."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": [_clean(part) for part in err.get("loc", ())], "msg": _clean(err.get("msg", ""), 500),
               "type": _clean(err.get("type", ""))} for err in errors[:50]]
    return JSONResponse({"detail": detail}, status_code=422)


def add_error_handlers(app: FastAPI) -> None:
    """RecursionError → 400; a request that does not validate → 422 without echoing it; storage
    faults (SQLAlchemy's OperationalError, ENOSPC, EROFS) → 507 / 503 with what to do."""
    from sqlalchemy.exc import DBAPIError

    app.add_exception_handler(RecursionError, _recursion)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(DBAPIError, _storage)
    app.add_exception_handler(OSError, _storage)
