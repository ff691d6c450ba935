"""Optimizer comparison on a shifted quadratic, through the real ask/tell interface.

    .venv/bin/python bench/optimizers.py [--dim 20] [--seeds 5] [--budgets 250,500,1000]
        [--workers 4] [--fail 0.0] [--only cma,optuna-cmaes]

f(x) = Σ (x_i − c_i)² on the box [−1, 1]^d, with c drawn per seed from U(−0.6, 0.6)^d
(f at the box centre is |c|² ≈ 0.12·d; a uniform random point scores ≈ 0.45·d). Use is
asynchronous: ``--workers`` points are in flight, a random one finishes next (so results
come back out of order), and ``--fail`` is the share of candidates that fail. The table
gives, per optimizer and budget, the median and the worst best-so-far over the seeds,
and the mean wall time of one run at the largest budget (optimizer overhead only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_spaces.genes import Gene, GeneSet
from search_spaces.optimizers import Failure, create_optimizer

CONFIGS = {
    "cma": {"name": "cma"},
    "cma-ipop": {"name": "cma", "options": {"restarts": "ipop"}},
    "cma-drop-late": {"name": "cma", "options": {"late_results": "drop"}},
    "optuna-cmaes": {"name": "optuna-cmaes"},
    "optuna-tpe": {"name": "optuna-tpe"},
    "nsga2": {"name": "nsga2"},
    "random-qmc": {"name": "random"},
    "random": {"name": "random", "options": {"qmc": False}},
}


def quadratic(dim: int, seed: int) -> tuple[GeneSet, np.ndarray]:
    genes = GeneSet(Gene(name=f"x{i:03d}", low=-1.0, high=1.0, label=f"x{i}") for i in range(dim))
    centre = np.random.default_rng(1000 + seed).uniform(-0.6, 0.6, dim)
    return genes, centre


def run(config: dict, dim: int, seed: int, budgets: list[int], workers: int, fail: float) -> list[float]:
    """Best value found after each budget (asynchronous, out-of-order results)."""
    genes, centre = quadratic(dim, seed)
    opt = create_optimizer({**config, "seed": seed, "directions": ["minimize"]}, genes)
    events = np.random.default_rng(seed)
    in_flight = opt.ask(workers)
    best, told, out = np.inf, 0, []
    while told < budgets[-1]:
        point = in_flight.pop(int(events.integers(len(in_flight))))
        if events.random() < fail:
            opt.tell(point.id, Failure("simulated"))
        else:
            value = float(np.sum((genes.to_array(point.params) - centre) ** 2))
            best = min(best, value)
            opt.tell(point.id, value)
            told += 1
            if told in budgets:
                out.append(best)
        in_flight += opt.ask(1)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=20)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budgets", default="250,500,1000")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--fail", type=float, default=0.0)
    ap.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(CONFIGS))
    args = ap.parse_args(argv)
    budgets = sorted(int(b) for b in args.budgets.split(","))
    chosen = [c for c in (args.only.split(",") if args.only else CONFIGS)]
    print(f"shifted quadratic, d={args.dim}, {args.seeds} seeds, {args.workers} workers in flight, "
          f"{args.fail:.0%} failures; best f (median / worst over seeds)")
    header = f"| {'optimizer':14s} | " + " | ".join(f"{b:>5d} evals (med / worst)" for b in budgets)
    print(header + " | s/run |")
    print("|" + "-" * 16 + "|" + "|".join("-" * 27 for _ in budgets) + "|-------|")
    for name in chosen:
        per_budget: list[list[float]] = [[] for _ in budgets]
        t0 = time.perf_counter()
        for seed in range(args.seeds):
            for i, v in enumerate(run(CONFIGS[name], args.dim, seed, budgets, args.workers, args.fail)):
                per_budget[i].append(v)
        secs = (time.perf_counter() - t0) / args.seeds
        cells = [f"{statistics.median(v):10.2e} / {max(v):9.2e}" for v in per_budget]
        print(f"| {name:14s} | " + " | ".join(f"{c:>25s}" for c in cells) + f" | {secs:5.1f} |", flush=True)


if __name__ == "__main__":
    main()
