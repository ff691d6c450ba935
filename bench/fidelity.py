"""Racing against full fidelity: best held-out score against examples scored.

For each zoo variant and seed, two studies of the default spec (``bench/search_quality.py``'s
``default``: only the method named, ``limit: 200`` examples of the target):

- **full**: every candidate scored on all 200 examples, ``--trials`` trials;
- **racing**: ``fidelity: {min_examples, eta}``; it stops when it has scored 1/``--share`` of the
  full study's examples (a budget in examples, as ``budget.max_examples`` sets one).

Each study runs with the service's own parts in this process (validation, space, optimizer, the
worker's ``TrialRunner`` racing over rungs with a ``RaceTicket`` from the controller's
``RaceBoard``, the optimizer told ``Pruned`` for a pruned candidate), trials asked two at a time.
At checkpoints of examples scored, the best complete trial so far (by search score) is scored on
the held-out split (full fidelity, each recipe once). The final figure of a study is the held-out
score of the best of its top 3 complete trials, as in ``bench/search_quality.py``.

Prints a table (per variant: full and racing held-out, mean (min–max) over seeds, examples
scored, racing / full) and writes ``bench/out/fidelity.png`` (best held-out against examples
scored, mean over seeds) and ``--json``.

    .venv/bin/python bench/fidelity.py                                  # every variant, 3 seeds
    .venv/bin/python bench/fidelity.py --variants two-experts --seeds 0 --min-examples 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_quality import Study, named_spec, study_spec, variant_facts

from workers.zoo.variants import VARIANTS

LIMIT = 200
OUT = Path(__file__).resolve().parent / "out"


class RacedRun:
    """One study, full fidelity (``fidelity`` None) or raced, until its trials or examples run out."""

    def __init__(self, study: Study, fidelity: dict[str, Any] | None, optimizer_spec: Any) -> None:
        from search_spaces.optimizers import create_optimizer
        from service.controller.race_board import RaceBoard
        from service.spec.fidelity import FidelitySpec

        self.study = study
        self.optimizer = create_optimizer(optimizer_spec, study.space)
        self.board = None
        if fidelity is not None:
            spec = FidelitySpec(**fidelity)
            self.board = RaceBoard(spec.sizes(LIMIT), spec.eta, spec.window)
        self.heldout_of: dict[str, float] = {}

    def heldout(self, recipe: dict[str, Any]) -> float:
        key = json.dumps(recipe, sort_keys=True)
        if key not in self.heldout_of:
            self.heldout_of[key] = self.study._heldout(recipe)
        return self.heldout_of[key]

    def run(self, max_trials: int, max_examples: int, checkpoints: list[int]) -> dict[str, Any]:
        from search_spaces.optimizers.base import Failure
        from service.controller.race_board import pruned_result

        complete: list[tuple[int, float, dict[str, Any]]] = []  # (trial, search score, recipe)
        curve: list[tuple[int, float]] = []  # (examples scored, held-out of the best so far)
        examples = trials = pruned = 0
        pending: list[Any] = []
        marks = list(checkpoints)
        start = time.perf_counter()
        while trials < max_trials and examples < max_examples:
            while len(pending) < 2:
                pending.extend(self.optimizer.ask(1))
            point = pending.pop(0)
            recipe = self.study.space.decode(point.params).model_dump(mode="json")
            race = self.board.ticket() if self.board is not None else None
            result = self.study.search.run(trials, recipe, race=race)
            trials += 1
            examples += result.cost.examples
            if result.state == "complete":
                self.optimizer.tell(point.id, list(result.values))
                complete.append((trials - 1, result.values[0], recipe))
            elif result.state == "pruned" and self.board is not None:
                pruned += 1
                told = pruned_result(result.values, result.rungs[-1].rung, self.board)
                self.optimizer.tell(point.id, told)
            else:
                self.optimizer.tell(point.id, Failure(result.error or "failed"))
            if self.board is not None:
                self.board.record(result.rungs)
            while marks and examples >= marks[0] and complete:
                best = max(complete, key=lambda c: (c[1], -c[0]))
                curve.append((marks.pop(0), self.heldout(best[2])))
        top = sorted(complete, key=lambda c: (-c[1], c[0]))[:3]
        rescored = [(n, s, self.heldout(r)) for n, s, r in top]
        return {"heldout": rescored[0][2], "search": rescored[0][1], "trials": trials, "pruned": pruned,
                "complete": len(complete), "examples": examples, "curve": curve,
                "seconds": time.perf_counter() - start}


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        for mode, style in (("full", "-"), ("racing", "--")):
            runs = results[name][mode]
            xs = sorted({x for r in runs for x, _ in r["curve"]})
            ys = []
            for x in xs:
                vals = [dict(r["curve"]).get(x) for r in runs]
                vals = [v for v in vals if v is not None]
                ys.append(statistics.fmean(vals) if vals else float("nan"))
            ax.plot(xs, ys, style, label=mode)
        ax.set_title(name)
        ax.set_xlabel("examples scored")
        ax.set_ylabel("best held-out (mean of seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=300, help="the full-fidelity study's trials")
    parser.add_argument("--min-examples", type=int, default=20)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--window", type=int, default=None, help="fidelity.window (default: all)")
    parser.add_argument("--share", type=float, default=3.0,
                        help="the racing study scores 1/share of the full study's examples")
    parser.add_argument("--optimizer", type=json.loads, default={}, help="optimizer fields (JSON) for both")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=OUT / "fidelity.png")
    args = parser.parse_args()

    from service.settings import get_settings
    from workers.zoo.build import build_zoo

    fidelity = {"min_examples": args.min_examples, "eta": args.eta, "window": args.window}
    results: dict[str, Any] = {}
    for name in args.variants:
        facts = variant_facts(name)
        zoo = build_zoo(None, seed=0, variant=name, log=None)
        settings = get_settings(model_roots=[str(zoo.root.parent)], data_dir=Path("/tmp/evomerge-bench"))
        runners: dict[str, Any] = {}
        space, optimizer = named_spec("default", "ties", None)
        optimizer = {**optimizer, **args.optimizer}
        full_examples = args.trials * LIMIT
        checkpoints = [int(full_examples * f / 30) for f in range(1, 31)]
        results[name] = {"full": [], "racing": []}
        print(f"\n## {name}: fidelity {fidelity}, full study {args.trials} trials = "
              f"{full_examples} examples; racing until {full_examples / args.share:.0f} examples", flush=True)
        for seed in args.seeds:
            spec = study_spec(facts, zoo.root.name, space, optimizer, args.trials, seed)
            study = Study(spec, settings, runners)
            for mode in ("full", "racing"):
                run = RacedRun(study, fidelity if mode == "racing" else None, study.validated.optimizer)
                budget = full_examples if mode == "full" else int(full_examples / args.share)
                r = run.run(args.trials if mode == "full" else 100_000, budget, checkpoints)
                results[name][mode].append(r)
                print(f"  {mode:6s} seed {seed}: held-out {r['heldout']:.3f}  search {r['search']:.3f}  "
                      f"{r['trials']} trials ({r['pruned']} pruned)  {r['examples']} examples  "
                      f"{r['seconds']:.0f} s", flush=True)
    print("\nbest held-out of the evolved merge, mean (min–max) over seeds; examples scored (mean)")
    print(f"{'variant':12s}  {'full':22s}  {'racing':22s}  {'racing/full':11s}  examples full / racing")
    for name, modes in results.items():
        full = [r["heldout"] for r in modes["full"]]
        race = [r["heldout"] for r in modes["racing"]]
        mean_full = statistics.fmean(full)
        ratio = statistics.fmean(race) / mean_full if mean_full > 0 else float("nan")
        ex_f = statistics.fmean(r["examples"] for r in modes["full"])
        ex_r = statistics.fmean(r["examples"] for r in modes["racing"])
        print(f"{name:12s}  {spread(full):22s}  {spread(race):22s}  {ratio:11.1%}  {ex_f:.0f} / {ex_r:.0f} "
              f"({ex_r / ex_f:.2f})")
    plot(results, args.png)
    print(f"\nplot: {args.png}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()
