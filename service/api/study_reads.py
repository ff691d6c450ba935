"""The two reads a dashboard repeats, made cheap: ``GET /studies/{id}`` and a trials page.

Each reads the study's version first (one small query, :mod:`service.api.etags`), answers
``If-None-Match`` with 304 from it alone, then serves the body the app's ``BodyCache`` holds for
that version, or builds it (and keeps it). The ``status_reason`` of an unfinished study comes
from the controller this process supervises and is part of the study's ETag.
"""

from __future__ import annotations

from fastapi import HTTPException, Response

from service.api import etags
from service.api import trial_pages as pages
from service.api.deps import AppState
from service.api.schemas import StudyOut
from service.api.study_rows import get_study_row
from service.db.models import Study, StudyStatus

UNFINISHED = (StudyStatus.QUEUED, StudyStatus.RUNNING)


def status_reason(state: AppState, study_id: str) -> str | None:
    """Why an unfinished study does not progress now: what the study controller running in this
    process knows (a write fault it is stalled on, a repair in progress); None otherwise."""
    reason = getattr(state.controller, "status_reason", None)
    return reason(study_id) if callable(reason) else None


def study_out(state: AppState, study: Study) -> StudyOut:
    """``StudyOut.of(study)`` with its ``status_reason`` (queued and running studies only)."""
    out = StudyOut.of(study)
    if out.status in UNFINISHED:
        out.status_reason = status_reason(state, study.id)
    return out


def _missing(study_id: str) -> HTTPException:
    return HTTPException(404, f"no study {study_id!r} (GET /studies lists them)")


def study_response(state: AppState, study_id: str, if_none_match: str | None) -> Response:
    """``StudyOut`` as JSON with its ETag, or 304."""
    with state.sessions() as session:
        version = etags.study_version(session, study_id)
        if version is None:
            raise _missing(study_id)
        reason = status_reason(state, study_id) if version[1] in UNFINISHED else None
        etag = etags.make_etag("study", study_id, version, reason)
        if etags.matches(if_none_match, etag):
            return etags.not_modified(etag)
        body = state.bodies.get(etag)
        if body is None:  # read the row now: its own version names the body
            study = get_study_row(session, study_id)
            out = study_out(state, study)
            etag = etags.make_etag("study", study_id, etags.row_version(study), out.status_reason)
            body = out.model_dump_json().encode()
            state.bodies.put(etag, body)
        return etags.json_body(body, etag)


def trials_response(state: AppState, study_id: str, q: pages.PageQuery,
                    if_none_match: str | None) -> Response:
    """A ``TrialPage`` as JSON with its ETag, or 304. The version is read before the page, so a
    page is never older than its ETag says (at worst newer: the next request gets it again)."""
    with state.sessions() as session:
        version = etags.study_version(session, study_id, trials=True)
        if version is None:
            raise _missing(study_id)
        etag = etags.make_etag("trials", study_id, version, q)
        if etags.matches(if_none_match, etag):
            return etags.not_modified(etag)
        body = state.bodies.get(etag)
        if body is None:
            body = pages.page_body(session, study_id, q)
            state.bodies.put(etag, body)
        return etags.json_body(body, etag)
