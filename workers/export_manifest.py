"""What an export folder records about itself: its manifest and the model card's facts.

:class:`ExportManifest` is ``evomerge_export.json`` (:data:`~search_spaces.archive_format.MANIFEST`),
written last into the folder: its presence marks the export complete. :class:`ExportCard`
is what the caller (the controller) knows about the trial and the worker does not.
Pydantic only: the exporter (``workers.export``) and the model card
(``workers.export_card``) both import these without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

EXPORT_FORMAT = 1  # part of the key: bump when the folder's layout changes


class ExportCard(BaseModel):
    """What the model card says about the trial (the caller knows it; the worker doesn't)."""

    study_id: str
    study_name: str
    trial_number: int
    spec: dict[str, Any] = Field(description="the study spec as submitted")
    optimizer: dict[str, Any]
    seed: int | None = None
    scores: dict[str, float] = Field(description="per-task scores on the search subset")
    heldout_scores: dict[str, float] | None = None
    fitness: float | None = None
    values: list[float] | None = None
    cost: dict[str, Any] | None = Field(
        default=None, description="the study's cost when exported (service.cost.StudyCost as JSON)")


class ExportFile(BaseModel):
    name: str  # path relative to the export folder (POSIX)
    size: int
    sha256: str


class SourceFile(BaseModel):
    name: str  # path relative to the source model's folder
    sha256: str
    size: int


class ExportSource(BaseModel):
    ref: str  # the model reference as the recipe gives it
    files: list[SourceFile]
    adapter_of: str | None = Field(None, description="a PEFT LoRA adapter: the base it was composed onto")
    adapter: str | None = Field(None, description="a LoRA adapter: its rank, alpha and targets, in words")


class ExportManifest(BaseModel):
    """``evomerge_export.json``: written last; its presence marks an export complete."""

    format: int = EXPORT_FORMAT
    key: str
    study_id: str
    study_name: str
    trial_number: int
    files: list[ExportFile] = Field(description="every file of the folder but the manifest")
    archive_prefix: str = Field(description="folder name inside the tar (search_spaces.archive_format)")
    archive_sha256: str
    archive_size: int
    created_at: str
    evomerge_version: str
    sources: list[ExportSource]
    recipe: dict[str, Any]
    mergekit_config: bool
    mergekit_note: str | None = Field(None, description="why there is no mergekit_config.yml")
    shard_size: int
    card: ExportCard


class ExportResult(BaseModel):
    key: str
    path: Path
    manifest: ExportManifest
    reused: bool
