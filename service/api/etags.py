"""Cheap answers for unchanged data: ETags of a study and of its trial pages, ``If-None-Match``
(304 without building a body), and a small cache of the bodies built.

A study's version is read with one small query (no JSON column): the row's ``updated_at``
(every write to it sets it, ``service.db.models``) and the columns its page shows; a trial
page adds the study's last event id (every change to a trial row is committed with its
event) and its highest trial number (a new trial has no event yet). The body cache is
keyed by that version, so it never serves what the database no longer says: it is derived
data, and the database stays the only state.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from fastapi import Response
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from service.db.models import Event, Study, Trial

FORM = "1"  # bump when a response's form changes: every ETag changes with it
CACHE_CONTROL = "private, no-cache"  # a browser may keep it, and asks again with If-None-Match
JSON_TYPE = "application/json"
# the columns a study's version is read from (its JSON columns change only with updated_at)
VERSION_COLUMNS = ("updated_at", "status", "trials_done", "trials_failed", "elapsed_seconds",
                   "best_trial_number", "best_value")


def _version_query(trials: bool) -> Any:
    sid = bindparam("sid")
    columns: list[Any] = [getattr(Study, name) for name in VERSION_COLUMNS]
    if trials:
        columns.append(select(func.max(Event.id)).where(Event.study_id == sid).scalar_subquery())
        columns.append(select(func.max(Trial.number)).where(Trial.study_id == sid).scalar_subquery())
    return select(*columns).where(Study.id == sid)


# built once: a statement built per request costs more than the query itself
_VERSION = {False: _version_query(False), True: _version_query(True)}


def study_version(session: Session, study_id: str, *, trials: bool = False) -> tuple[Any, ...] | None:
    """The study's version (None: no such study); ``trials``: also its trials' (one query)."""
    row = session.connection().execute(_VERSION[trials], {"sid": study_id}).one_or_none()
    return None if row is None else tuple(row)


def row_version(study: Study) -> tuple[Any, ...]:
    """:func:`study_version` (without trials) of a loaded row."""
    return tuple(getattr(study, name) for name in VERSION_COLUMNS)


def make_etag(*parts: Any) -> str:
    """A weak ETag of ``parts`` (their ``repr``: values of the database's own types)."""
    digest = hashlib.blake2b(repr((FORM, *parts)).encode(), digest_size=12).hexdigest()
    return f'W/"{digest}"'


def matches(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not header:
        return False
    if header.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in header.split(","))


def not_modified(etag: str) -> Response:
    return Response(status_code=304, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})


def json_body(body: bytes, etag: str) -> Response:
    return Response(body, media_type=JSON_TYPE, headers={"ETag": etag, "Cache-Control": CACHE_CONTROL})


class BodyCache:
    """Response bodies by key, least recently used first out, at most ``max_bytes`` in all
    (a body over an eighth of that is not kept). Thread-safe: sync routes run in a threadpool."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._bodies: OrderedDict[Any, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> bytes | None:
        with self._lock:
            body = self._bodies.get(key)
            if body is not None:
                self._bodies.move_to_end(key)
            return body

    def put(self, key: Any, body: bytes) -> None:
        if len(body) > self.max_bytes // 8:
            return
        with self._lock:
            old = self._bodies.pop(key, None)
            self._size += len(body) - (len(old) if old is not None else 0)
            self._bodies[key] = body
            while self._size > self.max_bytes:
                _, dropped = self._bodies.popitem(last=False)
                self._size -= len(dropped)

    def __len__(self) -> int:
        return len(self._bodies)
