"""Can a merge solve a zoo variant's target? A global task-arithmetic grid.

Builds (or reuses) the zoo ``--variant`` and scores, on the target's search split with
the zoo's own exact match, every merge ``base + w_math * tv_math + w_lang * tv_lang``
(``tv = expert - base`` over all tensors; one weight per expert) for weights in
{0.5, 0.75, 1, 1.25, 1.5, 2}^2 — and, for a variant with a ``distractor``, each
``w_distractor`` in {-0.5, 0, 0.5} (plus ``+1`` at the best math/language weights, to
show the distractor hurts). Prints the sources' scores, one table per distractor
weight, the best cell (with its held-out score) and the score at (1, 1).

    .venv/bin/python bench/zoo_grid.py --variant subtract
    .venv/bin/python bench/zoo_grid.py --variant distractor --zoo /tmp/some-zoo-folder
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHTS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
DISTRACTOR_WEIGHTS = (-0.5, 0.0, 0.5)


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from workers.zoo.build import build_zoo, load
    from workers.zoo.score import exact_match
    from workers.zoo.variants import VARIANTS, get_variant

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="two-experts", choices=list(VARIANTS))
    parser.add_argument("--zoo", type=Path, default=None, help="a built zoo folder (default: build or reuse)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    variant = get_variant(args.variant)
    zoo = load(args.zoo) if args.zoo else build_zoo(seed=args.seed, variant=variant.name)
    if zoo is None or zoo.variant != variant.name:
        parser.error(f"{args.zoo} holds no built {variant.name} zoo")
    splits = variant.evaluation_splits()
    target, heldout = splits[variant.target], splits[variant.heldout]
    models = {n: AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
              for n, p in zoo.models.items()}
    base_name, *experts = variant.models
    base = {k: v.clone() for k, v in models[base_name].state_dict().items()}
    vectors = {e: {k: v - base[k] for k, v in models[e].state_dict().items()} for e in experts}
    work = models[base_name]

    def score(weights: dict[str, float], examples: list[Any]) -> float:
        merged = {k: base[k] + sum(w * vectors[e][k] for e, w in weights.items()) for k in base}
        work.load_state_dict(merged)
        return exact_match(work, examples, variant.tokens)

    print(f"zoo {variant.name} at {zoo.root} (built in {zoo.seconds:.0f} s on {zoo.machine.get('cpu', '?')})")
    print(f"sources on {variant.target_task} / {variant.heldout_task}:")
    for name in variant.models:
        print(f"  {name:11s} {zoo.scores[name][variant.target_task]:.3f} / "
              f"{zoo.scores[name][variant.heldout_task]:.3f}")
    print("experts on their own skills:")
    for name, skills in variant.skills.items():
        got = {s: zoo.scores[name].get(variant.task(s), zoo.checks.get(name, {}).get(s)) for s in skills}
        print(f"  {name:11s} " + ", ".join(f"{s} {v:.3f}" for s, v in got.items()))

    start = time.perf_counter()
    has_distractor = "distractor" in experts
    grid: dict[tuple[float, ...], float] = {}
    for wd in DISTRACTOR_WEIGHTS if has_distractor else (None,):
        print("\ntarget score, rows w_math, columns w_language"
              + (f", w_distractor {wd:+g}:" if wd is not None else ":"))
        print("w_math \\ w_lang" + "".join(f"{w:>7g}" for w in WEIGHTS))
        for wm in WEIGHTS:
            row = []
            for wl in WEIGHTS:
                weights = {"math": wm, "language": wl} | ({"distractor": wd} if wd is not None else {})
                grid[(wm, wl) + ((wd,) if wd is not None else ())] = s = score(weights, target)
                row.append(f"{s:7.3f}")
            print(f"{wm:>15g}" + "".join(row))
    best = max(grid, key=grid.__getitem__)
    named = dict(zip(("math", "language", "distractor"), best))
    print(f"\nbest: {grid[best]:.3f} at {named} (held-out {score(named, heldout):.3f})")
    one = (1.0, 1.0) + ((0.0,) if has_distractor else ())
    print(f"at w_math = w_language = 1: {grid[one]:.3f}")
    if has_distractor:
        at_zero = max((k for k in grid if k[2] == 0.0), key=grid.__getitem__)
        wm, wl = at_zero[:2]
        hurt = score({"math": wm, "language": wl, "distractor": 1.0}, target)
        print(f"the distractor at the best math/language weights without it ({wm:g}, {wl:g}): "
              f"w_distractor 0 -> {grid[at_zero]:.3f}, +1 -> {hurt:.3f}")
    print(f"({len(grid)} merges in {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
