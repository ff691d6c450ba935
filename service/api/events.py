"""The live event stream of a study (server-sent events).

Each ``em_events`` row of the study is sent as ``id: <event id>``, ``event: <kind>``,
``data: <JSON>``; a reconnecting client resumes after ``Last-Event-ID`` (or ``?after=``).
Whenever the study's progress changes, an ``event: progress`` without an id carries a
snapshot (status, trials done, best value, budget). The stream ends with ``event: end``
once the study has been in a final state for a few polls with no new event (the
controller's last events follow the status), or when it is deleted. The database is
polled (no broker needed, works on SQLite and PostgreSQL); each poll is a short query
in a threadpool, so a client leaving cancels nothing but the wait.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Union

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from service.api.deps import READ, AppState, app_state
from service.api.schemas import ErrorOut, StudyOut
from service.api.studies import StudyId, study_out
from service.db.models import Event, Study

router = APIRouter(prefix="/studies", tags=["events"])
BATCH = 500
END_GRACE_POLLS = 4
MAX_ID_DIGITS = 18  # event ids are 64-bit; a longer Last-Event-ID is not one of ours
#: One event of the stream (OpenAPI 3.1: the schema of a text/event-stream describes each event).
SSE_EVENT = {
    "type": "object", "required": ["data"],
    "properties": {
        "id": {"type": "string", "description": "the event's id (em_events.id); progress and end have none"},
        "event": {"type": "string",
                  "description": "the kind: study_submitted, trial_complete, …, progress, end"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "description": "JSON: {id, at, kind, data} for a stored event; the study's progress for "
                                "`progress` and `end`"},
        "retry": {"type": "integer"},
    },
}


def _poll(state: AppState, study_id: str, after: int) -> tuple[StudyOut | None, list[Event]]:
    with state.sessions() as session:
        study = session.get(Study, study_id)
        events = list(session.scalars(
            select(Event).where(Event.study_id == study_id, Event.id > after)
            .order_by(Event.id).limit(BATCH)))
        return (study_out(state, study) if study is not None else None), events


def _progress(study: StudyOut) -> dict[str, Any]:
    return study.model_dump(mode="json", include={
        "id", "status", "trials_done", "trials_failed", "max_trials", "max_seconds", "elapsed_seconds",
        "best_trial_number", "best_value", "error", "status_reason", "cost"})


async def stream(state: AppState, study_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    last_progress: dict[str, Any] | None = None
    # A final status is set before the last events are written (the controller cancels the
    # running trials after the API marked the study cancelled): end only once the study has
    # been final, with no new event, for a few polls.
    grace = END_GRACE_POLLS * state.poll_seconds
    quiet_since: float | None = None
    loop = asyncio.get_running_loop()
    while True:
        study, events = await run_in_threadpool(_poll, state, study_id, after)
        if events or study is None or not study.status.finished:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = loop.time()
        for event in events:
            after = event.id
            payload = {"id": event.id, "at": event.at.isoformat(), "kind": event.kind, "data": event.data}
            yield ServerSentEvent(data=json.dumps(payload), event=event.kind, id=str(event.id))
        if study is None:
            yield ServerSentEvent(data=json.dumps({"id": study_id, "status": "deleted"}), event="end")
            return
        progress = _progress(study)
        if progress != last_progress:
            last_progress = progress
            yield ServerSentEvent(data=json.dumps(progress), event="progress")
        if len(events) == BATCH:
            continue  # more are waiting
        if quiet_since is not None and loop.time() - quiet_since >= grace:
            yield ServerSentEvent(data=json.dumps(progress), event="end")
            return
        await asyncio.sleep(state.poll_seconds)


def _event_id(header: str | None) -> int:
    """A ``Last-Event-ID`` as an event id; 0 (from the start) for anything that is not one:
    not ASCII digits, or more digits than any id has (a browser resends what it was given)."""
    text = (header or "").strip()
    if not (text.isascii() and text.isdigit()) or len(text) > MAX_ID_DIGITS:
        return 0
    return int(text)


@router.get(
    "/{study_id}/events", summary="Follow a study's events (server-sent events)",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {"schema": SSE_EVENT, "example": (
        'id: 17\nevent: trial_complete\ndata: {"id": 17, "kind": "trial_complete", "data": {"number": 3}}\n\n'
        'event: progress\ndata: {"status": "running", "trials_done": 4, "best_value": 0.5}\n\n')}},
        "description": "the event stream; ends with `event: end` when the study is final or deleted"},
        401: {"model": ErrorOut, "description": "no or an invalid bearer token (when auth is on)"},
        403: {"model": ErrorOut, "description": "the token lacks the 'read' scope"},
        404: {"model": ErrorOut, "description": "no such study"}},
)
async def study_events(
    study_id: StudyId, state: AppState = Depends(app_state), _: str = READ,
    after: Union[int, None] = Query(None, ge=0, le=2**62, description="send only events with a larger id"),
    last_event_id: Union[str, None] = Header(None, include_in_schema=False),
) -> EventSourceResponse:
    """Events from the start (or after `Last-Event-ID` / `?after=`), then live until the study ends."""
    start = max(after or 0, _event_id(last_event_id))
    study, _events = await run_in_threadpool(_poll, state, study_id, 2**62)
    if study is None:
        raise HTTPException(404, f"no study {study_id!r} (GET /studies lists them)")
    return EventSourceResponse(stream(state, study_id, start), ping=15)
