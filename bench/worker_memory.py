"""A CPU worker's memory and speed per memory tier (issue 14), on three 1.1B bf16 models.

For each method (task_arithmetic, ties, dare_ties, and a layer-stacking recipe) and each
tier of ``workers.candidate.CandidateBuilder`` (``resident``, ``streamed``, ``mapped``),
one subprocess (so its peaks are its own) does what a worker does: constructs the
builder and builds a first candidate (the set-up), then builds ``--candidates`` more with
different per-layer coefficients (the search's inner loop). The child measures

- peak **RssAnon** (anonymous resident memory: what the worker itself allocated, not the
  page cache of mapped files), sampled from ``/proc/self/status`` every 5 ms by a
  background thread, and VmHWM (peak RSS, file pages included), each also divided by
  one model's size on disk;
- seconds per candidate (median of the builds after the set-up) and set-up seconds.

The parent measures this machine's copy bandwidth (``Tensor.copy_`` of a 1 GiB buffer,
best of 5 (bench/materialize.py), bytes read + written per second) and gives each candidate its roofline: the
bytes it must move — every source read once in its stored dtype, the candidate written
once — over that bandwidth. It prints a markdown table and checks the issue's goals:

- resident: peak RssAnon <= the sources' size + 1.5 x one model;
- streamed, mapped: peak RssAnon <= 1.5 x one model (a CPU worker's streamed tier keeps
  its sources in host memory by design — its "device" — so over the limit it is N/A, not
  FAIL: the goal is about device memory, which bench/gpu_worker.py measures);
- ties s/candidate <= 2 x task_arithmetic s/candidate (same tier);
- task_arithmetic s/candidate <= 2 x its roofline.

On a CPU worker ``streamed`` has no separate device memory (its "device" is host
memory): it is run and labelled as such. Dropping the page cache needs root; instead each
run reports how much of the model files was in the page cache when it started (mincore),
and ``--cold`` evicts them first with ``posix_fadvise(DONTNEED)`` (no root needed).

Before issue 14 ("today", as the issue quotes it) a worker's builder held every source,
every task vector and the candidate in float32: peak 5.3 x the sources' size for
task_arithmetic and 8.3 x for ties. ``--baseline REF`` re-runs that old builder from git
revision REF (default: the last commit before the rewrite) in its own subprocess, under
the same memory guard (on the 1.1B bf16 models it would hold ~26 GB — float32 sources
13.2, task vectors 8.8, candidate 4.4 — more than a 24 GB machine: the guard stops it).

    .venv/bin/python bench/worker_memory.py [--candidates 4] [--methods ties,task_arithmetic]
        [--tiers resident,streamed,mapped] [--root DIR] [--threads 2] [--json out.json]
        [--cold] [--baseline [REF]] [--shape tiny_llama] [--dry-run]

``--dry-run`` runs the whole flow on tiny models in seconds (and, while the builder
does not take ``tier`` yet, with the old builder, the tier ignored and labelled so).
"""

from __future__ import annotations

import argparse
import ctypes
import inspect
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# a --baseline child imports the old tree's packages, not this checkout's
sys.path.insert(0, os.environ.get("EVOMERGE_BENCH_TREE", str(REPO)))
sys.path.insert(1, str(HERE))

METHODS = ("task_arithmetic", "ties", "dare_ties", "stacking")
TIERS = ("resident", "streamed", "mapped")
BASELINE_REF = "0ed7a8e"  # the last commit before issue 14's CandidateBuilder rewrite
GB = 1e9


