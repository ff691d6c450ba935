"""Where a candidate's seconds go: the fused merge kernel against everything else.

Builds task_arithmetic and ties candidates on the 1.1B bf16 models of
``bench/big_models.py`` (mapped tier, 2 threads, kernels compiled) and, for one
candidate of each under cProfile, prints the seconds spent inside the compiled kernels
and the rest (planning, thresholds, page-cache hints, Python). It shows why TIES costs
more than task_arithmetic per candidate on a small CPU: its kernel is compute-bound.

    .venv/bin/python bench/kernel_share.py [--root DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))


def kernel_seconds(stats: pstats.Stats) -> float:
    """Seconds inside compiled inductor kernels (their functions are named ``kernel``)."""
    return sum(tt for (_, _, name), (_, _, tt, _, _) in stats.stats.items()  # type: ignore[attr-defined]
               if name.startswith("<built-in method") and name.endswith(".kernel.kernel>"))


def main() -> None:
    import torch
    from worker_memory import recipe_dict

    from search_spaces.recipe import Recipe
    from workers import kernels
    from workers.candidate import CandidateBuilder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache/evomerge/bench/llama-1b-bf16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=22)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_compiling(True)
    base, experts = args.root / "base", [args.root / "expert0", args.root / "expert1"]
    print("| method | s / candidate | in the kernel | the rest |\n|---|---:|---:|---:|")
    for method in ("task_arithmetic", "ties"):
        recipes = [Recipe.from_dict(recipe_dict(method, base, experts, i, args.layers)) for i in range(3)]
        builder = CandidateBuilder([str(e) for e in experts], base=str(base), device="cpu", tier="mapped")
        builder.build(recipes[0])  # set-up: compiles, builds the histograms
        builder.build(recipes[1])
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        builder.build(recipes[2])
        profile.disable()
        total = time.perf_counter() - start
        inside = kernel_seconds(pstats.Stats(profile))
        print(f"| {method} | {total:.2f} | {inside:.2f} | {total - inside:.2f} |", flush=True)
        del builder


if __name__ == "__main__":
    main()
