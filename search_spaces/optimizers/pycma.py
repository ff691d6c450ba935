"""``cma``: pycma's ``CMAEvolutionStrategy`` through ask/tell, with its full state as bytes.

Coordinates. pycma searches the unit cube: each gene's ``[coord_low, coord_high]`` is
mapped to ``[0, 1]`` and bounds are handled by pycma's ``BoundTransform`` (every sample
it hands out is inside the box, and ``sigma0`` is a fraction of each gene's range).

Asynchronous use. Candidates of the current generation are handed out one by one; when
they run out before ``popsize`` results are in (failures, or more workers than
``popsize``), more candidates are drawn from the *same* distribution. The update
(``es.tell``) happens as soon as ``popsize`` results of the current run are in:

- results arrive in any order; within a generation order does not matter;
- a failure is dropped: it is not told (no fake score), and the generation simply waits
  for ``popsize`` successes, drawing more candidates as workers ask;
- a late result (its point was sampled in an earlier generation of the same run) is
  used in the current update as an *injected* solution: pycma repairs its step length
  (``tell(..., check_points=[...])``) so a stale sample cannot blow up the step size.
  ``options.late_results: drop`` ignores them instead. Results of points from a run that
  was restarted since are dropped.

Restarts (``options.restarts``): ``ipop`` doubles the population at each restart,
``bipop`` alternates that with small-population local runs (Hansen 2009), both when
pycma's termination criteria fire; restarts start from a uniformly random point.

State. ``state()`` pickles the strategy, its random generator and the bookkeeping
(pending points, results of the current generation, counters) into bytes; an optimizer
built from them proposes exactly what the original would have, bit for bit. Save it
after every ``ask`` and ``tell``. The bytes are a pickle: keep them in a trusted store.
"""

from __future__ import annotations

import math
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from search_spaces.genes import GeneSet
from search_spaces.optimizers import register
from search_spaces.optimizers.base import Optimizer, OptimizerError, OptimizerSpec, Point, Pruned, option

STATE_VERSION = 1
DEFAULT_SIGMA0 = 1 / 6  # as Optuna's CMA-ES: a sixth of each gene's range


class _Randn:
    """pycma's normal sampler, drawing from a generator pickled with the strategy (the
    default, ``np.random.randn``, uses NumPy's global state, which no pickle captures)."""

    def __init__(self, seed: np.random.SeedSequence):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


@dataclass
class _State:
    """Everything that is pickled: the strategy and the bookkeeping around it."""

    genes: list[str]
    spec: dict[str, Any]
    es: Any
    rng: np.random.Generator  # restart points and BIPOP draws
    run: int = 0
    next_id: int = 0
    queue: list[np.ndarray] = field(default_factory=list)  # sampled, not yet handed out
    pending: dict[int, tuple[int, int, np.ndarray]] = field(default_factory=dict)  # id -> run, gen, x
    results: list[tuple[np.ndarray, float, bool]] = field(default_factory=list)  # x, f, late
    default_popsize: int = 0
    large_popsize: int = 0
    budget_large: int = 0
    budget_small: int = 0
    regime: str = "large"
    phase: str = "fine"  # "coarse": the strategy searches one coordinate per tie group
    coarse_told: int = 0
    counts: dict[str, int] = field(
        default_factory=lambda: {"told": 0, "failed": 0, "late_used": 0, "late_dropped": 0, "updates": 0}
    )


def tie_groups(genes: GeneSet) -> list[list[int]]:
    """Gene indices grouped by ``meta["tie"]`` (genes a coarse search moves together,
    such as one model's weight in every layer group); an untied gene is its own group."""
    groups: dict[str, list[int]] = {}
    for i, gene in enumerate(genes):
        groups.setdefault(str(gene.meta.get("tie", f"\0{gene.name}")), []).append(i)
    return list(groups.values())