# ---- memory sampling (in the child) -------------------------------------------------
def proc_status() -> dict[str, int]:
    """``/proc/self/status``'s memory lines, in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("Rss", "Vm")):
                key, value = line.split(":", 1)
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    out[key] = int(parts[0]) * 1024
    return out


class AnonSampler(threading.Thread):
    """Samples RssAnon every ``interval`` seconds and keeps the peak; stops the process
    (exit 3) if it passes ``guard`` bytes, before the machine runs out of memory."""

    def __init__(self, interval: float = 0.005, guard: int | None = None):
        super().__init__(daemon=True)
        self.interval = interval
        self.guard = guard
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def current(self) -> int:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
        return 0

    def run(self) -> None:
        while not self._halt.is_set():
            anon = self.current()
            self.peak = max(self.peak, anon)
            self.samples += 1
            if self.guard and anon > self.guard:
                print(f"memory guard: RssAnon {anon / GB:.2f} GB > {self.guard / GB:.2f} GB; "
                      "stopped before the machine runs out of memory", file=sys.stderr, flush=True)
                os._exit(3)
            self._halt.wait(self.interval)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        self.peak = max(self.peak, self.current())
        return self.peak


# ---- recipes ---------------------------------------------------------------------------
def ramp(lo: float, hi: float, shift: float, layers: int) -> list[float]:
    """Per-layer values from ``lo`` to ``hi``, rotated by ``shift`` (differs per candidate)."""
    return [round(lo + (hi - lo) * ((j + shift) % layers) / layers, 4) for j in range(layers)]


def recipe_dict(method: str, base: Path, experts: list[Path], i: int, layers: int) -> dict[str, Any]:
    """Candidate ``i`` of ``method``: bench/materialize.py's per-layer ramps (weights, and
    densities for the trimming methods), sources kept in their own dtype; for
    ``stacking``, base and expert layer blocks interleaved, the experts' scaled."""
    if method == "stacking":
        block, step, slices, k = 4, 3, [], 0
        models = [base, *experts]
        for start in range(0, layers - block + 1, step):
            src: dict[str, Any] = {"model": str(models[k % len(models)]),
                                   "layer_range": [start, start + block]}
            if k % len(models):  # an expert's block: its residual contribution scaled
                src["scale"] = round(0.6 + 0.1 * ((i + k) % 7), 2)
            slices.append({"sources": [src]})
            k += 1
        return {"merge_method": "passthrough", "base_model": str(base), "slices": slices}
    entries = []
    for k, e in enumerate(experts):
        params: dict[str, Any] = {"weight": ramp(0.3, 1.2, i + k, layers)}
        if method in ("ties", "breadcrumbs", "dare_ties"):
            params["density"] = ramp(0.2, 0.9, i + 2 * k, layers)
        entries.append({"model": str(e), "parameters": params})
    return {"merge_method": method, "base_model": str(base), "models": entries, "seed": i}


LAYER = re.compile(r"\.layers\.(\d+)\.")


