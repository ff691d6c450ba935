"""Merge speed and memory: `evomerge merge` against `mergekit-yaml` on the same recipe.

Builds three Llama-shaped models of random weights (a base and two "experts", each
>= 500 MB), then merges them with ties and task_arithmetic through both command-line
tools, alternating runs, and prints seconds, GB/s of weights read, and peak RSS (each
run is its own process, measured by the kernel via wait4), with the ratios.

    .venv/bin/python bench/merge.py [--out bench/out/merge] [--runs 3] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))


def recipe(method: str, base: Path, experts: list[Path], dtype: str) -> dict:
    per_model = [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    if method == "task_arithmetic":
        per_model = [{"weight": 0.6}, {"weight": 0.5}]
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": p} for e, p in zip(experts, per_model)],
        "dtype": dtype,
    }


def timed(cmd: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (GB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"{cmd[0]} failed: {proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1e6  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out" / "merge"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--methods", default="ties,task_arithmetic")
    args = parser.parse_args()

    root = Path(args.out)
    dtype = getattr(torch, args.dtype)
    from bench_models import build_models

    base, experts = build_models(root / "models", dtype)
    read_bytes = sum((p / "model.safetensors").stat().st_size for p in (base, *experts))
    for p in (base, *experts):  # warm the page cache so both tools start equal
        with open(p / "model.safetensors", "rb") as fh:
            while fh.read(1 << 24):
                pass
    has_mergekit = (BIN / "mergekit-yaml").exists()
    print(f"models: 3 x {read_bytes / 3 / 1e6:.0f} MB ({args.dtype}), runs: {args.runs}, "
          f"threads: torch default on {os.cpu_count()} cores")
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for method in args.methods.split(","):
        path = root / f"{method}.yaml"
        path.write_text(json.dumps(recipe(method, base, experts, args.dtype)))
        commands = {"evomerge": [str(BIN / "evomerge"), "merge", str(path), str(root / "o-evo"), "-q"]}
        if has_mergekit:
            commands["mergekit"] = [str(BIN / "mergekit-yaml"), str(path), str(root / "o-mk"),
                                    "--quiet", "--lazy-unpickle"]
        res = results.setdefault(method, {k: [] for k in commands})
        for _ in range(args.runs):
            for tool, cmd in commands.items():
                res[tool].append(timed(cmd))
        if has_mergekit:
            from safetensors.torch import load_file

            a = load_file(str(root / "o-evo" / "model.safetensors"))
            b = load_file(str(root / "o-mk" / "model.safetensors"))
            worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            differ = sum(int((a[k] != b[k]).sum()) for k in a)
            total = sum(a[k].numel() for k in a)
            print(f"{method}: max |evomerge - mergekit| = {worst:.2e}; "
                  f"{differ} of {total} entries differ")
            if differ:
                print("  (TIES trims at a magnitude threshold; entries tied at exactly that "
                      "magnitude are kept in an arbitrary order by both tools)")

    print()
    print(f"{'method':16s} {'tool':9s} {'seconds':>8s} {'GB/s read':>10s} {'peak RSS GB':>12s}")
    for method, res in results.items():
        med = {t: (statistics.median(w for w, _ in r), max(m for _, m in r)) for t, r in res.items()}
        for tool, (wall, rss) in med.items():
            print(f"{method:16s} {tool:9s} {wall:8.2f} {read_bytes / wall / 1e9:10.2f} {rss:12.2f}")
        if "mergekit" in med:
            speed = med["mergekit"][0] / med["evomerge"][0]
            mem = med["evomerge"][1] / med["mergekit"][1]
            print(f"{method:16s} ratio     evomerge {speed:.2f}x faster, peak RSS {mem:.2f}x of mergekit's")


if __name__ == "__main__":
    main()
