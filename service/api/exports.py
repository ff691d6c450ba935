"""Export routes: ask for a merged model, follow its progress, download it.

``POST /studies/{id}/exports`` records an export (state ``pending``); the controller
runs it on a worker (the API never loads weights). Once ``ready``, the export is served
as a deterministic tar (``…/archive``, built on the fly from the folder: Content-Length,
a sha256 ETag, byte ranges for resuming) or file by file (``…/files/{name}``). While a
download streams, the export holds a lease that the retention policy respects.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path as FsPath
from typing import Any, Union

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from search_spaces.archive_format import MANIFEST, plan_archive
from service.api.deps import DOWNLOAD, READ, AppState, app_state
from service.api.ranges import parse_range, range_applies
from service.api.schemas import ErrorOut, submitted_spec
from service.api.studies import StudyId, _get_study, refuse_if_unwritable
from service.db.models import Artifact, ArtifactState, Event, Study, Trial, TrialState
from service.db.types import utcnow
from service.exports import DOWNLOAD_LEASE, EXPORT_KIND, archive_prefix, read_manifest

router = APIRouter(prefix="/studies", tags=["exports"])
ExportId = Path(ge=1, le=2**62, description="the export's id (from POST /studies/{id}/exports)", examples=[1])
_E401 = {401: {"model": ErrorOut, "description": "no or an invalid bearer token (when auth is on)"}}
_E403 = {403: {"model": ErrorOut, "description": "the token lacks the 'download' scope"}}
_E404 = {404: {"model": ErrorOut, "description": "no such study or export"}}
_E409 = {409: {"model": ErrorOut, "description": "the export is not ready"}}
LEASE_RENEW_S = 30.0
CHUNK = 1 << 20


class ExportRequest(BaseModel):
    """Which trial to export: its number, or null for the study's best."""

    trial: Union[int, None] = Field(None, ge=0, le=2**31 - 1, description="default: the best trial")
    model_config = ConfigDict(extra="forbid",
                              json_schema_extra={"examples": [{"trial": None}, {"trial": 37}]})


class ExportFileOut(BaseModel):
    name: str
    size: int
    sha256: str


class ExportOut(BaseModel):
    """An export: its state and, once ready, what can be downloaded."""

    id: int
    study_id: str
    trial_number: Union[int, None]
    state: ArtifactState
    progress: float = Field(description="0..1")
    key: Union[str, None] = Field(
        description="content address: the same recipe and sources give the same key")
    size_bytes: Union[int, None] = Field(description="the archive's size")
    sha256: Union[str, None] = Field(description="the archive's sha256 (also its ETag)")
    error: Union[str, None]
    created_at: datetime
    finished_at: Union[datetime, None]
    archive_url: Union[str, None] = Field(description="GET it for the tar (ranges supported)")
    files: list[ExportFileOut] = Field(default_factory=list, description="once ready: each file, by name")

    @classmethod
    def of(cls, row: Artifact, manifest: dict[str, Any] | None = None) -> ExportOut:
        ready = row.state == ArtifactState.READY
        files = [ExportFileOut(**f) for f in (manifest or {}).get("files", [])] if ready else []
        progress = 1.0 if ready else float(row.progress or 0.0)
        return cls(id=row.id, study_id=row.study_id, trial_number=row.trial_number, state=row.state,
                   progress=progress, key=row.export_key, size_bytes=row.size_bytes if ready else None,
                   sha256=row.sha256 if ready else None, error=row.error, created_at=row.created_at,
                   finished_at=row.finished_at,
                   archive_url=f"/studies/{row.study_id}/exports/{row.id}/archive" if ready else None,
                   files=files)


def _pick_trial(session: Session, study: Study, number: int | None) -> Trial:
    complete = select(Trial).where(Trial.study_id == study.id)
    if number is None:
        if submitted_spec(study).get("multi_objective"):
            raise HTTPException(409, f"study {study.id!r} is multi-objective: name the trial to export "
                                     f"({{\"trial\": N}}); GET /studies/{study.id}/front lists the "
                                     "Pareto front")
        number = study.best_trial_number
        if number is None:
            best = session.scalar(complete.where(Trial.state == TrialState.COMPLETE)
                                  .order_by(Trial.fitness.desc().nulls_last(), Trial.number).limit(1))
            if best is None:
                raise HTTPException(409, f"study {study.id!r} has no complete trial to export yet")
            return best
    trial = session.scalar(complete.where(Trial.number == number))
    if trial is None:
        raise HTTPException(404, f"study {study.id!r} has no trial {number} "
                                 f"(GET /studies/{study.id}/trials lists them)")
    if trial.state != TrialState.COMPLETE or not trial.recipe:
        raise HTTPException(409, f"trial {number} is {trial.state.value}: only a complete trial can be "
                                 "exported")
    return trial


