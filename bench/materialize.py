"""Seconds per candidate: evomerge's in-memory builder vs merge-to-disk-and-reload vs
mergekit's in-memory path, on three Llama-shaped models of >= 500 MB each.

For each method, each way of materializing a candidate runs in its own process (so its
peak RSS is its own): set-up once, then several candidates with different per-layer
coefficients (the search's inner loop); the median seconds per candidate is reported.
The roofline is the bytes a candidate must move — read the base and every task vector,
write the candidate — divided by this machine's measured memory bandwidth.

    .venv/bin/python bench/materialize.py [--candidates 4] [--methods ties,task_arithmetic]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def recipe_for(method: str, base: Path, experts: list[Path], i: int, layers: int) -> dict:
    """Candidate ``i``: per-layer weights (and densities) that differ between candidates."""
    def ramp(lo: float, hi: float, shift: float) -> list[float]:
        return [round(lo + (hi - lo) * ((j + shift) % layers) / layers, 4) for j in range(layers)]

    models = []
    for k, e in enumerate(experts):
        params = {"weight": ramp(0.3, 1.2, i + k)}
        if method in ("ties", "breadcrumbs", "dare_ties"):
            params["density"] = ramp(0.2, 0.9, i + 2 * k)
        models.append({"model": str(e), "parameters": params})
    return {"merge_method": method, "base_model": str(base), "models": models, "dtype": "float32"}


def run_variant(variant: str, method: str, n: int, root: Path) -> dict:
    from bench_models import paths

    from search_spaces.recipe import Recipe

    base, experts = paths(root)
    layers = 8
    recipes = [Recipe.from_dict(recipe_for(method, base, experts, i, layers)) for i in range(n)]
    times: list[float] = []
    start = time.perf_counter()
    if variant == "builder":
        from workers.candidate import CandidateBuilder

        builder = CandidateBuilder([str(e) for e in experts], base=str(base))
        builder.build(recipes[0])  # the resident model, histograms, compiled kernels
        setup = time.perf_counter() - start
        for r in recipes:
            t = time.perf_counter()
            builder.build(r)
            times.append(time.perf_counter() - t)
        extra = {k: round(v / 1e9, 2) for k, v in builder.memory_bytes().items()}
    elif variant == "disk":
        from transformers import AutoModelForCausalLM

        from workers.merge import merge

        setup = 0.0
        for r in recipes:
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                t = time.perf_counter()
                merge(r, Path(tmp) / "m")
                model = AutoModelForCausalLM.from_pretrained(str(Path(tmp) / "m"), dtype=torch.float32)
                times.append(time.perf_counter() - t)
                del model
    elif variant == "mergekit":
        from mergekit.architecture import get_architecture_info
        from mergekit.config import MergeConfiguration
        from mergekit.graph import Executor
        from mergekit.io.tasks import ReturnTensor
        from mergekit.merge import _model_out_config
        from mergekit.options import MergeOptions
        from mergekit.plan import MergePlanner
        from transformers import AutoModelForCausalLM

        options = MergeOptions()
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        params = dict(model.named_parameters())
        setup = time.perf_counter() - start
        for r in recipes:
            t = time.perf_counter()
            config = MergeConfiguration.model_validate(r.model_dump(mode="json", exclude={"seed"},
                                                                    exclude_none=True))
            arch = get_architecture_info(config, options)
            out_config = _model_out_config(config, arch)
            planner = MergePlanner(config, arch, options, out_config)
            try:
                tasks = planner.plan_in_memory()
            except TypeError:  # mergekit 0.1.5's validation of its own in-memory tasks fails
                planner._plan()
                tasks = [ReturnTensor.model_construct(weight_info=w, tensor_task=t,
                                                      dtype=w.force_dtype or config.out_dtype)
                         for w, t in planner._tensors]
            for task, value in Executor(tasks, math_device="cpu", storage_device="cpu").run(quiet=True):
                assert isinstance(task, ReturnTensor)
                params[task.weight_info.name].data.copy_(value)
            times.append(time.perf_counter() - t)
    else:
        raise SystemExit(f"unknown variant {variant}")
    import resource

    return {"variant": variant, "method": method, "setup_s": setup, "times": times,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "memory_gb": locals().get("extra", {})}


def bandwidth_gb_s() -> float:
    """Measured copy bandwidth (bytes read + written per second), best of 5."""
    src = torch.randn(256 * 1024 * 1024 // 4 * 4)  # 1 GiB of float32
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "out" / "merge"))
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--methods", default="ties,task_arithmetic")
    parser.add_argument("--variants", default="builder,disk,mergekit")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.out)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.method, args.candidates, root)))
        return

    from bench_models import paths

    base, experts = paths(root)
    model_bytes = (base / "model.safetensors").stat().st_size
    bw = bandwidth_gb_s()
    print(f"3 models of {model_bytes / 1e6:.0f} MB; memory bandwidth (copy) {bw:.1f} GB/s; "
          f"torch threads {torch.get_num_threads()}; {args.candidates} candidates each")
    rows = []
    for method in args.methods.split(","):
        for variant in args.variants.split(","):
            proc = subprocess.run(
                [sys.executable, __file__, "--variant", variant, "--method", method,
                 "--candidates", str(args.candidates), "--out", str(root)],
                capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
            )
            if proc.returncode != 0:
                print(f"{method}/{variant} failed:\n{proc.stderr[-3000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print()
    print(f"{'method':16s} {'variant':9s} {'s/candidate':>12s} {'set-up s':>9s} {'peak RSS GB':>12s}")
    per: dict[tuple[str, str], float] = {}
    for r in rows:
        med = statistics.median(r["times"][1:] or r["times"])  # the first may pay warm-up
        per[(r["method"], r["variant"])] = med
        print(f"{r['method']:16s} {r['variant']:9s} {med:12.3f} {r['setup_s']:9.1f} {r['peak_rss_gb']:12.2f}")
        if r.get("memory_gb"):
            print(f"{'':26s} held by the builder (GB): {r['memory_gb']}")
    print()
    for method in args.methods.split(","):
        need = (1 + len(experts) + 1) * model_bytes  # read base + task vectors, write candidate
        roof = need / (bw * 1e9)
        b = per.get((method, "builder"))
        if b is None:
            continue
        parts = [f"{method}: roofline {roof:.3f} s ({need / 1e9:.2f} GB moved); "
                 f"builder {b / roof:.1f}x roofline"]
        if (method, "disk") in per:
            parts.append(f"{per[(method, 'disk')] / b:.1f}x faster than disk")
        if (method, "mergekit") in per:
            parts.append(f"{per[(method, 'mergekit')] / b:.1f}x faster than mergekit in-memory")
        print("; ".join(parts))


if __name__ == "__main__":
    main()
