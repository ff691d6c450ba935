"""Runs exports on workers: what the controller does with the API's ``pending`` exports.

Each iteration (:meth:`ExportRunner.step`, called from the controller's loop):

1. a ``pending`` export becomes ``running`` (committed), and a Ray task builds it with
   ``workers.export.run_export_task`` — the API process never loads weights;
2. progress the task writes to a small file is copied to ``Artifact.progress``;
3. a finished task makes the export ``ready`` (path, content key, archive sha256 and
   size from its manifest) or ``failed`` with the reason; then the retention policy runs.

After a crash, exports left ``running`` are ``pending`` again: the worker folder is built
in a staging directory and renamed into place last, so a half-written export is never
served, and a content-addressed folder that did complete is reused at once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db.models import Artifact, ArtifactState, Event, Study, Trial
from service.db.types import utcnow
from service.exports import EXPORT_KIND, evict, exports_root
from service.settings import Settings
from service.stored_study import StoredStudy

log = logging.getLogger("evomerge.exports")
PROGRESS_EVERY_S = 1.0
POLL_S = 0.25  # how often pending exports are looked for


def export_card(study: Study, trial: Trial) -> dict[str, Any]:
    """What the model card says about the study and the trial (``workers.export_manifest.ExportCard``)."""
    spec = StoredStudy.from_row(study).spec
    heldout = (trial.metrics or {}).get("heldout") if isinstance(trial.metrics, dict) else None
    return {
        "study_id": study.id, "study_name": study.name, "trial_number": trial.number, "spec": spec,
        "optimizer": spec.get("optimizer") or {},
        "seed": spec.get("seed", (spec.get("optimizer") or {}).get("seed", 0)),
        "scores": dict(trial.scores or {}),
        "heldout_scores": dict(heldout.get("scores") or {}) if isinstance(heldout, dict) else None,
        "fitness": trial.fitness, "values": list(trial.values) if isinstance(trial.values, list) else None,
        "cost": study.cost if isinstance(study.cost, dict) else None,
    }


class ExportRunner:
    """Dispatches pending exports to Ray and records what comes back (see module docstring)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], *, max_running: int = 1) -> None:
        self.settings = settings
        self.sessions = sessions
        self.max_running = max_running
        self.running: dict[Any, tuple[int, Path]] = {}  # Ray ref -> (artifact id, progress file)
        self._recovered = False
        self._progress_at = 0.0
        self._next_poll = 0.0

    @property
    def root(self) -> Path:
        return exports_root(self.settings)

    def step(self) -> bool:
        """One iteration; True when an export is running."""
        if not self._recovered:
            self._recover()
        self._collect()
        self._report_progress()
        if time.monotonic() >= self._next_poll:  # one SELECT per POLL_S, not per controller iteration
            self._next_poll = time.monotonic() + POLL_S
            self._start()
        return bool(self.running)

    def stop(self) -> None:
        import ray

        for ref in self.running:
            ray.cancel(ref, force=True)
        self.running.clear()  # their rows stay `running`: the next start makes them pending again

    # ---- steps -----------------------------------------------------------------------
    def _recover(self) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Artifact)
                      .where(Artifact.kind == EXPORT_KIND, Artifact.state == ArtifactState.RUNNING)
                      .values(state=ArtifactState.PENDING, progress=0.0))
        self._recovered = True

    def _start(self) -> None:
        while len(self.running) < self.max_running:
            with self.sessions.begin() as s:
                row = s.scalar(select(Artifact).where(Artifact.kind == EXPORT_KIND,
                                                      Artifact.state == ArtifactState.PENDING)
                               .order_by(Artifact.id).limit(1))
                if row is None:
                    return
                trial = s.scalar(select(Trial).where(Trial.study_id == row.study_id,
                                                     Trial.number == row.trial_number))
                study = s.get(Study, row.study_id)
                if trial is None or study is None or not trial.recipe:
                    row.state = ArtifactState.FAILED
                    row.error = f"trial {row.trial_number} has no recipe to export (was it deleted?)"
                    continue
                row.state = ArtifactState.RUNNING
                row.started_at = utcnow()
                row.progress = 0.0
                artifact_id, recipe, card = row.id, dict(trial.recipe), export_card(study, trial)
                s.add(Event(study_id=row.study_id, kind="export_started",
                            data={"export": row.id, "trial": row.trial_number}))
            self._submit(artifact_id, recipe, card)

    def _submit(self, artifact_id: int, recipe: dict[str, Any], card: dict[str, Any]) -> None:
        import ray

        from workers.export import run_export_task
        from workers.pool import init_ray

        init_ray(self.settings.ray_address)
        self.root.mkdir(parents=True, exist_ok=True)
        progress = self.root / ".staging" / f"progress-{artifact_id}"
        progress.parent.mkdir(parents=True, exist_ok=True)
        progress.write_text("0")
        task = ray.remote(run_export_task).options(num_cpus=self.settings.worker_num_cpus, num_gpus=0,
                                                    max_retries=0)
        ref = task.remote(recipe, str(self.root), card, self.settings.export_shard_size, str(progress))
        self.running[ref] = (artifact_id, progress)
        log.info("export %d started", artifact_id)

    def _collect(self) -> None:
        if not self.running:
            return
        import ray

        done, _ = ray.wait(list(self.running), num_returns=len(self.running), timeout=0)
        for ref in done:
            artifact_id, progress = self.running.pop(ref)
            progress.unlink(missing_ok=True)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the task raised, or its worker died
                cause = getattr(exc, "cause", None) or exc
                self._finish(artifact_id, None, f"{type(cause).__name__}: {cause}")
            else:
                self._finish(artifact_id, result, None)

    def _finish(self, artifact_id: int, result: dict[str, Any] | None, error: str | None) -> None:
        with self.sessions.begin() as s:
            row = s.get(Artifact, artifact_id)
            if row is None:  # its study was deleted meanwhile
                return
            row.finished_at = utcnow()
            if result is None:
                row.state = ArtifactState.FAILED
                row.error = error
                s.add(Event(study_id=row.study_id, kind="export_failed",
                            data={"export": row.id, "error": error}))
                log.warning("export %d failed: %s", artifact_id, error)
                return
            manifest = result["manifest"]
            row.state = ArtifactState.READY
            row.path = result["path"]
            row.export_key = result["key"]
            row.sha256 = manifest["archive_sha256"]
            row.size_bytes = int(manifest["archive_size"])
            row.progress = 1.0
            row.error = None
            s.add(Event(study_id=row.study_id, kind="export_ready",
                        data={"export": row.id, "trial": row.trial_number, "key": row.export_key,
                              "size_bytes": row.size_bytes, "reused": bool(result.get("reused"))}))
            evicted = evict(s, self.settings)
            if evicted:
                log.info("retention evicted export(s) %s", evicted)

    def _report_progress(self) -> None:
        if not self.running or time.monotonic() - self._progress_at < PROGRESS_EVERY_S:
            return
        self._progress_at = time.monotonic()
        with self.sessions.begin() as s:
            for artifact_id, path in self.running.values():
                try:
                    fraction = float(path.read_text() or 0)
                except (OSError, ValueError):
                    continue
                s.execute(update(Artifact).where(Artifact.id == artifact_id,
                                                 Artifact.state == ArtifactState.RUNNING)
                          .values(progress=min(max(fraction, 0.0), 0.99)))