@router.post("/{study_id}/exports", response_model=ExportOut, status_code=202,
             summary="Export a trial's merged model",
             responses={200: {"model": ExportOut, "description": "this trial's export already exists"},
                        **_E401, **_E403, **_E404,
                        409: {"model": ErrorOut, "description": "no complete trial to export (yet)"},
                        507: {"model": ErrorOut, "description": "the server's disk is full"}})
def create_export(study_id: StudyId, response: Response, body: Union[ExportRequest, None] = None,
                  state: AppState = Depends(app_state), who: str = DOWNLOAD) -> ExportOut:
    """Start exporting a trial (default: the best) to a Hugging Face folder; a worker builds it.
    Asking again for the same trial returns the existing export (unless it failed or was evicted)."""
    body = body or ExportRequest()
    try:
        with state.sessions.begin() as session:
            study = _get_study(session, study_id)
            trial = _pick_trial(session, study, body.trial)
            existing = session.scalar(select(Artifact).where(
                Artifact.study_id == study_id, Artifact.trial_number == trial.number,
                Artifact.kind == EXPORT_KIND,
                Artifact.state.in_([ArtifactState.PENDING, ArtifactState.RUNNING, ArtifactState.READY]))
                .order_by(Artifact.id.desc()).limit(1))
            if existing is not None:
                response.status_code = 200
                return ExportOut.of(existing, _manifest(existing))
            refuse_if_unwritable(state, "start an export")
            row = Artifact(study_id=study_id, trial_number=trial.number, kind=EXPORT_KIND, path="",
                           state=ArtifactState.PENDING, progress=0.0, requested_by=who)
            session.add(row)
            session.flush()
            session.add(Event(study_id=study_id, kind="export_requested",
                              data={"export": row.id, "trial": trial.number, "by": who}))
            session.flush()
            session.refresh(row)
            return ExportOut.of(row)
    except IntegrityError:  # the study was deleted between the read and the insert
        raise HTTPException(404, f"no study {study_id!r}: it was deleted while the export was requested "
                                 "(GET /studies lists them)") from None


@router.get("/{study_id}/exports", response_model=list[ExportOut], summary="A study's exports",
            responses={**_E401, **_E404})
def list_exports(study_id: StudyId, state: AppState = Depends(app_state), _: str = READ) -> list[ExportOut]:
    with state.sessions() as session:
        _get_study(session, study_id)
        rows = session.scalars(select(Artifact).where(Artifact.study_id == study_id,
                                                      Artifact.kind == EXPORT_KIND).order_by(Artifact.id))
        return [ExportOut.of(r, _manifest(r)) for r in rows]


@router.get("/{study_id}/exports/{export_id}", response_model=ExportOut,
            summary="One export: state, progress",
            responses={**_E401, **_E404})
def get_export(study_id: StudyId, export_id: int = ExportId, state: AppState = Depends(app_state),
               _: str = READ) -> ExportOut:
    with state.sessions() as session:
        row = _get_export(session, study_id, export_id)
        return ExportOut.of(row, _manifest(row))


def _get_export(session: Session, study_id: str, export_id: int) -> Artifact:
    _get_study(session, study_id)
    row = session.get(Artifact, export_id)
    if row is None or row.study_id != study_id or row.kind != EXPORT_KIND:
        raise HTTPException(404, f"study {study_id!r} has no export {export_id} "
                                 f"(GET /studies/{study_id}/exports lists them)")
    return row


def _manifest(row: Artifact) -> dict[str, Any] | None:
    return read_manifest(row.path) if row.state == ArtifactState.READY and row.path else None


def _ready(session: Session, study_id: str, export_id: int) -> tuple[Artifact, dict[str, Any]]:
    row = _get_export(session, study_id, export_id)
    manifest = _manifest(row)
    if row.state != ArtifactState.READY or manifest is None:
        detail = f"export {export_id} is {row.state.value}"
        if row.state in (ArtifactState.PENDING, ArtifactState.RUNNING):
            detail += (f" ({100 * (row.progress or 0):.0f} %); try again when GET …/exports/{export_id} "
                       "says ready")
        elif row.error:
            detail += f": {row.error}"
        raise HTTPException(409, detail)
    return row, manifest


def _touch(sessions: sessionmaker[Session], export_id: int) -> None:
    with sessions.begin() as session:
        row = session.get(Artifact, export_id)
        if row is not None:
            now = utcnow()
            row.last_accessed_at = now
            row.download_lease_until = now + DOWNLOAD_LEASE


