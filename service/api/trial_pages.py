"""A study's trials page (``GET /studies/{id}/trials``), built as JSON straight from the rows.

Compact by default: a trial's ``recipe`` and ``params`` (the large fields) come only when
asked for (``include=recipe,params``). Pages go by ``offset`` or, for the ``number`` sorts, by
keyset (``after``: the last number of the page before, answered with ``next_after``).

No ORM object and no pydantic model per trial: the scalar columns are read as values and
serialized by pydantic-core (as ``TrialOut`` would), and the JSON columns are read as the
JSON text the database holds and copied into the body as they are, never decoded. The one
exception is stored text holding ``NaN`` or ``Infinity`` (Python's json writes them; JSON
has no such numbers): that value is decoded and written with ``null`` for them, as a
pydantic model writes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException
from pydantic_core import from_json, to_json
from sqlalchemy import Text, cast, func, select
from sqlalchemy.orm import Session

from service.db.models import Trial, TrialState

MAX_LIMIT = 500
INCLUDABLE = ("recipe", "params")  # the large fields, left out unless asked for
JSON_FIELDS = ("scores", "metrics", "values", "timings")  # always there (small)
SCALARS = ("number", "state", "fitness", "failure_reason", "attempts", "worker", "examples", "tokens",
           "worker_seconds", "cached", "rung", "created_at", "started_at", "finished_at")
KEYSET_SORTS = ("number", "-number")
SORTS: dict[str, Any] = {
    "number": Trial.number.asc(), "-number": Trial.number.desc(),
    "fitness": Trial.fitness.asc().nulls_last(), "-fitness": Trial.fitness.desc().nulls_last(),
    "finished_at": Trial.finished_at.asc().nulls_last(),
    "-finished_at": Trial.finished_at.desc().nulls_last(),
}


@dataclass(frozen=True)
class PageQuery:
    """What a trials page asks for (the cache key of its body, with the study's version)."""

    sort: str = "number"
    state: TrialState | None = None
    limit: int = 50
    offset: int = 0
    after: int | None = None
    include: tuple[str, ...] = ()


def _invalid(param: str, msg: str) -> HTTPException:
    """A 422 shaped as FastAPI's own for a query parameter (one schema for every 422)."""
    return HTTPException(422, [{"loc": ["query", param], "msg": msg, "type": "value_error"}])


def parse_include(text: str | None) -> tuple[str, ...]:
    """``include=recipe,params`` (comma-separated; repeats and order do not matter) -> the fields."""
    if not text:
        return ()
    names = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(INCLUDABLE))
    if unknown:
        raise _invalid("include", f"include={text!r}: unknown field(s) {', '.join(map(repr, unknown))}; "
                                 f"a trials page can add {' and '.join(INCLUDABLE)} (include=recipe,params), "
                                 "every other field is always there; GET /studies/{id}/trials/{n} has all "
                                 "of one trial")
    return tuple(f for f in INCLUDABLE if f in names)


def check(q: PageQuery) -> None:
    """422 for ``after`` where it cannot work, with what to send instead."""
    if q.after is None:
        return
    if q.sort not in KEYSET_SORTS:
        raise _invalid("after", f"after={q.after} pages by trial number: use it with sort=number or "
                                 f"sort=-number, not sort={q.sort} (that one pages by offset)")
    if q.offset:
        raise _invalid("after", f"after={q.after} and offset={q.offset} both say where the page starts: "
                                 "send one of them (after: the next_after of the page before)")


def page_body(session: Session, study_id: str, q: PageQuery) -> bytes:
    """The page as the JSON body of a ``TrialPage``."""
    where = [Trial.study_id == study_id]
    if q.state is not None:
        where.append(Trial.state == q.state)
    total = session.scalar(select(func.count()).select_from(Trial).where(*where)) or 0
    if q.after is not None:
        where.append(Trial.number > q.after if q.sort == "number" else Trial.number < q.after)
    raw = (*q.include, *JSON_FIELDS)
    columns = [*(getattr(Trial, name) for name in SCALARS),
               *(cast(getattr(Trial, name), Text) for name in raw)]
    query = select(*columns).where(*where).order_by(SORTS[q.sort], Trial.number)
    rows = session.execute(query.limit(q.limit + 1).offset(q.offset)).all()
    more = len(rows) > q.limit
    rows = rows[:q.limit]
    next_after = rows[-1][0] if more and q.sort in KEYSET_SORTS else None
    items = b",".join(_item(row, raw) for row in rows)
    tail = to_json({"total": total, "limit": q.limit, "offset": q.offset, "next_after": next_after})
    return b'{"items":[' + items + b"]," + tail[1:]


_KEYS = {name: b',"' + name.encode() + b'":' for name in (*INCLUDABLE, *JSON_FIELDS)}


def _item(row: Any, raw: tuple[str, ...]) -> bytes:
    n = len(SCALARS)
    scalars = dict(zip(SCALARS, row[:n]))
    scalars["state"] = scalars["state"].value
    scalars["attempts"] = scalars["attempts"] or 0
    scalars["cached"] = bool(scalars["cached"])
    parts = [to_json(scalars, inf_nan_mode="null")[:-1]]
    for name, text in zip(raw, row[n:]):
        parts += (_KEYS[name], _json_text(text))
    parts.append(b"}")
    return b"".join(parts)


def _json_text(text: str | None) -> bytes:
    """A JSON column's stored text as it goes into the body (SQL NULL: null)."""
    if text is None:
        return b"null"
    if "NaN" in text or "Infinity" in text:  # not JSON: decode, and write null for them
        return to_json(from_json(text, allow_inf_nan=True), inf_nan_mode="null")
    return text.encode()