def bytes_moved(method: str, base: Path, experts: list[Path], layers: int) -> int:
    """What one candidate must move at least: every source it reads, once, in its stored
    dtype, plus the candidate written once (in the sources' dtype)."""
    from workers.model_io import LazyModel

    models = [base, *experts]
    infos = {str(m): LazyModel(str(m)).tensors for m in models}
    if method != "stacking":
        read = sum(i.nbytes for t in infos.values() for i in t.values())
        write = sum(i.nbytes for i in infos[str(base)].values())
        return read + write
    recipe = recipe_dict(method, base, experts, 0, layers)
    read_layers: set[tuple[str, int]] = set()
    depth = 0
    for sl in recipe["slices"]:
        src = sl["sources"][0]
        lo, hi = src["layer_range"]
        read_layers.update((src["model"], j) for j in range(lo, hi))
        depth += hi - lo
    per_layer = {}
    other = 0
    for name, info in infos[str(base)].items():
        m = LAYER.search(name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + info.nbytes
        else:
            other += info.nbytes
    layer_bytes = max(per_layer.values())
    return (other + len(read_layers) * layer_bytes) + (other + depth * layer_bytes)


# ---- one run (the child) ---------------------------------------------------------------
def run_pair(tier: str, rounds: int, base: Path, experts: list[Path], layers: int,
             threads: int) -> dict[str, Any]:
    """task_arithmetic and ties side by side in one process: both builders set up, then
    ``rounds`` rounds of one candidate each, alternating which goes first, so both see the
    same machine (this one is shared and its speed drifts between runs)."""
    import torch
    from transformers.utils import logging as hf_logging

    from search_spaces.recipe import Recipe
    from workers.candidate import CandidateBuilder

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    pair = ("task_arithmetic", "ties")
    recipes = {m: [Recipe.from_dict(recipe_dict(m, base, experts, i, layers)) for i in range(rounds + 1)]
               for m in pair}
    builders = {m: CandidateBuilder([str(e) for e in experts], base=str(base), device="cpu", tier=tier)
                for m in pair}
    for m in pair:
        builders[m].build(recipes[m][0])
    times: dict[str, list[float]] = {m: [] for m in pair}
    for i in range(1, rounds + 1):
        for m in (pair if i % 2 else pair[::-1]):
            t = time.perf_counter()
            builders[m].build(recipes[m][i])
            times[m].append(time.perf_counter() - t)
    return {"tier": tier, "times": times}


def builder_takes_tier() -> bool:
    from workers.candidate import CandidateBuilder

    return "tier" in inspect.signature(CandidateBuilder.__init__).parameters


def run_child(method: str, tier: str, n: int, base: Path, experts: list[Path], layers: int,
              threads: int, guard: int | None, old: bool) -> dict[str, Any]:
    """Set-up, then ``n`` candidates, measured in this process."""
    import torch
    from transformers.utils import logging as hf_logging

    from search_spaces.recipe import Recipe
    from workers.candidate import CandidateBuilder

    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)
    recipes = [Recipe.from_dict(recipe_dict(method, base, experts, i, layers)) for i in range(n + 1)]
    idle = proc_status()
    sampler = AnonSampler(guard=guard)
    sampler.start()
    start = time.perf_counter()
    if old:  # the pre-issue-14 builder: float32 sources, task vectors (and sorted magnitudes)
        builder = CandidateBuilder([str(e) for e in experts], base=str(base))
        if method in ("ties", "breadcrumbs") and hasattr(builder, "precompute_sorted"):
            builder.precompute_sorted()
    else:
        builder = CandidateBuilder([str(e) for e in experts], base=str(base), device="cpu", tier=tier)
    construct = time.perf_counter() - start
    model = builder.build(recipes[0])
    setup = time.perf_counter() - start
    after_setup = sampler.current()
    times: list[float] = []
    for r in recipes[1:]:
        t = time.perf_counter()
        model = builder.build(r)
        times.append(time.perf_counter() - t)
    peak = sampler.stop()
    status = proc_status()
    params = sum(p.numel() for p in model.parameters())
    return {
        "method": method, "tier": "old" if old else tier, "setup_s": setup,
        "construct_s": construct, "times": times, "peak_anon": peak,
        "anon_after_setup": after_setup, "anon_idle": idle.get("RssAnon", 0),
        "vm_hwm": status.get("VmHWM", 0), "samples": sampler.samples,
        "held": builder.memory_bytes(), "candidate_params": params,
        "candidate_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


# ---- the page cache ----------------------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def cached_fraction(files: list[Path]) -> float | None:
    """How much of ``files`` is in the page cache now (mincore on a fresh mapping, which
    faults nothing in); None where the kernel will not say."""
    page = mmap.PAGESIZE
    total = cached = 0
    for path in files:
        size = path.stat().st_size
        if not size:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                if _libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                    return None
                cached += sum(b & 1 for b in bytes(vec)) * page
                total += pages * page
            finally:
                _libc.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return cached / total if total else None


def evict(files: list[Path]) -> None:
    """Ask the kernel to drop ``files`` from the page cache (clean, unmapped pages go)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- the parent ----------------------------------------------------------------------------
def bandwidth(threads: int) -> float:
    """Copy bandwidth in bytes/s (read + written): bench/materialize.py's measure, on
    ``threads`` threads."""
    import torch
    from materialize import bandwidth_gb_s

    torch.set_num_threads(threads)
    return bandwidth_gb_s() * 1e9


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def busy_cpu_s() -> float:
    """CPU seconds all cores have been busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def code_state() -> str:
    """The measured code: HEAD, and the engine's files changed since (if any)."""
    def git(*a: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return proc.stdout.rstrip() if proc.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--", "workers", "search_spaces").splitlines()]
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def old_tree(ref: str) -> Path:
    """The repository at ``ref``, extracted to a temporary folder (for ``--baseline``)."""
    out = Path(tempfile.mkdtemp(prefix="evomerge-baseline-"))
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def launch(args: argparse.Namespace, method: str, tier: str, *, old: Path | None = None,
           old_api: bool = False) -> dict[str, Any]:
    """One child run; its JSON result, or an ``error``."""
    guard = int(args.guard_gb * GB) if args.guard_gb else int(0.85 * mem_available())
    cmd = [sys.executable, __file__, "--child", method, tier, "--candidates", str(args.candidates),
           "--threads", str(args.threads), "--root", str(args.root), "--shape", args.shape,
           "--guard", str(guard)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    if old is not None or old_api:
        cmd.append("--old")
    if old is not None:
        env["EVOMERGE_BENCH_TREE"] = str(old)
    start, busy, own = time.perf_counter(), busy_cpu_s(), own_cpu_s()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    # CPU time spent outside this bench while the run ran, in cores
    other = max(0.0, (busy_cpu_s() - busy) - (own_cpu_s() - own)) / wall
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout)[-2500:]
        return {"method": method, "tier": "old" if old else tier, "error": tail.strip(),
                "rc": proc.returncode, "wall_s": wall, "other_cores": other, "guard": guard}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["other_cores"] = other
    return result


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--candidates", type=int, default=4, help="candidates after the set-up")
    parser.add_argument("--root", help="the models' folder (default ~/.cache/evomerge/bench/<shape>-bf16)")
    parser.add_argument("--shape", default="llama_1b", help="a bench/big_models.py shape")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and OMP_NUM_THREADS)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--cold", action="store_true",
                        help="evict the model files from the page cache before each run")
    parser.add_argument("--baseline", nargs="?", const=BASELINE_REF, metavar="REF",
                        help=f"also run the old builder from git REF (default {BASELINE_REF})")
    parser.add_argument("--guard-gb", type=float,
                        help="stop a run whose RssAnon passes this (default 85%% of MemAvailable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny models, 2 candidates: check the plumbing in seconds")
    parser.add_argument("--pair-rounds", type=int, default=5,
                        help="rounds of task_arithmetic and ties side by side in one process, "
                             "mapped tier (0: none); the TIES goal reads this ratio")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "TIER"), help=argparse.SUPPRESS)
    parser.add_argument("--child-pair", metavar="TIER", help=argparse.SUPPRESS)
    parser.add_argument("--guard", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--old", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import big_models

    if args.dry_run:
        args.shape = "tiny_llama" if args.shape == "llama_1b" else args.shape
        args.candidates = min(args.candidates, 2)
    if args.shape not in big_models.SHAPES:
        raise SystemExit(f"unknown shape {args.shape}: one of {sorted(big_models.SHAPES)}")
    args.root = Path(args.root) if args.root else big_models.default_root(args.shape)
    layers = big_models.SHAPES[args.shape].layers

    if args.child_pair:
        base, experts = big_models.build(big_models.SHAPES[args.shape], args.root, quiet=True)
        print(json.dumps(run_pair(args.child_pair, args.pair_rounds, base, experts, layers, args.threads)))
        return
    if args.child:
        base, experts = big_models.build(big_models.SHAPES[args.shape], args.root, quiet=True)
        method, tier = args.child
        result = run_child(method, tier, args.candidates, base, experts, layers, args.threads,
                           args.guard, args.old)
        print(json.dumps(result))
        return

    print(f"models: {args.shape} under {args.root}", flush=True)
    base, experts = big_models.build(big_models.SHAPES[args.shape], args.root)
    model_bytes = big_models.model_bytes(base)
    sources = model_bytes + sum(big_models.model_bytes(e) for e in experts)
    files = [f for m in (base, *experts) for f in sorted(m.glob("*.safetensors"))]
    methods = [m for m in args.methods.split(",") if m]
    tiers = [t for t in args.tiers.split(",") if t]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m}: one of {METHODS}")
    for t in tiers:
        if t not in TIERS:
            raise SystemExit(f"unknown tier {t}: one of {TIERS}")
    new_api = builder_takes_tier()
    old_api = False
    if not new_api:
        if not args.dry_run:
            raise SystemExit("workers.candidate.CandidateBuilder does not take tier= yet (issue 14's "
                             "rewrite has not landed): run with --dry-run to check the plumbing")
        old_api = True
        print("DRY RUN with the current builder, which has no tiers: every 'tier' below is the "
              "same old builder", flush=True)

    import torch

    bw = bandwidth(args.threads)
    code = code_state()
    print(f"code: {code}", flush=True)
    print(f"3 models of {model_bytes / GB:.2f} GB (bf16) = {sources / GB:.2f} GB of sources; "
          f"copy bandwidth {bw / GB:.1f} GB/s (read + write, {args.threads} threads); "
          f"torch {torch.__version__}; {args.candidates} candidates after the set-up; "
          f"page cache {'evicted before each run' if args.cold else 'left warm'}", flush=True)

    plan: list[tuple[str, str, Path | None]] = [(m, t, None) for m in methods for t in tiers]
    tree = None
    if args.baseline:
        tree = old_tree(args.baseline)
        plan += [(m, "old", tree) for m in methods if m != "stacking"]
    rows: list[dict[str, Any]] = []
    for method, tier, old in plan:
        if args.cold:
            evict(files)
        warm = cached_fraction(files)
        print(f"- {method} / {tier}: page cache holds {fmt(warm and 100 * warm, '.0f')}% of the "
              "sources' files ...", end=" ", flush=True)
        r = launch(args, method, tier if old is None else "resident", old=old, old_api=old_api)
        r["tier"] = "old" if old is not None else tier
        r["page_cache_at_start"] = warm
        r["roofline_bytes"] = bytes_moved(method, base, experts, layers)
        r["roofline_s"] = r["roofline_bytes"] / bw
        if "error" in r:
            print(f"FAILED (rc {r['rc']}):\n{r['error']}", flush=True)
        else:
            times = r["times"]
            r["s_per_candidate"] = statistics.median(times) if times else None
            print(f"{fmt(r['s_per_candidate'], '.2f')} s/candidate, peak RssAnon "
                  f"{r['peak_anon'] / GB:.2f} GB ({r['wall_s']:.0f} s; other work on the machine: "
                  f"{r['other_cores']:.1f} cores)", flush=True)
        rows.append(r)

    print()
    print(f"One model: {model_bytes / GB:.2f} GB on disk; sources {sources / GB:.2f} GB; "
          f"copy bandwidth {bw / GB:.1f} GB/s.")
    print("`streamed` on a CPU worker: no separate device memory (its device is host memory).")
    print()
    print("| method | tier | s/candidate | best s | set-up s | peak RssAnon GB | ÷ one model | VmHWM GB "
          "| × roofline | page cache at start | other load (cores) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        tier = r["tier"] + (" (CPU: no device)" if r["tier"] == "streamed" else "")
        if "error" in r:
            why = f"rc {r['rc']}"
            if "memory guard" in r["error"]:
                why = f"stopped by the memory guard: RssAnon > {r['guard'] / GB:.1f} GB"
            print(f"| {r['method']} | {tier} | failed ({why}) | | | | | | | | {r['other_cores']:.1f} |")
            continue
        s = r["s_per_candidate"]
        roof = s / r["roofline_s"] if s else None
        r["x_roofline"] = roof
        warm = r["page_cache_at_start"]
        best = min(r["times"]) if r["times"] else None
        print(f"| {r['method']} | {tier} | {fmt(s, '.2f')} | {fmt(best, '.2f')} | {r['setup_s']:.1f} | "
              f"{r['peak_anon'] / GB:.2f} | {r['peak_anon'] / model_bytes:.2f} | "
              f"{r['vm_hwm'] / GB:.2f} | {fmt(roof, '.1f')} | {fmt(warm and 100 * warm, '.0f')}% | "
              f"{r['other_cores']:.1f} |")
    idle = [r["anon_idle"] for r in rows if "anon_idle" in r]
    if idle:
        print(f"\n(peaks include the interpreter, torch and transformers: RssAnon "
              f"{min(idle) / GB:.2f} GB before the builder.)")
    for r in rows:
        if "held" in r:
            held = {k: round(v / GB, 2) for k, v in r["held"].items() if v}
            print(f"  held by the builder, {r['method']}/{r['tier']} (GB): {held}")

    pair = None
    if args.pair_rounds > 0 and new_api and {"task_arithmetic", "ties"} <= set(methods):
        pair = launch_pair(args)
        if "error" in pair:
            print(f"\ntask_arithmetic and ties side by side: FAILED\n{pair['error']}")
        else:
            med = {m: statistics.median(t) for m, t in pair["times"].items()}
            pair["s_per_candidate"] = med
            each = ", ".join(f"{m} {med[m]:.2f} s (" + " ".join(f"{x:.2f}" for x in t) + ")"
                             for m, t in pair["times"].items())
            print(f"\ntask_arithmetic and ties side by side ({pair['tier']}, {args.pair_rounds} rounds, "
                  f"alternating): {each}; ratio {med['ties'] / med['task_arithmetic']:.2f}")
    goals = check_goals(rows, model_bytes, sources, pair)
    print()
    for g in goals:
        verdict = "N/A " if g["ok"] is None else "PASS" if g["ok"] else "FAIL"
        print(f"{verdict}  {g['goal']}: {g['detail']}")
    if any(r.get("tier") == "mapped" and (r.get("page_cache_at_start") or 0) > 0.5 for r in rows):
        print("note: the mapped tier ran with a warm page cache (the files were read by earlier "
              "runs; dropping the cache needs root — use --cold to evict them without it)")
    busy = [r for r in rows if r["other_cores"] > 0.25]
    if busy:
        print(f"note: {len(busy)} of {len(rows)} runs shared the {os.cpu_count()} cores with other work "
              f"(up to {max(r['other_cores'] for r in busy):.1f} cores busy outside this bench): their "
              "timings are upper bounds")
    if model_bytes < 0.1 * GB:
        print(f"note: {args.shape} models ({model_bytes / 1e6:.1f} MB): the goals mean nothing at "
              "this size (the interpreter alone is hundreds of models)")
    if old_api:
        print("note: DRY RUN — the builder has no tiers yet, these goals say nothing about issue 14")
    if args.json:
        out = {"shape": args.shape, "model_bytes": model_bytes, "sources_bytes": sources,
               "bandwidth_bytes_s": bw, "threads": args.threads, "candidates": args.candidates,
               "cold": args.cold, "dry_run": old_api, "code": code, "rows": rows, "goals": goals,
               "pair": pair}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
        print(f"\nwritten: {args.json}")
    if tree is not None:
        import shutil

        shutil.rmtree(tree, ignore_errors=True)


def launch_pair(args: argparse.Namespace, tier: str = "mapped") -> dict[str, Any]:
    """The side-by-side run (``run_pair``) in its own process."""
    cmd = [sys.executable, __file__, "--child-pair", tier, "--pair-rounds", str(args.pair_rounds),
           "--threads", str(args.threads), "--root", str(args.root), "--shape", args.shape]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"tier": tier, "error": (proc.stderr or proc.stdout)[-2500:].strip()}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_goals(rows: list[dict[str, Any]], model_bytes: int, sources: int,
                pair: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The issue's goals, one entry per (goal, tier or method) that has measurements; the
    TIES goal from the side-by-side run where there is one (separate runs drift apart)."""
    ok_rows = {(r["method"], r["tier"]): r for r in rows if "error" not in r}
    goals: list[dict[str, Any]] = []
    for (method, tier), r in ok_rows.items():
        if tier == "resident":
            limit = sources + 1.5 * model_bytes
            goals.append({"goal": f"resident peak <= sources + 1.5 x one model ({method})",
                          "ok": r["peak_anon"] <= limit,
                          "detail": f"{r['peak_anon'] / GB:.2f} GB vs {limit / GB:.2f} GB"})
        elif tier in ("streamed", "mapped"):
            limit = 1.5 * model_bytes
            detail = (f"{r['peak_anon'] / GB:.2f} GB vs {limit / GB:.2f} GB "
                      f"({r['peak_anon'] / model_bytes:.2f}x)")
            ok: bool | None = r["peak_anon"] <= limit
            if tier == "streamed" and not ok:
                # a CPU worker's "device" is host memory: streamed keeps the sources there by
                # design; its goal is about device memory (bench/gpu_worker.py measures it)
                ok = None
                detail += "; on a CPU worker the streamed tier's sources are host memory by design"
            goals.append({"goal": f"{tier} peak RssAnon <= 1.5 x one model ({method})",
                          "ok": ok, "detail": detail})
    for tier in (*TIERS, "old"):
        ta, ties = ok_rows.get(("task_arithmetic", tier)), ok_rows.get(("ties", tier))
        if pair is None and ta and ties and ta["s_per_candidate"] and ties["s_per_candidate"]:
            ratio = ties["s_per_candidate"] / ta["s_per_candidate"]
            goals.append({"goal": f"ties <= 2 x task_arithmetic s/candidate ({tier})", "ok": ratio <= 2,
                          "detail": f"{ties['s_per_candidate']:.2f} s vs {ta['s_per_candidate']:.2f} s "
                                    f"({ratio:.2f}x)"})
        if ta and ta["s_per_candidate"]:
            x = ta["s_per_candidate"] / ta["roofline_s"]
            goals.append({"goal": f"task_arithmetic <= 2 x its roofline ({tier})", "ok": x <= 2,
                          "detail": f"{ta['s_per_candidate']:.2f} s vs roofline {ta['roofline_s']:.2f} s "
                                    f"({x:.1f}x)"})
    if pair is not None and "s_per_candidate" in pair:
        med = pair["s_per_candidate"]
        ratio = med["ties"] / med["task_arithmetic"]
        goals.append({"goal": f"ties <= 2 x task_arithmetic s/candidate (side by side, {pair['tier']})",
                      "ok": ratio <= 2, "detail": f"{med['ties']:.2f} s vs {med['task_arithmetic']:.2f} s "
                                                  f"({ratio:.2f}x)"})
    return goals


if __name__ == "__main__":
    main()