def _leased(chunks: Iterator[bytes], sessions: sessionmaker[Session], export_id: int) -> Iterator[bytes]:
    """Pass ``chunks`` through, renewing the export's download lease while it streams."""
    renewed = time.monotonic()
    for chunk in chunks:
        if time.monotonic() - renewed > LEASE_RENEW_S:
            _touch(sessions, export_id)
            renewed = time.monotonic()
        yield chunk


def _ranged(request: Request, size: int, etag: str, if_range: str | None, media_type: str,
            filename: str, chunks_of: Any, sessions: sessionmaker[Session], export_id: int) -> Response:
    span = parse_range(request.headers.get("range"), size) if range_applies(if_range, etag) else None
    start, end = span if span is not None else (0, size)
    headers = {"Accept-Ranges": "bytes", "ETag": etag, "Content-Length": str(end - start),
               "Content-Disposition": f'attachment; filename="{filename}"'}
    status = 200
    if span is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=media_type)
    _touch(sessions, export_id)
    return StreamingResponse(_leased(chunks_of(start, end), sessions, export_id), status_code=status,
                             headers=headers, media_type=media_type)


ARCHIVE_PATH = "/{study_id}/exports/{export_id}/archive"
FILE_PATH = "/{study_id}/exports/{export_id}/files/{name:path}"


@router.get(ARCHIVE_PATH,
                  summary="Download the export as a tar",
                  response_class=Response,
                  responses={200: {"content": {"application/x-tar": {}}, "description": "the whole archive"},
                             206: {"content": {"application/x-tar": {}}, "description": "the asked range"},
                             **_E401, **_E403, **_E404, **_E409,
                             416: {"model": ErrorOut, "description": "a range outside the archive"}})
def download_archive(request: Request, study_id: StudyId, export_id: int = ExportId,
                     if_range: Union[str, None] = Header(None, include_in_schema=False),
                     state: AppState = Depends(app_state), _: str = DOWNLOAD) -> Response:
    """The model folder as an uncompressed tar, byte for byte the same on every request:
    ``ETag`` is its sha256, ``Range: bytes=N-`` resumes an interrupted download."""
    with state.sessions() as session:
        row, manifest = _ready(session, study_id, export_id)
        folder = FsPath(row.path)
        sha, size = row.sha256, row.size_bytes
    prefix = archive_prefix(manifest, folder)
    plan = plan_archive(folder, prefix, exclude={MANIFEST})
    listed = {f"{prefix}/{f['name']}": int(f["size"]) for f in manifest.get("files", [])}
    if plan.size != size or dict(plan.members) != listed:  # changed under us: never serve a mismatch
        raise HTTPException(409, f"export {export_id} on disk no longer matches its manifest; "
                                 f"export it again (POST /studies/{study_id}/exports)")
    return _ranged(request, plan.size, f'"{sha}"', if_range, "application/x-tar", f"{prefix}.tar",
                   lambda a, b: plan.iter_bytes(a, b, CHUNK), state.sessions, export_id)


@router.get(FILE_PATH,
                  summary="Download one file of the export", response_class=Response,
                  responses={200: {"content": {"application/octet-stream": {}}, "description": "the file"},
                             206: {"content": {"application/octet-stream": {}}, "description": "the range"},
                             **_E401, **_E403, **_E404, **_E409,
                             416: {"model": ErrorOut, "description": "a range outside the file"}})
def download_file(request: Request, study_id: StudyId, name: str, export_id: int = ExportId,
                  if_range: Union[str, None] = Header(None, include_in_schema=False),
                  state: AppState = Depends(app_state), _: str = DOWNLOAD) -> Response:
    """One file of the export (names as in the export's ``files``); ``ETag`` is its sha256."""
    with state.sessions() as session:
        row, manifest = _ready(session, study_id, export_id)
    entry = next((f for f in manifest.get("files", []) if f.get("name") == name), None)
    if entry is None:  # only listed files: a name can never reach outside the folder
        raise HTTPException(404, f"export {export_id} has no file {name!r} (its `files` lists them)")
    path = FsPath(row.path) / entry["name"]
    size = int(entry["size"])

    def chunks(start: int, end: int) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            fh.seek(start)
            left = end - start
            while left > 0:
                data = fh.read(min(CHUNK, left))
                if not data:
                    raise OSError(f"{path} is shorter than its manifest says")
                left -= len(data)
                yield data

    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return _ranged(request, size, f'"{entry["sha256"]}"', if_range, media, FsPath(name).name, chunks,
                   state.sessions, export_id)


# HEAD (the size and ETag without the body) on the same functions, kept out of the schema
router.add_api_route(ARCHIVE_PATH, download_archive, methods=["HEAD"], include_in_schema=False)
router.add_api_route(FILE_PATH, download_file, methods=["HEAD"], include_in_schema=False)
