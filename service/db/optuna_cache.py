"""An Optuna storage for studies one process alone writes: writes go straight to the
database, reads come from memory.

Optuna's own wrapper of ``RDBStorage`` (``_CachedStorage``, what ``create_study`` puts
around an ``RDBStorage``) caches finished trials only: every ``get_trial`` of a running
trial and every ``get_all_trials`` reads the running trials again (six SELECTs each).
Driven by the controller, one ``optuna-cmaes`` trial cost 64 statements in Optuna's
tables (54 of them SELECTs) in 14 transactions — most of the controller's time per
trial; with this storage, 13 statements in 3 transactions (docs/benchmarks.md). The
controller is the only writer of its studies' Optuna trials (one controller per
database, docs/controller.md), so it can keep every trial of a study in memory:

- each write is passed to ``RDBStorage`` — committed in its own transaction before the
  call returns, as without this wrapper — and mirrored in memory once it succeeded;
- except the parameters and system attributes Optuna sets while it asks a point (four
  to a few dozen single-row transactions per ask): those are held until :meth:`flush`
  (or the next other write) and committed together in one transaction. The controller
  calls :meth:`flush` right after each ask, before it commits its own trial row, so the
  order of commits the restart protocol relies on is unchanged (docs/controller.md); a
  crash before the flush leaves an Optuna trial RUNNING with no row of ours — "asked,
  never recorded", told as a failure on restart, as before;
- each read is answered from memory after one full read of the study (the first time it
  is used), then kept up to date by the mirrored writes (held ones included).

What is in memory is a cache of rows: losing it loses nothing. The controller builds one
for each study it opens (``StudyRuntime``), so reopening a study — after a restart, or a
resume — reads everything the database holds, including what another process wrote in
between (e.g. a trial asked by a client of its own). Should a trial be created behind our
back while the study is open, the next ``create_new_trial`` notices (Optuna's trial number
skips) and reads the study again. Other changes made behind our back while we hold the
study (another process telling one of its running trials) are not seen until it is
reopened: run one controller per database.

Mirrored timestamps: ``datetime_complete`` (and ``datetime_start`` of a trial popped from
the waiting queue) are set here when the write returns; the database's differ by the
duration of that write. No sampler evomerge uses reads them.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Container, Sequence
from datetime import datetime
from typing import Any

from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.storages import BaseStorage, RDBStorage
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy
from optuna.trial import FrozenTrial, TrialState

from service.db.optuna_held_writes import HeldWrites
from service.db.optuna_trial_memory import TrialMemory

log = logging.getLogger("evomerge.optuna")


class SoleWriterStorage(BaseStorage):
    """``backend``'s studies, read from memory; see the module docstring for the contract.

    The trials in memory are a :class:`TrialMemory`; the writes held until :meth:`flush`
    are a :class:`HeldWrites`. This class is the Optuna storage interface over the two.
    """

    def __init__(self, backend: RDBStorage) -> None:
        self._backend = backend
        self._lock = threading.RLock()
        self._memory = TrialMemory()
        self._held = HeldWrites(backend)
        self._directions: dict[int, list[StudyDirection]] = {}
        self._names: dict[int, str] = {}
        self._study_system_attrs: dict[int, dict[str, Any]] = {}  # read once, then written through

    @property
    def backend(self) -> RDBStorage:
        return self._backend

    # ---- the study's trials in memory ---------------------------------------------------------
    def _study_trials(self, study_id: int) -> list[FrozenTrial]:
        """The study's trials (read once from the database)."""
        trials = self._memory.study(study_id)
        if trials is None:
            self.flush()
            trials = self._memory.load_study(study_id, self._backend.get_all_trials(study_id, deepcopy=False))
        return trials

    def _reload(self, study_id: int) -> None:
        self._memory.drop_study(study_id)
        self._study_system_attrs.pop(study_id, None)
        self._study_trials(study_id)

    # ---- held writes ------------------------------------------------------------------------------
    def flush(self) -> None:
        """Commit the held parameter and system-attribute writes, in one transaction."""
        with self._lock:
            ops = self._held.take()
            if not ops:
                return
            try:
                self._held.commit(ops)
            except BaseException:
                self._forget()  # memory is ahead of the database: read it again when next used
                raise

    def _forget(self) -> None:
        self._memory.clear()
        self._study_system_attrs.clear()

    # ---- studies: passed through (rare) ---------------------------------------------------------
    def create_new_study(self, directions: Sequence[StudyDirection], study_name: str | None = None) -> int:
        self.flush()
        study_id = self._backend.create_new_study(directions=directions, study_name=study_name)
        with self._lock:
            self._memory.new_study(study_id)
        return study_id

    def delete_study(self, study_id: int) -> None:
        self.flush()
        self._backend.delete_study(study_id)
        with self._lock:
            self._memory.drop_study(study_id)
            self._study_system_attrs.pop(study_id, None)
            self._directions.pop(study_id, None)
            self._names.pop(study_id, None)

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        self.flush()
        self._backend.set_study_user_attr(study_id, key, value)

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        with self._lock:
            self.flush()
            self._backend.set_study_system_attr(study_id, key, value)
            attrs = self._study_system_attrs.get(study_id)
            if attrs is not None:  # a new dict: one handed out never changes under its holder
                self._study_system_attrs[study_id] = {**attrs, key: copy.deepcopy(value)}

    def get_study_id_from_name(self, study_name: str) -> int:
        return self._backend.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        if study_id not in self._names:
            self._names[study_id] = self._backend.get_study_name_from_id(study_id)
        return self._names[study_id]

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        if study_id not in self._directions:
            self._directions[study_id] = self._backend.get_study_directions(study_id)
        return list(self._directions[study_id])

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self._backend.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        """(QMC sampling reads and writes its sample counter here at every ask.)"""
        with self._lock:
            if study_id not in self._study_system_attrs:
                self._study_system_attrs[study_id] = self._backend.get_study_system_attrs(study_id)
            return copy.deepcopy(self._study_system_attrs[study_id])

    def get_all_studies(self) -> list[FrozenStudy]:
        return self._backend.get_all_studies()

    # ---- trials: written through, read from memory ------------------------------------------------
    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        with self._lock:
            self.flush()
            trials = self._study_trials(study_id)
            create = getattr(self._backend, "_create_new_trial", None)
            if create is not None:  # returns the FrozenTrial it wrote (what Optuna's own cache uses)
                frozen = create(study_id, template_trial)
            else:
                frozen = self._backend.get_trial(self._backend.create_new_trial(study_id, template_trial))
            if frozen.number != len(trials):  # someone else added trials: read the study again
                log.warning("Optuna study %s: trial %d was created by another process; re-reading it",
                            study_id, len(trials))
                self._reload(study_id)
                return frozen._trial_id
            self._memory.add(study_id, frozen)
            return frozen._trial_id

    def set_trial_param(self, trial_id: int, param_name: str, param_value_internal: float,
                        distribution: BaseDistribution) -> None:
        with self._lock:
            where = self._memory.locate(trial_id)
            trial = self._memory.cached(trial_id)
            previous = self._memory.distribution(where[0], param_name) if where else None
            if trial is None or where is None or not self._held.enabled:
                self.flush()
                self._backend.set_trial_param(trial_id, param_name, param_value_internal, distribution)
                if trial is None or where is None:
                    return
            else:
                if trial.state.is_finished():
                    self._backend.check_trial_is_updatable(trial_id, trial.state)  # raises
                if previous is not None:  # what RDBStorage would check against the stored one
                    check_distribution_compatibility(previous, distribution)
                self._held.hold_param(trial_id, param_name, param_value_internal, distribution, previous)
            self._memory.note_distribution(where[0], param_name, distribution)
            params = dict(trial.params)
            distributions = dict(trial.distributions)
            params[param_name] = distribution.to_external_repr(param_value_internal)
            distributions[param_name] = distribution
            self._memory.replace(trial, params=params, distributions=distributions)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        with self._lock:
            self.flush()
            if not self._backend.set_trial_state_values(trial_id, state=state, values=values):
                return False
            trial = self._memory.cached(trial_id)
            if trial is None:
                return True
            changes: dict[str, Any] = {"state": state}
            if values is not None:
                changes["values"] = [float(v) for v in values]
            if state == TrialState.RUNNING:
                changes["datetime_start"] = datetime.now()
            if state.is_finished():
                changes["datetime_complete"] = datetime.now()
            self._memory.replace(trial, **changes)
            return True

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        with self._lock:
            self.flush()
            self._backend.set_trial_intermediate_value(trial_id, step, intermediate_value)
            trial = self._memory.cached(trial_id)
            if trial is not None:
                values = {**trial.intermediate_values, step: intermediate_value}
                self._memory.replace(trial, intermediate_values=values)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            self.flush()
            self._backend.set_trial_user_attr(trial_id, key, value)
            trial = self._memory.cached(trial_id)
            if trial is not None:
                self._memory.replace(trial, user_attrs={**trial.user_attrs, key: copy.deepcopy(value)})

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        with self._lock:
            trial = self._memory.cached(trial_id)
            if trial is None or not self._held.enabled:
                self.flush()
                self._backend.set_trial_system_attr(trial_id, key, value)
            else:
                if trial.state.is_finished():
                    self._backend.check_trial_is_updatable(trial_id, trial.state)  # raises
                self._held.hold_system_attr(trial_id, key, value)
            if trial is not None:
                self._memory.replace(trial, system_attrs={**trial.system_attrs, key: copy.deepcopy(value)})

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        with self._lock:
            trials = self._study_trials(study_id)
            if 0 <= trial_number < len(trials):
                return trials[trial_number]._trial_id
        return self._backend.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            trial = self._memory.cached(trial_id)
            if trial is None:
                self.flush()
                return self._backend.get_trial(trial_id)
        # a copy: Optuna's Trial changes the params of the frozen trial it holds
        return copy.deepcopy(trial) if not trial.state.is_finished() else trial

    def get_all_trials(self, study_id: int, deepcopy: bool = True,
                       states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        with self._lock:
            trials = self._study_trials(study_id)
            if states is None:
                out = list(trials)
            elif isinstance(states, (tuple, list, set, frozenset)) and not any(
                    x.is_finished() for x in states):  # waiting / running ones: Optuna asks at every ask
                out = [t for t in self._memory.unfinished(study_id) if t.state in states]
            else:
                out = [t for t in trials if t.state in states]
        return copy.deepcopy(out) if deepcopy else out

    def remove_session(self) -> None:
        self._backend.remove_session()

