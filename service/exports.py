"""Exports on the service side: where they live, what marks one complete, and retention.

The API process never loads weights: a worker writes an export folder
(``workers/export.py``); this module only reads its manifest and decides what may be
evicted. A folder is servable once its manifest (``evomerge_export.json``, written last,
before the folder is renamed into place) exists.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from search_spaces.archive_format import MANIFEST
from service.db.models import Artifact, ArtifactState, Study
from service.db.types import utcnow
from service.settings import Settings
from workers.export_store import remove_export  # torch-free

__all__ = ["DOWNLOAD_LEASE", "EXPORT_KIND", "MANIFEST", "archive_prefix", "evict", "exports_root",
           "folder_bytes", "read_manifest"]

EXPORT_KIND = "export"
DOWNLOAD_LEASE = timedelta(seconds=120)  # renewed while a download streams


def exports_root(settings: Settings) -> Path:
    return settings.data_dir / "exports"


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of a complete export folder, else None."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def archive_prefix(manifest: dict[str, Any], folder: Path) -> str:
    """The top folder inside the archive (the manifest names it)."""
    return str(manifest.get("archive_prefix") or folder.name)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def evict(session: Session, settings: Settings, *, keep_free: int = 0) -> list[int]:
    """Evict least recently used exports until the exports fit ``settings.export_budget_bytes``
    (minus ``keep_free``); returns the evicted artifact ids.

    Never evicted: an export some study's best trial points to, one with a download
    lease in the future (a download is streaming it), and one not ready. Artifacts that
    share a folder (the same content) are evicted together, and only when none is protected.
    """
    budget = settings.export_budget_bytes
    if budget is None:
        return []
    rows = list(session.scalars(select(Artifact).where(Artifact.state == ArtifactState.READY)))
    by_path: dict[str, list[Artifact]] = {}
    for row in rows:
        by_path.setdefault(row.path, []).append(row)
    sizes = {path: (items[0].size_bytes or 0) for path, items in by_path.items()}
    used = sum(sizes.values())
    limit = budget - keep_free
    if used <= limit:
        return []
    best = set(session.execute(select(Study.id, Study.best_trial_number)
                               .where(Study.best_trial_number.is_not(None))).tuples())
    now = utcnow()

    def protected(items: list[Artifact]) -> bool:
        return any((a.study_id, a.trial_number) in best
                   or (a.download_lease_until is not None and a.download_lease_until > now) for a in items)

    def last_use(items: list[Artifact]) -> Any:
        return max((a.last_accessed_at or a.finished_at or a.created_at) for a in items)

    evicted: list[int] = []
    for path, items in sorted(by_path.items(), key=lambda kv: last_use(kv[1])):
        if used <= limit:
            break
        if protected(items):
            continue
        folder = Path(path)
        remove_export(folder.parent, folder.name)  # renamed out of place first: never half-served
        for a in items:
            a.state = ArtifactState.EVICTED
            a.error = "evicted by the retention policy (EVOMERGE_EXPORT_BUDGET_BYTES); POST the export again"
            evicted.append(a.id)
        used -= sizes[path]
    session.flush()
    return evicted
