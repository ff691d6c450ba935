"""Optimizers on an Optuna study: ``optuna-cmaes`` (the default), ``optuna-tpe``,
``random`` (scrambled Sobol QMC, or plain uniform) and ``nsga2`` (multi-objective).

The study lives in the storage the caller gives (an Optuna storage object or URL; in
memory when none). A point's id is its trial number; ``tell`` finishes that trial
(``TrialState.FAIL`` for a failure, so no score is invented). A new optimizer object on
the same storage and study name continues the study: Optuna keeps everything a sampler
needs in the trials.

Asynchronous CMA-ES (Optuna's ``CmaEsSampler``): each trial is sampled from the current
generation's distribution and tagged with its generation; the distribution is updated
once ``popsize`` trials *of that generation* have completed. Results may arrive in any
order. A failed trial is not complete, so it never counts towards a generation: more
trials are sampled from the same generation until ``popsize`` succeed. A trial of an
older generation that completes after its generation was updated is kept in the study
(and counts as a candidate for the best) but does not enter a later update.

Two choices here make proposals depend only on (spec, seed, stored trials), so a
resumed study proposes exactly what the uninterrupted one would have:

- the samplers are told the search space up front (the genes), so CMA-ES and QMC
  sample from the first trial on, not only after a first trial has completed;
- CMA-ES's per-trial random seed is derived from (seed, trial number) — Optuna derives
  it from a generator that restarts with each process — and the fallback sampler draws
  from (seed, trial number, gene). This resets the private ``_cma_rng`` of Optuna's
  sampler; a test pins that behaviour.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler, CmaEsSampler, QMCSampler
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search_spaces.genes import GeneSet
from search_spaces.optimizers import register
from search_spaces.optimizers.base import Optimizer, OptimizerError, OptimizerSpec, Point, Pruned, option
from search_spaces.optimizers.optuna_seeding import SeededNsga2, SeededRandomSampler, SeededTpe

optuna.logging.set_verbosity(optuna.logging.WARNING)

DEFAULT_STUDY_NAME = "evomerge"


class _KnownSpaceCmaEs(CmaEsSampler):
    """Optuna's CMA-ES, told the search space up front and seeded per trial."""

    def __init__(self, distributions: dict[str, BaseDistribution], seed: int, **kwargs: Any):
        super().__init__(seed=seed, independent_sampler=SeededRandomSampler(seed), n_startup_trials=0,
                         warn_independent_sampling=False, **kwargs)
        self._distributions = distributions
        self._base_seed = seed

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return dict(self._distributions)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> dict:
        rng = getattr(self, "_cma_rng", None)
        if rng is not None:  # per-trial seed = f(seed) + trial.number, in every process
            rng.rng.seed(self._base_seed)
        return super().sample_relative(study, trial, search_space)

    def stored_state(self, study: optuna.Study) -> Any | None:
        """The last CMA-ES state stored with a completed trial (cmaes.CMA), or None."""
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        try:
            return self._restore_optimizer(completed)
        except AttributeError:  # Optuna changed its private layout: no summary, search unaffected
            return None


class _KnownSpaceQmc(QMCSampler):
    """Optuna's QMC sampler, told the search space so the first trial is QMC too."""

    def __init__(self, distributions: dict[str, BaseDistribution], seed: int, **kwargs: Any):
        super().__init__(seed=seed, independent_sampler=SeededRandomSampler(seed),
                         warn_independent_sampling=False, **kwargs)
        self._distributions = distributions

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict:
        return dict(self._distributions)


