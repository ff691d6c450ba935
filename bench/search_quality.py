"""How well the search finds a merge: the demo study over several seeds and optimizers.

For each optimizer and seed this runs the demo study (``service.spec.DEMO_EXAMPLE``:
per-layer TIES over the zoo's two experts, the target task ``zoo_xl_add`` as the
objective) with the service's own parts — spec validation, search space, optimizer,
and the worker's ``TrialRunner`` (in-memory candidate + the lm-eval adapter) — in this
process, without Ray or the database, so that only the search is measured. Trials are
asked two at a time (the demo's parallelism) and told as they finish.

At the end the top 3 trials by search score are re-scored on the held-out split
(``zoo_xl_add_heldout``) and the best of those by search score is the evolved merge.

Prints, per optimizer: mean ± spread (min–max) of the held-out score of the evolved merge,
of its search score, and of the trials needed to reach 90 % of the final best search
score; then the source models and simple merges on both splits; optionally a
layer-stacking study (``--stacking``).

    .venv/bin/python bench/search_quality.py                    # 3 seeds × 4 optimizers, 300 trials
    .venv/bin/python bench/search_quality.py --trials 100 --seeds 0 --optimizers optuna-cmaes
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPTIMIZERS = ["optuna-cmaes", "cma", "optuna-tpe", "random"]


def demo_spec(method: str | None, granularity: int, trials: int, seed: int, optimizer: str,
              space: dict[str, Any] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The demo study; ``method`` None keeps the demo's space (with ``extra`` fields over it)."""
    from service.spec import DEMO_EXAMPLE

    spec = copy.deepcopy(DEMO_EXAMPLE)
    if space is not None:
        spec["space"] = space
    elif method is not None:
        spec["space"] = {"kind": "parameter", "method": method, "granularity": granularity, **(extra or {})}
    else:
        spec["space"].update(extra or {})
    spec["optimizer"] = {"name": optimizer}
    spec["budget"] = {"max_trials": trials}
    spec["seed"] = seed
    return spec


class Study:
    """One study's parts, built as the service builds them."""

    def __init__(self, spec: dict[str, Any], settings: Any, runners: dict[str, Any]) -> None:
        from service.runtime import worker_spec_data
        from service.spec import StudySpec
        from service.validation import validate_study
        from workers.trial import TrialRunner

        self.validated = validate_study(StudySpec.from_data(spec), settings)
        self.space = self.validated.build_space()
        search = worker_spec_data(self.validated, settings)
        heldout = worker_spec_data(self.validated, settings, heldout=True)
        key = json.dumps(search, sort_keys=True)
        if key not in runners:
            runners[key] = TrialRunner(search)
        self.search = runners[key]
        hkey = json.dumps(heldout, sort_keys=True)
        if hkey not in runners:
            runners[hkey] = TrialRunner(heldout)
        self.heldout = runners[hkey]

    def run(self, trials: int, parallel: int = 2) -> dict[str, Any]:
        from search_spaces.optimizers import create_optimizer
        from search_spaces.optimizers.base import Failure

        optimizer = create_optimizer(self.validated.optimizer, self.space)
        history: list[tuple[int, float, dict[str, Any]]] = []  # (trial, search score, recipe)
        asked = 0
        pending: list[Any] = []
        start = time.perf_counter()
        while len(history) < trials:
            while len(pending) < parallel and asked < trials:
                pending.extend(optimizer.ask(1))
                asked += 1
            point = pending.pop(0)
            recipe = self.space.decode(point.params).model_dump(mode="json")
            result = self.search.run(len(history), recipe)
            if result.state == "complete":
                optimizer.tell(point.id, list(result.values))
                history.append((len(history), result.values[0], recipe))
            else:
                optimizer.tell(point.id, Failure(result.error or "failed"))
                history.append((len(history), float("-inf"), recipe))
        seconds = time.perf_counter() - start
        top = sorted(history, key=lambda h: (-h[1], h[0]))[:3]
        rescored = [(n, s, self._heldout(r)) for n, s, r in top]
        best_n, best_search, best_heldout = rescored[0]
        final = max(h[1] for h in history)
        reach = next(n for n, s, _ in history if s >= 0.9 * final) + 1 if final > 0 else trials
        return {"heldout": best_heldout, "search": best_search, "trial": best_n, "reach90": reach,
                "seconds": seconds, "top3_heldout": [h for _, _, h in rescored]}

    def _heldout(self, recipe: dict[str, Any]) -> float:
        result = self.heldout.run(0, recipe)
        return result.values[0] if result.state == "complete" else float("nan")


