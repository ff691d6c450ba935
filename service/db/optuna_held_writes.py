"""The held-writes side of :class:`service.db.optuna_cache.SoleWriterStorage`: the
parameters and trial system attributes Optuna sets while it asks a point, kept until the
storage's ``flush`` and then committed together in one transaction.

This uses private pieces of Optuna's ``RDBStorage``; where they are missing
(:func:`can_batch`), nothing is held and every write is committed on its own, as by Optuna.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import RDBStorage
from optuna.storages._rdb import models as rdb_models
from sqlalchemy import insert

# ("param", trial id, name, internal value, distribution, previous distribution or None)
# or ("system_attr", trial id, key, value)
HeldWrite = tuple[Any, ...]


def can_batch(backend: RDBStorage) -> bool:
    """Whether this Optuna's RDBStorage has the (private) pieces :meth:`HeldWrites.commit`
    uses; without them every write is committed on its own, as by Optuna."""
    from optuna.storages._rdb import storage

    return all(hasattr(obj, name) for obj, name in (
        (storage, "_create_scoped_session"), (backend, "_set_trial_param_without_commit"),
        (backend, "_set_trial_attr_without_commit"), (rdb_models, "TrialSystemAttributeModel"),
        (rdb_models, "TrialParamModel"), (rdb_models, "TrialModel")))


class HeldWrites:
    """Writes waiting for one transaction; the caller serializes access (its lock)."""

    def __init__(self, backend: RDBStorage) -> None:
        self._backend = backend
        self._ops: list[HeldWrite] | None = [] if can_batch(backend) else None

    @property
    def enabled(self) -> bool:
        """False where the backend lacks what batching uses: then nothing may be held."""
        return self._ops is not None

    def hold_param(self, trial_id: int, name: str, value_internal: float,
                   distribution: BaseDistribution, previous: BaseDistribution | None) -> None:
        assert self._ops is not None
        self._ops.append(("param", trial_id, name, value_internal, distribution, previous))

    def hold_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        assert self._ops is not None
        self._ops.append(("system_attr", trial_id, key, value))

    def take(self) -> list[HeldWrite]:
        """The held writes, no longer held (empty when there are none)."""
        if not self._ops:
            return []
        ops, self._ops = self._ops, []
        return ops

    def commit(self, ops: list[HeldWrite]) -> None:
        """Write ``ops`` in one transaction, checking each trial as ``RDBStorage`` would."""
        from optuna.storages._rdb.storage import _create_scoped_session

        backend = self._backend
        with _create_scoped_session(backend.scoped_session, True) as session:
            for trial_id in dict.fromkeys(op[1] for op in ops):  # as RDBStorage checks each write
                row = rdb_models.TrialModel.find_or_raise_by_id(trial_id, session)
                backend.check_trial_is_updatable(trial_id, row.state)
            # parameters already checked against the study's distributions: one executemany
            rows = [{"trial_id": op[1], "param_name": op[2], "param_value": op[3],
                     "distribution_json": distribution_to_json(op[4])}
                    for op in ops if op[0] == "param" and op[5] is not None]
            if rows:
                session.execute(insert(rdb_models.TrialParamModel.__table__), rows)
            for op in ops:
                if op[0] == "param" and op[5] is None:  # the study's first use of the name
                    backend._set_trial_param_without_commit(session, *op[1:])
                elif op[0] != "param":
                    backend._set_trial_attr_without_commit(
                        session, rdb_models.TrialSystemAttributeModel, *op[1:])
