"""Studies built on another study's model ("PS then DFS": layer stacking over the best
merge a parameter-space study found).

A spec names such a source as ``{study: <id>, trial: best | <n>}``. At submission the
API checks that the trial exists and is complete, and validates the new study against a
folder with the same shapes (the trial's export when there is one, else — for a
space that declares its merges keep their sources' shapes, as a parameter space does — its
first source).
The controller starts the new study only once that trial is exported (it asks for the
export itself), and from then on every recipe and worker names the export's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from search_spaces.sources import StudyRef
from service.db.models import Artifact, ArtifactState, Event, Study, StudyStatus, Trial, TrialState
from service.exports import EXPORT_KIND
from service.stored_study import StoredStudy


def referenced_trial(session: Session, ref: StudyRef) -> tuple[Study, Trial]:
    """The study and the complete trial ``ref`` names; LookupError saying why not."""
    study = session.get(Study, ref.study)
    if study is None:
        raise LookupError(f"there is no study {ref.study!r} (GET /studies lists them)")
    if ref.trial == "best":
        if study.status != StudyStatus.COMPLETED:
            raise LookupError(f"study {ref.study!r} is {study.status.value}: its best is known once it has "
                              "completed (or name a complete trial by number)")
        number = study.best_trial_number
        if number is None:
            raise LookupError(f"study {ref.study!r} has no single best trial (multi-objective, or none "
                              "complete): name a trial by number")
    else:
        number = int(ref.trial)
    trial = session.scalar(select(Trial).where(Trial.study_id == study.id, Trial.number == number))
    if trial is None or trial.state != TrialState.COMPLETE or not trial.recipe:
        raise LookupError(f"trial {number} of study {ref.study!r} is not a complete trial")
    return study, trial


def _ready_export(session: Session, study_id: str, number: int) -> Artifact | None:
    return session.scalar(select(Artifact).where(
        Artifact.study_id == study_id, Artifact.trial_number == number, Artifact.kind == EXPORT_KIND,
        Artifact.state == ArtifactState.READY).order_by(Artifact.id.desc()).limit(1))


def _keeps_source_shapes(kind: Any) -> bool:
    """Whether the space of ``kind`` merges to models with their sources' shapes
    (``SearchSpace.keeps_source_shapes``); False for a kind no longer registered."""
    from search_spaces.registry import SPACES

    return isinstance(kind, str) and kind in SPACES and SPACES.get(kind).keeps_source_shapes


def submission_folder(session: Session, ref: StudyRef) -> Path:
    """A folder whose headers stand for the model ``ref`` names (for validation at submission)."""
    study, trial = referenced_trial(session, ref)
    export = _ready_export(session, study.id, trial.number)
    if export is not None:
        return Path(export.path)
    stored = StoredStudy.from_row(study)
    paths = [m.path for m in stored.models if m.path]
    if paths and _keeps_source_shapes(stored.space_spec.get("kind")):
        return Path(paths[0])  # e.g. a parameter-space merge: its sources stand for it
    raise LookupError(f"the model of trial {trial.number} of study {ref.study!r} has to be exported first "
                      f"(POST /studies/{ref.study}/exports {{\"trial\": {trial.number}}})")


def export_paths(session: Session, refs: list[StudyRef], requested_by: str) -> dict[str, str] | None:
    """placeholder -> export folder for every ref; None while an export is still being made (the
    missing ones are asked for here). LookupError when a ref cannot be used at all."""
    paths: dict[str, str] = {}
    waiting = False
    for ref in refs:
        study, trial = referenced_trial(session, ref)
        export = _ready_export(session, study.id, trial.number)
        if export is not None:
            paths[ref.placeholder()] = export.path
            continue
        waiting = True
        pending = session.scalar(select(Artifact).where(
            Artifact.study_id == study.id, Artifact.trial_number == trial.number,
            Artifact.kind == EXPORT_KIND,
            Artifact.state.in_([ArtifactState.PENDING, ArtifactState.RUNNING])).limit(1))
        if pending is None:
            failed = session.scalar(select(Artifact).where(
                Artifact.study_id == study.id, Artifact.trial_number == trial.number,
                Artifact.kind == EXPORT_KIND, Artifact.state == ArtifactState.FAILED).limit(1))
            if failed is not None:
                raise LookupError(f"the export of trial {trial.number} of study {study.id!r} failed: "
                                  f"{failed.error}")
            row = Artifact(study_id=study.id, trial_number=trial.number, kind=EXPORT_KIND, path="",
                           state=ArtifactState.PENDING, progress=0.0, requested_by=requested_by)
            session.add(row)
            session.flush()
            session.add(Event(study_id=study.id, kind="export_requested",
                              data={"export": row.id, "trial": trial.number, "by": requested_by}))
    return None if waiting else paths


def stored_refs(stored: Any) -> list[StudyRef]:
    """The study references of a stored study (a ``Study.spec`` value)."""
    return StoredStudy.load(stored).refs()