def baselines(study: Study) -> list[tuple[str, float, float]]:
    from service.baselines import baseline_recipes

    out = []
    for name, _, recipe in baseline_recipes(study.validated):
        s = study.search.run(0, recipe)
        h = study.heldout.run(0, recipe)
        out.append((name, s.values[0] if s.state == "complete" else float("nan"),
                    h.values[0] if h.state == "complete" else float("nan")))
    return out


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    import torch

    from service.settings import get_settings
    from workers.zoo.build import build_zoo

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--optimizers", nargs="+", default=OPTIMIZERS)
    parser.add_argument("--method", default=None, help="another method (default: the demo's space)")
    parser.add_argument("--granularity", type=int, default=1, help="with --method")
    parser.add_argument("--space", type=json.loads, default=None,
                        help='extra space fields as JSON, e.g. \'{"parameters": {"normalize": false}}\'')
    parser.add_argument("--stacking", action="store_true", help="also run a layer-stacking study")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    zoo = build_zoo(None, seed=0, log=None)
    settings = get_settings(model_roots=[str(zoo.root.parent)], data_dir=Path("/tmp/evomerge-bench"))
    runners: dict[str, Any] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    shown = demo_spec(args.method, args.granularity, args.trials, 0, "-", extra=args.space)["space"]
    print(f"demo study: space {json.dumps(shown)}, {args.trials} trials, seeds {args.seeds}; zoo {zoo.root}",
          flush=True)
    for name in args.optimizers:
        for seed in args.seeds:
            spec = demo_spec(args.method, args.granularity, args.trials, seed, name, extra=args.space)
            study = Study(spec, settings, runners)
            r = study.run(args.trials)
            results.setdefault(name, []).append(r)
            print(f"  {name:13s} seed {seed}: held-out {r['heldout']:.3f}  search {r['search']:.3f}  "
                  f"(trial {r['trial']}, 90 % after {r['reach90']})  {r['seconds']:.0f} s", flush=True)

    print("\nheld-out target score of the evolved merge (mean (min–max) over seeds):")
    print(f"{'optimizer':13s}  {'held-out':22s}  {'search':22s}  trials to 90 %")
    for name, rs in results.items():
        held, search = spread([r["heldout"] for r in rs]), spread([r["search"] for r in rs])
        print(f"{name:13s}  {held:22s}  {search:22s}  {spread([float(r['reach90']) for r in rs])}")
    spec = demo_spec(args.method, args.granularity, args.trials, 0, args.optimizers[0], extra=args.space)
    study = Study(spec, settings, runners)
    base = baselines(study)
    print("\nreferences (search / held-out):")
    for name, s, h in base:
        print(f"  {name:32s} {s:.3f} / {h:.3f}")
    out: dict[str, Any] = {"args": vars(args) | {"json": None}, "results": results,
                           "baselines": [{"name": n, "search": s, "heldout": h} for n, s, h in base]}
    if args.stacking:
        space = {"kind": "stacking", "repeats": 2}
        for seed in args.seeds:
            spec = demo_spec("passthrough", 1, args.trials, seed, "optuna-cmaes", space)
            st = Study(spec, settings, runners)
            r = st.run(args.trials)
            out.setdefault("stacking", []).append(r)
            print(f"  stacking (optuna-cmaes) seed {seed}: held-out {r['heldout']:.3f}  "
                  f"search {r['search']:.3f}  {r['seconds']:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