@register
class PyCma(Optimizer):
    """pycma CMA-ES with optional IPOP / BIPOP restarts and byte-exact state."""

    names: ClassVar[tuple[str, ...]] = ("cma",)
    known_options = frozenset({"restarts", "max_restarts", "late_results", "incpopsize", "diagonal",
                               "coarse_to_fine", "coarse_evaluations"})
    persistence = "state"  # state(): the pickled strategy, saved with every ask and tell
    trials_per_gene = 10
    budget_note = "CMA-ES needs on the order of 10–30 × d evaluations"

    def __init__(
        self,
        spec: OptimizerSpec,
        genes: GeneSet,
        x0: Mapping[str, float] | None = None,
        *,
        state: bytes | None = None,
    ):
        super().__init__(spec, genes, x0)
        self.restarts = option(spec, "restarts", "none", str)
        if self.restarts not in ("none", "ipop", "bipop"):
            raise OptimizerError(f"options.restarts must be none, ipop or bipop; got {self.restarts!r}")
        self.late_results = option(spec, "late_results", "use", str)
        if self.late_results not in ("use", "drop"):
            raise OptimizerError(f"options.late_results must be use or drop; got {self.late_results!r}")
        self.max_restarts = option(spec, "max_restarts", 9, int, 0, 100)
        self.incpopsize = option(spec, "incpopsize", 2.0, float, 1.0, 10.0)
        if spec.population_size is not None and spec.population_size < 4:
            raise OptimizerError("cma needs population_size >= 4 (or leave it unset for pycma's default)")
        self.ties = tie_groups(genes) if option(spec, "coarse_to_fine", False, bool) else []
        self.coarse_evaluations = option(spec, "coarse_evaluations", 0, int, 0, 1_000_000)
        if state is not None:
            self._st = self._restore(state)
            return
        seeds = np.random.SeedSequence(spec.seed)
        self._st = _State(genes=genes.names, spec=self._spec_key(), es=None,
                          rng=np.random.Generator(np.random.PCG64(seeds.spawn(1)[0])))
        z0 = genes.normalize(self.x0) if self.x0 is not None else np.full(len(genes), 0.5)
        if self.ties and len(self.ties) < len(genes):  # some genes tied: search their groups first
            self._st.phase = "coarse"
            z0 = np.array([z0[g].mean() for g in self.ties])
        self._st.es = self._new_es(z0, spec.sigma0 or DEFAULT_SIGMA0, spec.population_size)
        self._st.default_popsize = self._st.large_popsize = self._st.es.popsize

    @classmethod
    def create(cls, spec: OptimizerSpec, genes: GeneSet, x0: Mapping[str, float] | None = None,
               **context: Any) -> PyCma:
        if context.get("storage") is not None:
            raise OptimizerError("cma keeps its own state: pass state (bytes), not an Optuna storage")
        return cls(spec, genes, x0, state=context.get("state"))

    # ---- state ---------------------------------------------------------------------
    def _spec_key(self) -> dict[str, Any]:
        return self.spec.model_dump(mode="json", include={"name", "seed", "population_size", "sigma0",
                                                          "options", "directions"})

    def state(self) -> bytes:
        return pickle.dumps(self._st, protocol=pickle.HIGHEST_PROTOCOL)

    def _restore(self, data: bytes) -> _State:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                st = pickle.loads(data)
        except Exception as exc:
            raise OptimizerError(f"the saved cma state cannot be read ({exc})") from exc
        if not isinstance(st, _State):
            raise OptimizerError("the saved state is not a cma optimizer's state")
        if st.genes != self.genes.names:
            raise OptimizerError("the saved cma state searched other genes: a study's space cannot change")
        if st.spec != self._spec_key():
            raise OptimizerError(
                f"the saved cma state was made with another spec ({st.spec}); resume with the same spec"
            )
        return st

    # ---- the strategy --------------------------------------------------------------
    def _new_es(self, z0: np.ndarray, sigma0: float, popsize: int | None) -> Any:
        st = self._st
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "seed": np.nan,  # pycma must not touch NumPy's global generator
            "randn": _Randn(np.random.SeedSequence([self.spec.seed, st.run])),
            "CMA_mirrors": 0,  # samples stay independent, so any subset of them can be told
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
        }
        if popsize:
            opts["popsize"] = int(popsize)
        if option(self.spec, "diagonal", False, bool):
            opts["CMA_diagonal"] = True
        with warnings.catch_warnings():  # pycma warns that matplotlib is missing, and more
            warnings.simplefilter("ignore")
            import cma  # imported here: it pulls in scipy.stats (~2 s), unwanted by the registry

            return cma.CMAEvolutionStrategy(np.clip(z0, 0.0, 1.0).tolist(), sigma0, opts)

    def _restart(self) -> None:
        """A new run (IPOP / BIPOP) from a uniformly random point."""
        st = self._st
        st.run += 1
        sigma0 = self.spec.sigma0 or DEFAULT_SIGMA0
        z0 = st.rng.random(len(self.genes))
        if self.restarts == "bipop" and st.budget_small < st.budget_large:
            u = st.rng.random()
            ratio = 0.5 * st.large_popsize / st.default_popsize
            popsize = max(4, math.floor(st.default_popsize * ratio ** (u * u)))
            sigma0 = sigma0 * 10 ** (-2 * st.rng.random())
            st.regime = "small"
        else:
            st.large_popsize = math.floor(st.large_popsize * self.incpopsize)
            popsize = st.large_popsize
            st.regime = "large"
        st.es = self._new_es(z0, sigma0, popsize)
        st.results.clear()

    def _coarse_budget(self) -> int:
        """Evaluations of the coarse phase: ``options.coarse_evaluations``, else 20 per
        tie group (CMA-ES on a few coordinates has mostly converged by then)."""
        return self.coarse_evaluations or 20 * len(self.ties)

    def _refine(self) -> None:
        """From the coarse phase to every gene: a new run whose mean is the coarse
        strategy's favourite, expanded, and whose step is what the coarse run had left
        (at least a tenth of the initial one), so the fine search starts local."""
        st = self._st
        es = st.es
        start = self._expand(np.asarray(es.result.xfavorite, dtype=float))
        sigma0 = self.spec.sigma0 or DEFAULT_SIGMA0
        sigma = float(min(max(es.sigma, 0.1 * sigma0), sigma0))
        st.phase = "fine"
        st.run += 1
        st.es = self._new_es(start, sigma, self.spec.population_size)
        st.default_popsize = st.large_popsize = st.es.popsize
        st.results.clear()

    # ---- ask / tell ----------------------------------------------------------------
    def _ask_one(self) -> Point:
        st = self._st
        if not st.queue:  # more points of this generation than popsize: sample again
            st.queue = self._sample()
        x = st.queue.pop(0)
        pid = st.next_id
        st.next_id += 1
        st.pending[pid] = (st.run, st.es.countiter, x)
        return Point(id=pid, params=self.genes.denormalize(self._expand(x)),
                     info={"generation": st.es.countiter, "run": st.run, "phase": st.phase})

    def _expand(self, x: np.ndarray) -> np.ndarray:
        """A point of the strategy as a point of every gene (coarse: each tie group's
        coordinate copied to its genes)."""
        if self._st.phase != "coarse":
            return x
        z = np.empty(len(self.genes))
        for k, members in enumerate(self.ties):
            z[members] = x[k]
        return z

    def _sample(self) -> list[np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [np.asarray(x, dtype=float) for x in self._st.es.ask()]

    def _tell_pruned(self, point_id: int, pruned: Pruned) -> None:
        """Ranked below every candidate of its generation that went further (``_ranked``)."""
        self._tell(point_id, list(pruned.values), rung=(pruned.rung, pruned.rungs))

    def _tell(self, point_id: int, values: list[float] | None, rung: tuple[int, int] | None = None) -> None:
        st = self._st
        if point_id not in st.pending:
            what = "was already told" if 0 <= point_id < st.next_id else "was never asked"
            raise OptimizerError(f"point {point_id} {what}")
        run, generation, x = st.pending.pop(point_id)
        if values is None:
            st.counts["failed"] += 1
            return
        st.counts["told"] += 1
        late = generation != st.es.countiter
        if run != st.run or (late and self.late_results == "drop"):
            st.counts["late_dropped"] += 1
            return
        st.counts["late_used"] += int(late)
        st.results.append((x, self._minimizing(values), late, rung))
        if st.regime == "large":
            st.budget_large += 1
        else:
            st.budget_small += 1
        if st.phase == "coarse":
            st.coarse_told += 1
        if len(st.results) >= st.es.popsize:
            self._update()

    def _update(self) -> None:
        st = self._st
        xs = [r[0] for r in st.results]
        fs = _ranked(st.results)
        late = [i for i, r in enumerate(st.results) if r[2]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            st.es.tell(xs, fs, check_points=late or None)
        st.results.clear()
        st.counts["updates"] += 1
        if st.phase == "coarse" and (st.es.stop() or st.coarse_told >= self._coarse_budget()):
            self._refine()
        elif self.restarts != "none" and st.run < self.max_restarts and st.es.stop():
            self._restart()
        # Unsent candidates came from the old distribution: replace them with the new
        # generation's. (Sampling right away also lets pycma accept the next tell even if
        # it is made of late results only: it wants an ask between two tells.)
        st.queue = self._sample()

    def progress(self) -> dict[str, Any]:
        st = self._st
        return {
            "run": st.run,
            "generation": int(st.es.countiter),
            "sigma": float(st.es.sigma),
            "population_size": int(st.es.popsize),
            "pending": len(st.pending),
            "results_in_generation": len(st.results),
            **st.counts,
        }

    def mean(self) -> dict[str, float]:
        """The current distribution mean, in gene coordinates."""
        es = self._st.es
        return self.genes.denormalize(np.asarray(es.result.xfavorite, dtype=float))


def _ranked(results: list[tuple]) -> list[float]:
    """The values pycma is told (lower is better), pruned candidates placed so that the ranks
    are those successive halving itself implies: every candidate scored at full fidelity
    first (by its score), then the pruned ones, those stopped at a later rung before those
    stopped earlier, and by their partial score within a rung. CMA-ES uses ranks only, so a
    partial score is never compared with a full one."""
    fs = [float(r[1]) for r in results]
    rungs = [r[3] if len(r) > 3 else None for r in results]  # states saved before racing: 3-tuples
    if all(r is None for r in rungs):
        return fs
    low, high = min(fs), max(fs)
    span = high - low + 1.0
    full = [f for f, r in zip(fs, rungs) if r is None]
    floor = max(full) if full else high
    return [f if r is None else floor + span * (r[1] - r[0]) + (f - low) for f, r in zip(fs, rungs)]
