"""How well the search finds a merge without tuning: the zoo family × named specs × seeds.

For each zoo variant (``evomerge zoo build --variant NAME``), each named spec and each
seed, this runs a study with the service's own parts — spec validation, search space,
optimizer, and the worker's ``TrialRunner`` (in-memory candidate + the lm-eval adapter)
— in this process, without Ray or the database, so that only the search is measured.
Trials are asked two at a time (the demo's parallelism) and told as they finish. At the
end the top 3 trials by search score are re-scored on the held-out split and the best
of those by search score is the evolved merge.

Named specs (``SPECS``): ``default`` is what a user gets by naming only the method;
the others are tuned alternatives, random search, and layer stacking. ``--space`` and
``--optimizer`` (JSON) add a ``custom`` spec for exploring.

Prints, per variant and spec: held-out mean (min–max) of the evolved merge, its search
score, and the trials needed to reach 90 % of the final best search score; then the
sources and the baselines on both splits.

    .venv/bin/python bench/search_quality.py                  # every variant, 3 seeds, 300 trials
    .venv/bin/python bench/search_quality.py --variants two-experts --specs default random --seeds 0
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

# name -> (space fields over {"kind": "parameter"}, optimizer fields); "{method}" is --method
SPECS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "default": ({"method": "{method}"}, {}),
    "random": ({"method": "{method}"}, {"name": "random"}),
    "demo-tuned": ({"method": "ties", "granularity": 1, "weight_range": [0.0, 2.0], "search_density": False,
                    "parameters": {"density": 1.0, "normalize": False}}, {}),
    "ta-per-layer": ({"method": "task_arithmetic", "granularity": 1, "weight_range": [0.0, 2.0]}, {}),
    "ties-wide": ({"method": "ties", "granularity": 1, "weight_range": [-0.5, 3.0], "negative_weights": True,
                   "parameters": {"normalize": False}}, {"sigma0": 0.1}),
    "pycma-tuned": ({"method": "ties", "granularity": 1, "weight_range": [0.0, 2.0], "search_density": False,
                     "parameters": {"density": 1.0, "normalize": False}}, {"name": "cma"}),
}
STACKING = ("stacking", "ps-dfs")


def variant_facts(name: str) -> dict[str, Any]:
    """The zoo variant's models, target and task folder (its registry's declaration)."""
    from workers.zoo.variants import get_variant

    v = get_variant(name)
    return {"name": v.name, "models": list(v.models), "target": v.target_task, "heldout": v.heldout_task,
            "task_dir": f"evomerge:{v.task_folder}", "stack": list(v.stack) or list(v.models[1:])}


def study_spec(facts: dict[str, Any], folder: str, space: dict[str, Any], optimizer: dict[str, Any],
               trials: int, seed: int) -> dict[str, Any]:
    """A study over the variant's experts (every model but the base)."""
    base, *experts = facts["models"]
    return {
        "name": f"{facts['name']}: search quality",
        "sources": [f"{folder}/{m}" for m in experts],
        "base_model": f"{folder}/{base}",
        "space": copy.deepcopy(space),
        "evaluation": {"evaluator": "lm_eval",
                       "objectives": [{"task": facts["target"], "metric": "exact_match", "limit": 200}],
                       "options": {"task_dirs": [facts["task_dir"]]}},
        "heldout": {"top_k": 3, "tasks": {facts["target"]: facts["heldout"]}},
        "optimizer": {"seed": seed, **optimizer},
        "budget": {"max_trials": trials},
        "parallelism": 2,
        "seed": seed,
    }


def named_spec(name: str, method: str, custom: tuple[dict[str, Any], dict[str, Any]] | None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    space, optimizer = custom if name == "custom" and custom else SPECS[name]
    space = {"kind": "parameter", **{k: (method if v == "{method}" else v) for k, v in space.items()}}
    return space, dict(optimizer)


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


def run_variant(args: argparse.Namespace, name: str, custom: Any) -> dict[str, Any]:
    from service.settings import get_settings
    from workers.zoo.build import build_zoo

    facts = variant_facts(name)
    zoo = build_zoo(None, seed=0, variant=name, log=None)
    settings = get_settings(model_roots=[str(zoo.root.parent)], data_dir=Path("/tmp/evomerge-bench"))
    runners: dict[str, Any] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    print(f"\n## {name}: {zoo.root}, target {facts['target']}, {args.trials} trials, seeds {args.seeds}",
          flush=True)
    for spec_name in args.specs:
        for seed in args.seeds:
            if spec_name in STACKING:
                space = {"kind": "stacking", "repeats": args.repeats, "encoding": args.encoding,
                         "scales": {"search": not args.fixed_scales}}
                optimizer = {}
            else:
                space, optimizer = named_spec(spec_name, args.method, custom)
            spec = study_spec(facts, zoo.root.name, space, optimizer, args.trials, seed)
            if spec_name in STACKING:  # the variant's stack, in slot order, grown from its last model
                spec["sources"] = [f"{zoo.root.name}/{m}" for m in facts["stack"]]
                spec["base_model"] = spec["sources"][-1]
            r = Study(spec, settings, runners).run(args.trials)
            results.setdefault(spec_name, []).append(r)
            print(f"  {spec_name:13s} seed {seed}: held-out {r['heldout']:.3f}  search {r['search']:.3f}  "
                  f"(trial {r['trial']}, 90 % after {r['reach90']})  {r['seconds']:.0f} s", flush=True)
    print(f"\n{name}: held-out target score of the evolved merge (mean (min–max) over seeds):")
    print(f"{'spec':13s}  {'held-out':22s}  {'search':22s}  trials to 90 %")
    for spec_name, rs in results.items():
        held, search = spread([r["heldout"] for r in rs]), spread([r["search"] for r in rs])
        print(f"{spec_name:13s}  {held:22s}  {search:22s}  {spread([float(r['reach90']) for r in rs])}")
    space, optimizer = named_spec("default", args.method, None)
    refs = baselines(Study(study_spec(facts, zoo.root.name, space, optimizer, 1, 0), settings, runners))
    print("references (search / held-out):")
    for ref, srch, held in refs:
        print(f"  {ref:40s} {srch:.3f} / {held:.3f}")
    return {"results": results, "baselines": [{"name": n, "search": a, "heldout": b} for n, a, b in refs]}


def main(argv: list[str] | None = None) -> int:
    import torch

    from workers.zoo.variants import VARIANTS

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--specs", nargs="+", default=["default", "demo-tuned", "ties-wide", "random"],
                        choices=[*SPECS, *STACKING, "custom"])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--method", default="ties", help="the method the default and random specs name")
    parser.add_argument("--space", type=json.loads, default=None,
                        help="the custom spec's space fields (JSON)")
    parser.add_argument("--optimizer", type=json.loads, default={},
                        help="the custom spec's optimizer (JSON)")
    parser.add_argument("--repeats", type=int, default=2, help="the stacking spec's repeats")
    parser.add_argument("--encoding", default="segments", help="the stacking spec's encoding")
    parser.add_argument("--fixed-scales", action="store_true", help="the stacking spec searches no scales")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    custom = (args.space, args.optimizer) if args.space is not None else None
    if "custom" in args.specs and custom is None:
        parser.error("the custom spec needs --space")
    out = {name: run_variant(args, name, custom) for name in args.variants}
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "variants": out},
                                        indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
