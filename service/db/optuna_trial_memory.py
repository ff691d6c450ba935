"""The in-memory side of :class:`service.db.optuna_cache.SoleWriterStorage`: each study's
Optuna trials by number, where each trial id sits, which trials are unfinished, and the
distribution each parameter name was first stored with.

It holds rows only; reading and writing the database is the storage's job.
"""

from __future__ import annotations

import copy
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial


class TrialMemory:
    """The trials of the studies read so far; cached trials are replaced, never changed."""

    def __init__(self) -> None:
        self._trials: dict[int, list[FrozenTrial]] = {}  # study id -> its trials, by number
        self._where: dict[int, tuple[int, int]] = {}  # trial id -> (study id, number)
        self._unfinished: dict[int, set[int]] = {}  # study id -> numbers of its unfinished trials
        self._distributions: dict[tuple[int, str], BaseDistribution] = {}

    # ---- studies ----------------------------------------------------------------------------------
    def study(self, study_id: int) -> list[FrozenTrial] | None:
        """The study's trials, or None when it has not been read."""
        return self._trials.get(study_id)

    def load_study(self, study_id: int, trials: list[FrozenTrial]) -> list[FrozenTrial]:
        """Keep the trials of a full read of the study (in any order); return them by number."""
        trials.sort(key=lambda t: t.number)
        if [t.number for t in trials] != list(range(len(trials))):
            raise RuntimeError(f"Optuna study {study_id}: trial numbers are not 0..{len(trials) - 1}")
        self._trials[study_id] = trials
        self._unfinished[study_id] = {t.number for t in trials if not t.state.is_finished()}
        for t in trials:
            self._where[t._trial_id] = (study_id, t.number)
            for name, dist in t.distributions.items():
                self._distributions.setdefault((study_id, name), dist)
        return trials

    def new_study(self, study_id: int) -> None:
        self._trials[study_id] = []
        self._unfinished[study_id] = set()

    def drop_study(self, study_id: int) -> None:
        for t in self._trials.pop(study_id, []):
            self._where.pop(t._trial_id, None)
        self._unfinished.pop(study_id, None)

    def clear(self) -> None:
        self._trials.clear()
        self._where.clear()
        self._unfinished.clear()
        self._distributions.clear()

    # ---- trials -----------------------------------------------------------------------------------
    def locate(self, trial_id: int) -> tuple[int, int] | None:
        """``(study id, number)`` of a cached trial."""
        return self._where.get(trial_id)

    def cached(self, trial_id: int) -> FrozenTrial | None:
        where = self._where.get(trial_id)
        if where is None:
            return None
        study_id, number = where
        return self._trials[study_id][number]

    def add(self, study_id: int, frozen: FrozenTrial) -> None:
        """Append a trial just created (its number is the study's next one)."""
        self._trials[study_id].append(frozen)
        self._where[frozen._trial_id] = (study_id, frozen.number)
        if not frozen.state.is_finished():
            self._unfinished[study_id].add(frozen.number)

    def replace(self, trial: FrozenTrial, **changes: Any) -> None:
        """Swap the cached trial for a changed copy: objects already handed out never change
        under their holder (as with trials read from the database)."""
        new = copy.copy(trial)
        for name, value in changes.items():
            setattr(new, name, value)  # FrozenTrial's public setters
        study_id, number = self._where[trial._trial_id]
        self._trials[study_id][number] = new
        if new.state.is_finished():
            self._unfinished[study_id].discard(number)

    def unfinished(self, study_id: int) -> list[FrozenTrial]:
        """The study's waiting and running trials, by number."""
        trials = self._trials[study_id]
        return [trials[n] for n in sorted(self._unfinished[study_id])]

    # ---- parameter distributions ------------------------------------------------------------------
    def distribution(self, study_id: int, name: str) -> BaseDistribution | None:
        """The distribution the study first stored parameter ``name`` with, if any."""
        return self._distributions.get((study_id, name))

    def note_distribution(self, study_id: int, name: str, distribution: BaseDistribution) -> None:
        self._distributions.setdefault((study_id, name), distribution)
