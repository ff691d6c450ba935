"""Optuna samplers whose proposals depend only on (seed, trial number, stored trials).

Optuna's samplers draw from generators that restart with each process: a study reopened after
a crash proposed again the points its first process had proposed. Here every draw is seeded
from (seed, trial number): a resumed study goes on as the uninterrupted one would.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, NSGAIISampler, TPESampler
from optuna.trial import FrozenTrial


class SeededRandomSampler(BaseSampler):
    """Uniform sampling where each value depends only on (seed, trial number, gene):
    the same trial gets the same point in any process, whatever happened before."""

    def __init__(self, seed: int):
        self._seed = seed

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return {}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        if not isinstance(param_distribution, FloatDistribution) or param_distribution.log:
            raise TypeError(f"{param_name}: only linear float distributions are sampled here")
        rng = np.random.default_rng([self._seed, trial.number, zlib.crc32(param_name.encode())])
        low, high = param_distribution.low, param_distribution.high
        return float(min(low + rng.random() * (high - low), high))


class PerTrialSeeds:
    """Mixed into an Optuna sampler with a generator (``_rng``) and a fallback random sampler:
    both seeded per trial from (seed, trial number), so a study reopened after a crash does not
    propose again the points its first process proposed (Optuna's generators restart with each
    process) and goes on as the uninterrupted study would."""

    _base_seed: int

    def _seed_per_trial(self, seed: int) -> None:
        self._base_seed = seed
        self._random_sampler = SeededRandomSampler(seed)

    def _reseed(self, trial: FrozenTrial) -> None:
        rng = getattr(self, "_rng", None)
        if rng is not None:
            rng.rng.seed([self._base_seed, trial.number])

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        self._reseed(trial)
        return super().sample_relative(study, trial, search_space)  # type: ignore[misc]

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        self._reseed(trial)
        return super().sample_independent(study, trial, param_name, param_distribution)  # type: ignore[misc]


class SeededTpe(PerTrialSeeds, TPESampler):
    def __init__(self, seed: int, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        self._seed_per_trial(seed)


class SeededNsga2(PerTrialSeeds, NSGAIISampler):
    def __init__(self, seed: int, **kwargs: Any):
        super().__init__(seed=seed, **kwargs)
        self._seed_per_trial(seed)