class OptunaOptimizer(Optimizer):
    """The ask/tell interface over an Optuna study; subclasses pick the sampler."""

    names: ClassVar[tuple[str, ...]] = ()
    persistence = "storage"  # the Optuna study in the storage given to create()

    def __init__(
        self,
        spec: OptimizerSpec,
        genes: GeneSet,
        x0: Mapping[str, float] | None = None,
        *,
        storage: str | BaseStorage | None = None,
        study_name: str | None = None,
    ):
        super().__init__(spec, genes, x0)
        if storage is not None and not study_name:
            raise OptimizerError("pass study_name with a storage: one Optuna study per evomerge study")
        self.distributions: dict[str, BaseDistribution] = {
            g.name: FloatDistribution(g.coord_low, g.coord_high) for g in genes
        }
        with warnings.catch_warnings():  # experimental / deprecated-argument notices
            warnings.simplefilter("ignore")
            self.sampler = self._sampler()
            self.study = optuna.create_study(
                storage=storage,
                study_name=study_name or DEFAULT_STUDY_NAME,
                sampler=self.sampler,
                directions=list(spec.directions),
                load_if_exists=True,
            )
        self._check_resumed_study()
        if self.x0 is not None and not self.study.get_trials(deepcopy=False):
            self.study.enqueue_trial(dict(self.x0))  # the user's recipe is the first candidate

    @classmethod
    def create(cls, spec: OptimizerSpec, genes: GeneSet, x0: Mapping[str, float] | None = None,
               **context: Any) -> OptunaOptimizer:
        if context.get("state") is not None:
            raise OptimizerError(
                f"{spec.name} keeps its state in the Optuna storage; pass storage, not state"
            )
        return cls(spec, genes, x0, storage=context.get("storage"), study_name=context.get("study_name"))

    def _sampler(self) -> BaseSampler:
        raise NotImplementedError

    def _check_resumed_study(self) -> None:
        want = [optuna.study.StudyDirection[d.upper()] for d in self.spec.directions]
        if list(self.study.directions) != want:
            raise OptimizerError(
                f"the stored study {self.study.study_name!r} has directions "
                f"{[d.name.lower() for d in self.study.directions]}, the spec {self.spec.directions}"
            )
        for t in self.study.get_trials(deepcopy=False):
            if not t.distributions:  # enqueued, not asked yet
                continue
            if t.distributions != self.distributions:
                raise OptimizerError(
                    f"the stored study {self.study.study_name!r} searched other genes (trial {t.number}); "
                    "a study's search space cannot change: start a new study"
                )
            break

    # ---- ask / tell ----------------------------------------------------------------
    def _ask_one(self) -> Point:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = self.study.ask(fixed_distributions=self.distributions)
        params = {name: float(trial.params[name]) for name in self.genes.names}
        info: dict[str, Any] = {}
        gen = self._generation_of(trial)
        if gen is not None:
            info["generation"] = gen
        return Point(id=trial.number, params=params, info=info)

    def _generation_of(self, trial: optuna.Trial) -> int | None:
        """The CMA-ES generation Optuna tagged the trial with (for the dashboard only)."""
        try:
            attrs = self.study._storage.get_trial_system_attrs(trial._trial_id)
        except AttributeError:
            return None
        gen = attrs.get("cma:generation")
        return int(gen) if gen is not None else None

    def _tell(self, point_id: int, values: list[float] | None) -> None:
        trials = self.study.get_trials(deepcopy=False)
        if not 0 <= point_id < len(trials) or trials[point_id].number != point_id:
            raise OptimizerError(f"point {point_id} was never asked in study {self.study.study_name!r}")
        if trials[point_id].state.is_finished():
            raise OptimizerError(f"point {point_id} was already told ({trials[point_id].state.name})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if values is None:
                self.study.tell(point_id, state=TrialState.FAIL)
            else:
                self.study.tell(point_id, values if len(values) > 1 else values[0])

    def _tell_pruned(self, point_id: int, pruned: Pruned) -> None:
        """Optuna's own pruned trial: its partial value reported at step ``rung``, then told
        PRUNED. Optuna's samplers know what that means: TPE ranks pruned trials below complete
        ones, by the step they reached, then by value; CMA-ES leaves them out of its
        generations (``consider_pruned_trials`` is off), so that it updates on full scores only."""
        trials = self.study.get_trials(deepcopy=False)
        if not 0 <= point_id < len(trials) or trials[point_id].state.is_finished():
            self._tell(point_id, None)  # the same errors as any tell
            return
        trial = optuna.Trial(self.study, trials[point_id]._trial_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if len(pruned.values) == 1:
                trial.report(self._pruned_value(pruned, trials), pruned.rung)
            self.study.tell(point_id, state=TrialState.PRUNED)

    def _pruned_value(self, pruned: Pruned, trials: list[FrozenTrial]) -> float:
        """The intermediate value a pruned trial reports at its rung: its partial value."""
        return pruned.values[0]

    def untold(self) -> list[int]:
        """Trials still RUNNING in the Optuna study (asked, never told)."""
        return [t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]

    def progress(self) -> dict[str, Any]:
        trials = self.study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        return {
            "trials": len(trials),
            "complete": states.count(TrialState.COMPLETE),
            "failed": states.count(TrialState.FAIL),
            "pending": sum(1 for s in states if not s.is_finished()),
        }


@register
class OptunaCmaEs(OptunaOptimizer):
    """Optuna's CMA-ES (the ``cmaes`` package): the default optimizer."""

    names = ("optuna-cmaes",)
    known_options = frozenset({"use_separable_cma", "lr_adapt", "restarts"})
    trials_per_gene = 10
    budget_note = "CMA-ES needs on the order of 10–30 × d evaluations"

    def _sampler(self) -> BaseSampler:
        kwargs: dict[str, Any] = {
            "popsize": self.spec.population_size,
            "use_separable_cma": option(self.spec, "use_separable_cma", False, bool),
            "lr_adapt": option(self.spec, "lr_adapt", False, bool),
        }
        restarts = option(self.spec, "restarts", "none", str)
        if restarts not in ("none", "ipop", "bipop"):
            raise OptimizerError(f"options.restarts must be none, ipop or bipop; got {restarts!r}")
        if restarts != "none":  # when CMA-ES has converged: a larger population from a random point
            kwargs["restart_strategy"] = restarts
        if self.spec.sigma0 is not None:  # Optuna's sigma0 is in the [0, 1]-scaled space, like ours
            kwargs["sigma0"] = self.spec.sigma0
        if self.x0 is not None:
            kwargs["x0"] = dict(self.x0)
        # racing: a pruned trial takes its place in its generation with a rank key (_pruned_value)
        return _KnownSpaceCmaEs(self.distributions, self.spec.seed, consider_pruned_trials=True, **kwargs)

    def _pruned_value(self, pruned: Pruned, trials: list[FrozenTrial]) -> float:
        """A rank key, not a score: below every full score told so far, a later rung above an
        earlier one, then by the partial value. CMA-ES ranks only, so its generations fill with
        every candidate (a pruned one among the worst, as successive halving judged it) and no
        partial score is ever compared with a full one. Reported as the pruned trial's
        intermediate value, which Optuna's CMA-ES reads with ``consider_pruned_trials``."""
        sign = 1.0 if self.spec.directions[0] == "maximize" else -1.0
        full = [sign * t.value for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
        partial = sign * pruned.values[0]
        low, high = min([*full, partial]), max([*full, partial])
        span = high - low + 1.0
        floor = min(full) if full else partial
        return sign * (floor - span * (pruned.rungs - 1 - pruned.rung) + (partial - low))

    def cma_state(self) -> dict[str, Any] | None:
        """Generation, mean (gene coordinates) and step size of the last stored CMA-ES state.

        Optuna updates lazily: once ``popsize`` trials of a generation are complete, the
        update happens when the next trial is asked, and is stored with that trial.
        """
        assert isinstance(self.sampler, _KnownSpaceCmaEs)
        cma = self.sampler.stored_state(self.study)
        if cma is None:
            return None
        lows, highs = self.genes.lows, self.genes.highs
        return {
            "generation": int(cma.generation),
            "mean": self.genes.from_array(lows + np.asarray(cma.mean) * (highs - lows)),
            "sigma": float(cma._sigma),
            "population_size": int(cma.population_size),
        }

    def progress(self) -> dict[str, Any]:
        out = super().progress()
        state = self.cma_state()
        if state is not None:
            out.update(generation=state["generation"], sigma=state["sigma"],
                       population_size=state["population_size"])
        return out


@register
class OptunaTpe(OptunaOptimizer):
    """Optuna's TPE (multivariate, with the constant liar for pending trials)."""

    names = ("optuna-tpe",)
    multi_objective = True
    known_options = frozenset({"n_startup_trials", "multivariate", "constant_liar"})

    def _sampler(self) -> BaseSampler:
        return SeededTpe(
            seed=self.spec.seed,
            n_startup_trials=option(self.spec, "n_startup_trials", 10, int, 0, 100_000),
            multivariate=option(self.spec, "multivariate", True, bool),
            constant_liar=option(self.spec, "constant_liar", True, bool),
        )


@register
class OptunaRandom(OptunaOptimizer):
    """Scrambled Sobol points (``qmc: true``, default) or plain uniform random points."""

    names = ("random",)
    multi_objective = True
    known_options = frozenset({"qmc"})
    uses_space_start = False  # a baseline: the box, not the space's natural start

    def _sampler(self) -> BaseSampler:
        if option(self.spec, "qmc", True, bool):
            return _KnownSpaceQmc(self.distributions, self.spec.seed, qmc_type="sobol", scramble=True)
        return SeededRandomSampler(self.spec.seed)


@register
class OptunaNsga2(OptunaOptimizer):
    """Optuna's NSGA-II, for multi-objective studies (one objective works too)."""

    names = ("nsga2",)
    multi_objective = True
    known_options = frozenset({"crossover_prob", "mutation_prob"})

    def _sampler(self) -> BaseSampler:
        o = self.spec.options
        kwargs: dict[str, Any] = {"seed": self.spec.seed, "population_size": self.spec.population_size or 50}
        if "crossover_prob" in o:
            kwargs["crossover_prob"] = option(self.spec, "crossover_prob", None, float, 0.0, 1.0)
        if "mutation_prob" in o:
            kwargs["mutation_prob"] = option(self.spec, "mutation_prob", None, float, 0.0, 1.0)
        return SeededNsga2(**kwargs)
