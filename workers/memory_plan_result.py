"""What the memory planner answers: a :class:`MemoryPlan` (the tier, its needs, every
tier's fit), or :class:`DoesNotFit` with the numbers and the fix. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, Field

from workers.memory_facts import gb
from workers.worker_limits import WorkerLimits


class TierFit(BaseModel):
    """What one tier would need, and whether the worker has it."""

    fits: bool
    device_bytes: int = Field(ge=0, description="on the compute device (on a CPU worker: host memory)")
    host_bytes: int = Field(ge=0, description="anonymous host memory besides the device's")
    page_cache_bytes: int = Field(0, ge=0, description="what the tier would like the page cache to hold")
    why_not: str | None = Field(None, description="why it does not fit (None: it fits)")


class MemoryPlan(BaseModel):
    """Which tier a worker uses, and what it needs (bytes)."""

    tier: Literal["resident", "streamed", "mapped"]
    device: Literal["cpu", "cuda"]
    candidate_dtype: str
    device_bytes: int = Field(ge=0, description="needed on the compute device (CPU: host memory)")
    host_bytes: int = Field(ge=0, description="anonymous host memory besides the device's")
    page_cache_bytes: int = Field(ge=0, description="what the mapped tier would like the page cache to hold")
    moved_bytes_per_candidate: int = Field(ge=0, description="bytes read and written to build one candidate")
    breakdown: dict[str, int] = Field(description="sources, candidate, workspace, staging, evaluation, "
                                      "task_vector_cache")
    limits: WorkerLimits
    tiers: dict[str, TierFit]
    cache_task_vectors: bool
    notes: list[str] = Field(default_factory=list)

    def summary(self) -> str:
        """One line, e.g. 'resident: 9.8 GB on cpu, 0.0 GB host; moves 8.8 GB per candidate'."""
        return (f"{self.tier}: {gb(self.device_bytes)} on {self.device}, {gb(self.host_bytes)} host; "
                f"moves {gb(self.moved_bytes_per_candidate)} per candidate")


class DoesNotFit(ValueError):
    """No tier (or not the tier asked for) fits the worker: ``msg`` has the numbers, ``fix`` the way out."""

    def __init__(self, msg: str, fix: str, tiers: Mapping[str, TierFit] | None = None) -> None:
        super().__init__(f"{msg}. Fix: {fix}")
        self.msg, self.fix = msg, fix
        self.tiers = dict(tiers or {})
