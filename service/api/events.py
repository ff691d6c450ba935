"""The live event stream of a study (server-sent events).

Each ``em_events`` row of the study is sent as ``id: <event id>``, ``event: <kind>``,
``data: <JSON>``; a reconnecting client resumes after ``Last-Event-ID`` (or ``?after=``).
Whenever the study's progress changes, an ``event: progress`` without an id carries a
snapshot (status, trials done, best value, budget). The stream ends with ``event: end``
once the study has been in a final state for a few polls with no new event (the
controller's last events follow the status), or when it is deleted.

The subscribers of a study share one database poller in this process
(:mod:`service.api.event_hub`): a client that reads slowly never delays the others, and
catches up by itself when it reads again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Union

from fastapi import APIRouter, Depends, Header, HTTPException, Query
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse

from service.api.deps import READ, AppState, app_state
from service.api.event_hub import EventHub
from service.api.schemas import ErrorOut
from service.api.studies import StudyId
from service.db.models import Study

router = APIRouter(prefix="/studies", tags=["events"])
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


def _exists(state: AppState, study_id: str) -> bool:
    with state.sessions() as session:
        return session.get(Study, study_id) is not None


def hub_of(state: AppState) -> EventHub:
    """The app's event hub (made by the lifespan; made here for an AppState built by hand)."""
    if state.hub is None:
        state.hub = EventHub(state)
    return state.hub


def stream(state: AppState, study_id: str, after: int) -> AsyncIterator[bytes]:
    """The encoded messages of one subscriber, after event id ``after`` (see the module's docstring)."""
    return hub_of(state).follow(study_id, after)


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
    if not await run_in_threadpool(_exists, state, study_id):
        raise HTTPException(404, f"no study {study_id!r} (GET /studies lists them)")
    return EventSourceResponse(stream(state, study_id, start), ping=15)
