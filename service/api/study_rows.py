"""The study rows behind the study routes: read one, store a validated study, change a
status (conditional UPDATEs, so a request racing the controller can never move a study along
an invalid transition), delete a final study whose trials stopped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import HTTPException
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.orm import Session

from service.api.deps import AppState
from service.api.schemas import StudyOut
from service.db.models import Event, Study, StudyStatus, Trial, TrialState
from service.db.types import utcnow
from service.stored_study import StoredStudy

if TYPE_CHECKING:
    from service.validation import ValidatedStudy

# (from-statuses, to-status, event kind) of each action
TRANSITIONS: dict[str, tuple[tuple[StudyStatus, ...], StudyStatus, str]] = {
    "pause": ((StudyStatus.QUEUED, StudyStatus.RUNNING), StudyStatus.PAUSED, "study_paused"),
    # running: the controller continues it where it stopped (it also opens a running study it
    # does not hold yet, e.g. after a restart, or one paused before it started)
    "resume": ((StudyStatus.PAUSED,), StudyStatus.RUNNING, "study_resumed"),
    # the controller cancels the running trials and then writes its own `study_cancelled`
    "cancel": ((StudyStatus.QUEUED, StudyStatus.RUNNING, StudyStatus.PAUSED), StudyStatus.CANCELLED,
               "study_cancel_requested"),
}


def get_study_row(session: Session, study_id: str) -> Study:
    """The study's row; 404 when there is none."""
    study = session.get(Study, study_id)
    if study is None:
        raise HTTPException(404, f"no study {study_id!r} (GET /studies lists them)")
    return study


def store_study(state: AppState, validated: ValidatedStudy, owner: str) -> StudyOut:
    """Store a validated study, queued, with its ``study_submitted`` event."""
    stored = StoredStudy.blob(validated)  # with the spec as the user wrote it
    with state.sessions.begin() as session:
        study = Study(name=validated.spec.name, spec=stored, status=StudyStatus.QUEUED, owner=owner)
        session.add(study)
        session.flush()
        study.optuna_study_name = f"evomerge-{study.id}"
        session.add(Event(study_id=study.id, kind="study_submitted",
                          data={"status": "queued", "owner": owner, "name": study.name}))
        session.flush()
        return StudyOut.of(study)


def multi_objective(study: Study) -> bool:
    """Whether the study searches a Pareto front (it has no single best trial)."""
    return bool(StoredStudy.from_row(study).spec.get("multi_objective"))


def transition(state: AppState, study_id: str, action: str, who: str) -> StudyOut:
    """Move the study along ``TRANSITIONS[action]`` with its event; 404 or 409 saying why not."""
    sources, target, kind = TRANSITIONS[action]
    with state.sessions.begin() as session:
        study = get_study_row(session, study_id)
        before = study.status
        changed = session.execute(
            update(Study).where(Study.id == study_id, Study.status.in_(sources))
            .values(status=target, updated_at=utcnow()).execution_options(synchronize_session=False)
        ).rowcount
        if not changed:  # read again, never refresh: a racing DELETE may have removed the row
            now = session.scalar(select(Study.status).where(Study.id == study_id))
            if now is None:
                raise HTTPException(404, f"no study {study_id!r}: it was deleted just now")
            allowed = " or ".join(s.value for s in sources)
            raise HTTPException(409, f"cannot {action} study {study_id!r}: it is {now.value} "
                                     f"(only a {allowed} study can be {action}d)")
        session.add(Event(study_id=study_id, kind=kind, data={"status": target.value, "from": before.value,
                                                                "by": who}))
        session.flush()
        session.refresh(study)
        return StudyOut.of(study)


FINAL = (StudyStatus.COMPLETED, StudyStatus.FAILED, StudyStatus.CANCELLED)


def delete_if_idle(state: AppState, study_id: str) -> int:
    """Delete the study if it is final and none of its trials runs: 0; else how many run.
    One conditional DELETE after locking the study's row (PostgreSQL: no trial of it can be
    inserted meanwhile; SQLite: the statement is atomic)."""
    with state.sessions.begin() as session:
        status = session.scalar(select(Study.status).where(Study.id == study_id).with_for_update())
        if status is None:
            raise HTTPException(404, f"no study {study_id!r} (GET /studies lists them)")
        if status not in FINAL:
            raise HTTPException(409, f"study {study_id!r} is {status.value}: cancel it first "
                                     f"(POST /studies/{study_id}/cancel), then delete it")
        busy = running_trials(study_id)
        gone = session.execute(
            delete(Study).where(Study.id == study_id, Study.status.in_(FINAL), ~busy.exists())
            .execution_options(synchronize_session=False)
        ).rowcount
        if gone:
            return 0
        return int(session.scalar(select(func.count()).select_from(busy.subquery())) or 0) or 1


def running_trials(study_id: str) -> Any:
    """The study's trials that still run on a worker (a live lease: a NULL lease counts as live)."""
    return select(Trial.id).where(
        Trial.study_id == study_id, Trial.state == TrialState.RUNNING,
        or_(Trial.lease_expires_at.is_(None), Trial.lease_expires_at > utcnow()))
