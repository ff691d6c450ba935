"""One study's optimizer, kept the way that optimizer declares: one object for every optimizer.

An optimizer says how its state outlives the process (``Optimizer.persistence``,
search_spaces/optimizers/base.py); the controller never asks which optimizer it is:

- ``"state"`` (pycma): the bytes of ``optimizer.state()`` are written to
  ``Study.optimizer_state`` in the same transaction as the trial row an ask or a tell belongs
  to, so the two never disagree;
- ``"storage"`` (the Optuna-based ones): the optimizer writes each ask and tell to Optuna's
  storage, a connection of its own. Its trial is written before our row (:meth:`ask`) and it is
  told after our row is committed (:meth:`tell_after`); a crash between the two leaves points
  ``untold``, which restart recovery tells (service/controller/recovery.py).

Recording a result therefore reads the same for both kinds::

    with sessions.begin() as s:
        ...  # the trial row
        store.tell_in(s, point, values, reason)  # "state": told now, saved with the row
    store.tell_after(point, values, reason)  # "storage": told once the row is committed
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from service.db import Study

if TYPE_CHECKING:
    from search_spaces.base import SearchSpace
    from search_spaces.optimizers.base import Optimizer, Point, Pruned
    from service.validation import ValidatedStudy

log = logging.getLogger("evomerge.controller")


class OptimizerStore:
    """A study's optimizer and where its state lives (see the module docstring)."""

    def __init__(self, study_id: str, optimizer: Optimizer, storage: Any = None) -> None:
        self.study_id = study_id
        self.optimizer = optimizer
        self.storage = storage  # the Optuna storage a "storage" optimizer writes through, else None
        self.saved_with_rows = optimizer.persistence == "state"

    @classmethod
    def open(cls, study_id: str, validated: ValidatedStudy, space: SearchSpace, *,
             storage: Callable[[], Any], study_name: str, state: bytes | None) -> OptimizerStore:
        """The study's optimizer, continued: from ``state`` (the saved bytes; None: a fresh start),
        or from the storage ``storage()`` returns, under ``study_name``."""
        from search_spaces.optimizers import create_optimizer, get

        spec = validated.optimizer
        if get(spec.name).persistence == "storage":
            kept = storage()
            return cls(study_id, create_optimizer(spec, space, storage=kept, study_name=study_name), kept)
        return cls(study_id, create_optimizer(spec, space, state=state))

    def ask(self) -> Point:
        """One new point; a storage-kept optimizer's record of it is written before our row."""
        (point,) = self.optimizer.ask(1)
        if self.storage is not None:
            self.storage.flush()
        return point

    def save(self, s: Session) -> None:
        """In the transaction of the trial row an ask belongs to: the optimizer's own state."""
        if self.saved_with_rows:
            s.execute(update(Study).where(Study.id == self.study_id)
                      .values(optimizer_state=self.optimizer.state()))

    def tell(self, point_id: int | None, values: Iterable[float] | Pruned | None, reason: str | None) -> None:
        """Tell a result in memory: its values (a ``Pruned`` for a candidate racing stopped), or a
        failure for ``reason``. A point already told
        (a replay after a restart) is logged and left as it is."""
        from search_spaces.optimizers.base import Failure, OptimizerError, Pruned

        if point_id is None:
            return
        result = values if isinstance(values, Pruned) else (
            list(values) if values is not None else Failure(reason or ""))
        try:
            self.optimizer.tell(point_id, result)
        except OptimizerError as err:
            log.info("study %s: tell(%s) skipped: %s", self.study_id, point_id, err)

    def tell_in(self, s: Session, point_id: int | None, values: Iterable[float] | Pruned | None,
                reason: str | None) -> None:
        """Inside the transaction that records the trial: a state-kept optimizer is told now and its
        state saved with the row."""
        if self.saved_with_rows and point_id is not None:
            self.tell(point_id, values, reason)
            self.save(s)

    def tell_after(self, point_id: int | None, values: Iterable[float] | Pruned | None,
                   reason: str | None) -> None:
        """Once that transaction has committed: a storage-kept optimizer is told now."""
        if not self.saved_with_rows:
            self.tell(point_id, values, reason)

    def untold(self) -> list[int]:
        """Points the optimizer's storage holds as asked and never told (restart recovery)."""
        return self.optimizer.untold()
