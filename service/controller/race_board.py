"""A raced study's board: the values recorded at each rung, from which every dispatch gets its
:class:`~workers.racing.RaceTicket` (workers/racing.py has the rule).

Rebuilt from the trial rows when a study is opened (each raced trial keeps its rungs in
``Trial.metrics["rungs"]``), so a restarted controller races on where the last one stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import Trial

if TYPE_CHECKING:
    from workers.racing import RaceTicket


@dataclass
class RaceBoard:
    sizes: list[int]
    eta: int
    window: int | None = None  # compare with the last `window` values of a rung (None: all)
    recorded: list[list[float]] = field(default_factory=list)  # per rung but the last, in record order

    def __post_init__(self) -> None:
        if not self.recorded:
            self.recorded = [[] for _ in self.sizes[:-1]]

    @classmethod
    def load(cls, s: Session, study_id: str, sizes: Sequence[int], eta: int,
             window: int | None = None) -> RaceBoard:
        board = cls(list(sizes), eta, window)
        rows = s.scalars(select(Trial.metrics).where(Trial.study_id == study_id, Trial.rung.is_not(None))
                         .order_by(Trial.finished_at, Trial.number))
        for metrics in rows:
            board.record((metrics or {}).get("rungs") or [])
        return board

    def record(self, rungs: Iterable[Any]) -> None:
        """A trial's rungs (``RungScore`` objects or their JSON) as recorded."""
        for r in rungs:
            k, values = (r["rung"], r["values"]) if isinstance(r, dict) else (r.rung, r.values)
            if 0 <= k < len(self.recorded) and values:
                self.recorded[k].append(float(values[0]))

    def ticket(self) -> RaceTicket:
        from workers.racing import ticket

        if self.window is None:
            return ticket(self.sizes, self.eta, self.recorded)
        return ticket(self.sizes, self.eta, [values[-self.window:] for values in self.recorded])


def rungs_json(rungs: Iterable[Any]) -> list[dict[str, Any]]:
    """A result's rungs as stored in ``Trial.metrics["rungs"]``."""
    return [r.model_dump(mode="json") for r in rungs]


def pruned_result(values: Sequence[float], rung: int, board: RaceBoard) -> Any:
    """What the optimizer is told for a trial pruned after ``rung`` with partial ``values``."""
    from search_spaces.optimizers.base import Pruned

    return Pruned(tuple(float(v) for v in values), rung, len(board.sizes))


def keep_rungs(row: Trial, rungs: Sequence[Any]) -> None:
    """A raced trial's rungs on its row (``rung``: the last one scored; ``metrics["rungs"]``)."""
    if rungs:
        row.rung = int(rungs[-1].rung)
        row.metrics = {**(row.metrics or {}), "rungs": rungs_json(rungs)}
