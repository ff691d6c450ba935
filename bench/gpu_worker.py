"""A GPU worker's device memory and speed per memory tier, and its evaluation speed (issue 14).

One prepared script for a machine with one CUDA GPU (< 8 minutes with the models built
from scratch): it writes three Qwen2.5-7B-shaped random bf16 models (base + two experts,
15.2 GB each, ``bench/big_models.py``) when the disk has >= 50 GB free and the host
memory holds them, else three Qwen2.5-3B-shaped ones (6.2 GB each). Then, for each tier
of ``workers.candidate.CandidateBuilder`` (``resident`` when the sources and a candidate
fit the GPU, ``streamed``, ``mapped``), one builder on the GPU:

- set-up seconds: constructing the builder + the first candidate (task_arithmetic);
- per method (task_arithmetic, ties): a first build (warm-up), then ``--candidates``
  candidates with different per-layer coefficients; the median seconds per candidate,
  and the device peak (``torch.cuda.max_memory_allocated``, reset before each method);
- the evaluator's speed on the last candidate: greedy generation of ``--new-tokens``
  tokens for a batch of ``--batch`` prompts, with ``model.generate`` and with the
  project's fast decoder (``evaluators.runtime.fast_lm.FastHFLM._greedy``, driven
  directly), in tokens/s, and the device memory the evaluation adds (KV cache and
  activations) — EOS is switched off so every row generates every token.

It prints a markdown table and checks the issue's goal: the streamed tier fits a
3 x 7B study on one 80 GB GPU, with device peak <= 1.3 x one model plus the
evaluation's memory (measured here, and the KV cache computed from the shape is
printed beside it). On the 3B fallback the goal is checked on 3B models and says so.

    python bench/gpu_worker.py --out bench/out/gpu.json        # on the GPU machine
    .venv/bin/python bench/gpu_worker.py --device cpu --tiny   # the whole flow, tiny, on CPU

Options: ``--shape auto|qwen_7b|qwen_3b``, ``--root DIR`` (models; default
``~/.cache/evomerge/bench/<shape>-bf16``), ``--tiers``, ``--methods``, ``--candidates 3``,
``--batch 8``, ``--prompt-len 64``, ``--new-tokens 128``, ``--budget-s 450`` (later steps
are skipped, and say so, once the run passes this).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(1, str(HERE))

import torch  # noqa: E402

GB = 1e9
TIERS = ("resident", "streamed", "mapped")
METHODS = ("task_arithmetic", "ties")
GPU_80GB = 80e9  # the goal's card: what must fit on one 80 GB GPU


def mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def choose_shape(requested: str, tiny: bool, root: Path | None) -> tuple[str, str]:
    """The shape to bench, and why."""
    import big_models

    if tiny:
        return "tiny_qwen", "--tiny"
    if requested != "auto":
        return requested, "--shape"
    seven = big_models.SHAPES["qwen_7b"]
    where = Path(root) if root else big_models.default_root("qwen_7b")
    marker = where / big_models.MARKER
    if marker.exists() and json.loads(marker.read_text() or "{}").get("hidden") == seven.hidden:
        return "qwen_7b", f"already built under {where}"
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need_ram = 3 * seven.nbytes() + 24 * 2**30  # the three in host memory (streamed) + headroom
    if free >= 50 * GB and mem_total() >= need_ram:
        return "qwen_7b", f"{free / GB:.0f} GB free disk, {mem_total() / GB:.0f} GB host memory"
    return "qwen_3b", (f"7B needs >= 50 GB free disk and {need_ram / GB:.0f} GB host memory; "
                       f"have {free / GB:.0f} GB and {mem_total() / GB:.0f} GB")


class Device:
    """Peak-memory bookkeeping that is a no-op on CPU."""

    def __init__(self, name: str):
        self.dev = torch.device(name)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.dev)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.dev) if self.cuda else None

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.dev) if self.cuda else None

    def free(self) -> int | None:
        return torch.cuda.mem_get_info(self.dev)[0] if self.cuda else None

    def clear(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def kv_cache_bytes(config: Any, batch: int, tokens: int) -> int:
    """Keys and values of every layer for ``batch`` x ``tokens`` positions, in bf16."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * batch * tokens * config.num_key_value_heads * head_dim * 2


def generation_speed(model: torch.nn.Module, tokenizer_path: Path, dev: Device, batch: int,
                     prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """Greedy tokens/s with ``model.generate`` and with the fast decoder, and the device
    memory the evaluation adds on top of what is held."""
    from transformers import AutoTokenizer

    from evaluators.runtime.fast_lm import FastHFLM, _Batch

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(tokenizer), (batch, prompt_len), generator=g)
    gen = model.generation_config
    saved = (gen.eos_token_id, gen.pad_token_id)
    gen.eos_token_id, gen.pad_token_id = None, tokenizer.pad_token_id  # every row runs to the end
    out: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}
    try:
        held = dev.allocated()
        dev.reset_peak()
        dev_ids = ids.to(dev.dev)
        mask = torch.ones_like(dev_ids)
        with torch.inference_mode():
            model.generate(dev_ids, attention_mask=mask, max_new_tokens=4, do_sample=False)  # warm-up
            dev.sync()
            t = time.perf_counter()
            seq = model.generate(dev_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False)
            dev.sync()
            dt = time.perf_counter() - t
        produced = (seq.shape[1] - prompt_len) * batch
        out["generate_tok_s"] = produced / dt
        out["generate_s"] = dt

        lm = FastHFLM(model, tokenizer, batch_size=batch)
        if lm.fast_path_available():
            plan = _Batch(rows=list(range(batch)), input_ids=ids, attention_mask=None,
                          position_ids=torch.arange(prompt_len).expand(batch, -1).contiguous())
            lm._greedy(plan, 4, [])  # warm-up
            dev.sync()
            t = time.perf_counter()
            rows = lm._greedy(plan, new_tokens, [])
            dev.sync()
            dt = time.perf_counter() - t
            out["fast_tok_s"] = sum(len(r) for r in rows) / dt
            out["fast_s"] = dt
            out["fast_equals_generate"] = rows == seq[:, prompt_len:].tolist()
        else:
            out["fast_tok_s"] = None
            out["fast_note"] = "the fast decoder does not take this model (HFLM path instead)"
        peak = dev.peak()
        out["eval_extra_bytes"] = (peak - held) if peak is not None and held is not None else None
    finally:
        gen.eos_token_id, gen.pad_token_id = saved
    out["kv_cache_bytes"] = kv_cache_bytes(model.config, batch, prompt_len + new_tokens)
    return out


def run_tier(tier: str, args: argparse.Namespace, dev: Device, base: Path, experts: list[Path],
             layers: int, model_bytes: int, deadline: float) -> tuple[list[dict[str, Any]], dict | None]:
    """One builder of ``tier``: set-up, each method's candidates, then the evaluation speed."""
    from worker_memory import recipe_dict

    from search_spaces.recipe import Recipe
    from workers.candidate import CandidateBuilder

    rows: list[dict[str, Any]] = []
    methods = [m for m in args.methods.split(",") if m]
    dev.clear()
    dev.reset_peak()
    start = time.perf_counter()
    builder = CandidateBuilder([str(e) for e in experts], base=str(base), device=str(dev.dev), tier=tier)
    construct = time.perf_counter() - start
    first = Recipe.from_dict(recipe_dict(methods[0], base, experts, 0, layers))
    model = builder.build(first)
    dev.sync()
    setup = time.perf_counter() - start
    setup_peak = dev.peak()
    held = {k: v for k, v in builder.memory_bytes().items() if v}
    print(f"  {tier}: set-up {setup:.1f} s (constructing {construct:.1f} s), device peak "
          f"{fmt_gb(setup_peak)}; held {({k: round(v / GB, 2) for k, v in held.items()})}", flush=True)
    for mi, method in enumerate(methods):
        if time.perf_counter() > deadline:
            rows.append({"tier": tier, "method": method, "skipped": "past --budget-s"})
            continue
        dev.reset_peak()
        recipes = [Recipe.from_dict(recipe_dict(method, base, experts, i, layers))
                   for i in range(args.candidates + 1)]
        warm_s = None
        if mi > 0:  # the first method's first build was the set-up
            t = time.perf_counter()
            model = builder.build(recipes[0])
            warm_s = time.perf_counter() - t
        times = []
        for r in recipes[1:]:
            t = time.perf_counter()
            model = builder.build(r)
            dev.sync()
            times.append(time.perf_counter() - t)
        row = {"tier": tier, "method": method, "setup_s": setup, "construct_s": construct,
               "first_build_s": warm_s, "times": times,
               "s_per_candidate": statistics.median(times) if times else None,
               "device_peak": max(filter(None, [dev.peak(), setup_peak if mi == 0 else None]), default=None),
               "held": builder.memory_bytes()}
        rows.append(row)
        print(f"  {tier}/{method}: {fmt(row['s_per_candidate'], '.2f')} s/candidate, device peak "
              f"{fmt_gb(row['device_peak'])}", flush=True)
    evaluation = None
    if time.perf_counter() < deadline:
        evaluation = generation_speed(model, base, dev, args.batch, args.prompt_len, args.new_tokens)
        evaluation["tier"] = tier
        evaluation["held_before"] = dev.allocated()
        print(f"  {tier}: generate {evaluation['generate_tok_s']:.0f} tok/s, fast decoder "
              f"{fmt(evaluation.get('fast_tok_s'), '.0f')} tok/s, evaluation adds "
              f"{fmt_gb(evaluation['eval_extra_bytes'])}", flush=True)
    del model, builder
    dev.clear()
    return rows, evaluation


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def fmt_gb(x: int | None) -> str:
    return "n/a (CPU)" if x is None else f"{x / GB:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models: the whole flow in seconds")
    parser.add_argument("--shape", default="auto", choices=["auto", "qwen_7b", "qwen_3b", "tiny_qwen"])
    parser.add_argument("--root", help="where the models go")
    parser.add_argument("--tiers", default=",".join(TIERS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--candidates", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=450.0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s

    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("gpu_worker: no CUDA device here (torch.cuda.is_available() is False): this bench "
              "needs one GPU; run `--device cpu --tiny` to check the flow on CPU.", file=sys.stderr)
        raise SystemExit(2)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    import big_models

    from workers.candidate import CandidateBuilder

    if "tier" not in inspect.signature(CandidateBuilder.__init__).parameters:
        raise SystemExit("workers.candidate.CandidateBuilder does not take tier= (issue 14's builder "
                         "is not in this checkout)")
    dev = Device(args.device)
    shape_name, why = choose_shape(args.shape, args.tiny, Path(args.root) if args.root else None)
    shape = big_models.SHAPES[shape_name]
    root = Path(args.root) if args.root else big_models.default_root(shape_name)
    card = torch.cuda.get_device_name(dev.dev) if dev.cuda else "CPU"
    total = torch.cuda.get_device_properties(dev.dev).total_memory if dev.cuda else None
    from worker_memory import code_state

    code = code_state()
    print(f"device: {card}{f' ({total / GB:.0f} GB)' if total else ''}; torch {torch.__version__}; "
          f"shape {shape_name} ({why}) under {root}; code {code}", flush=True)
    t = time.perf_counter()
    base, experts = big_models.build(shape, root, device="cuda" if dev.cuda else "cpu")
    build_s = time.perf_counter() - t
    model_bytes = big_models.model_bytes(base)
    print(f"models ready in {build_s:.0f} s: 3 x {model_bytes / GB:.2f} GB", flush=True)

    rows: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for tier in [x for x in args.tiers.split(",") if x]:
        if time.perf_counter() > deadline:
            rows.append({"tier": tier, "method": "*", "skipped": "past --budget-s"})
            continue
        if tier == "resident" and dev.cuda:
            need = 4.3 * model_bytes  # three sources + the candidate + workspace
            if dev.free() < need:
                rows.append({"tier": tier, "method": "*",
                             "skipped": f"does not fit: needs ~{need / GB:.0f} GB, "
                                        f"{dev.free() / GB:.0f} GB free"})
                print(f"  resident: skipped ({rows[-1]['skipped']})", flush=True)
                continue
        try:
            tier_rows, evaluation = run_tier(tier, args, dev, base, experts, shape.layers,
                                             model_bytes, deadline)
        except Exception as e:  # one tier's failure must not lose the others' figures
            import traceback

            dev.clear()
            what = "out of device memory" if isinstance(e, torch.cuda.OutOfMemoryError) else "failed"
            rows.append({"tier": tier, "method": "*", "skipped": f"{what}: {type(e).__name__}: {e}"[:300],
                         "traceback": traceback.format_exc()[-3000:]})
            print(f"  {tier}: {what}\n{traceback.format_exc()[-3000:]}", flush=True)
            continue
        rows += tier_rows
        if evaluation:
            evals.append(evaluation)

    report(rows, evals, model_bytes, shape_name, dev)
    goal = check_goal(rows, evals, model_bytes, shape_name, dev)
    print(f"\n{goal['verdict']}  {goal['goal']}: {goal['detail']}")
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f} s (models {build_s:.0f} s)")
    if args.out:
        out = {"device": card, "device_total_bytes": total, "torch": torch.__version__, "code": code,
               "shape": shape_name, "shape_reason": why, "model_bytes": model_bytes,
               "build_s": build_s, "wall_s": wall, "rows": rows, "evaluation": evals, "goal": goal,
               "args": vars(args)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))
        print(f"written: {args.out}")


def report(rows: list[dict[str, Any]], evals: list[dict[str, Any]], model_bytes: int,
           shape: str, dev: Device) -> None:
    """The markdown table."""
    by_tier = {e["tier"]: e for e in evals}
    print(f"\n{shape}: one model {model_bytes / GB:.2f} GB (bf16)\n")
    print("| tier | method | s/candidate | set-up s | device peak GB | ÷ one model | generate tok/s "
          "| fast decoder tok/s | eval adds GB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['tier']} | {r['method']} | skipped: {r['skipped']} | | | | | | |")
            continue
        e = by_tier.get(r["tier"], {})
        peak = r["device_peak"]
        print(f"| {r['tier']} | {r['method']} | {fmt(r['s_per_candidate'], '.2f')} | {r['setup_s']:.1f} | "
              f"{fmt(peak and peak / GB, '.2f')} | {fmt(peak and peak / model_bytes, '.2f')} | "
              f"{fmt(e.get('generate_tok_s'), '.0f')} | {fmt(e.get('fast_tok_s'), '.0f')} | "
              f"{fmt(e.get('eval_extra_bytes') and e['eval_extra_bytes'] / GB, '.2f')} |")
    for e in evals:
        same = e.get("fast_equals_generate")
        agree = "" if same is None else (
            f"; the fast decoder's tokens {'equal' if same else 'DIFFER from'} generate's")
        print(f"  {e['tier']}: batch {e['batch']}, prompt {e['prompt_len']}, {e['new_tokens']} new tokens; "
              f"KV cache {e['kv_cache_bytes'] / 1e6:.0f} MB (from the shape){agree}")


def check_goal(rows: list[dict[str, Any]], evals: list[dict[str, Any]], model_bytes: int,
               shape: str, dev: Device) -> dict[str, Any]:
    """Streamed tier: device peak <= 1.3 x one model + the evaluation's memory, on 80 GB."""
    goal = "streamed tier fits a 3 x 7B study on one 80 GB GPU (device peak <= 1.3 x one model + evaluation)"
    streamed = [r for r in rows if r["tier"] == "streamed" and "skipped" not in r]
    ev = next((e for e in evals if e["tier"] == "streamed"), None)
    if not dev.cuda:
        return {"goal": goal, "verdict": "N/A", "detail": "no device memory on CPU"}
    if not streamed:
        return {"goal": goal, "verdict": "FAIL", "detail": "the streamed tier did not run"}
    build_peak = max(r["device_peak"] for r in streamed)
    extra = ev["eval_extra_bytes"] if ev else 0
    eval_peak = (ev["held_before"] + extra) if ev else 0
    peak = max(build_peak, eval_peak)
    allowed = 1.3 * model_bytes + max(extra, ev["kv_cache_bytes"] if ev else 0)
    ok = peak <= allowed and peak <= GPU_80GB
    detail = (f"peak {peak / GB:.2f} GB (builds {build_peak / GB:.2f}, evaluation "
              f"{eval_peak / GB:.2f}) vs {allowed / GB:.2f} GB allowed "
              f"(1.3 x {model_bytes / GB:.2f} + {max(extra, 0) / GB:.2f} evaluation), "
              f"{peak / model_bytes:.2f} x one model")
    if shape != "qwen_7b":
        detail += f" — measured on {shape}, not 7B"
    if not ev:
        detail += " — no evaluation ran (budget)"
    return {"goal": goal, "verdict": "PASS" if ok else "FAIL", "detail": detail, "peak": peak,
            "allowed": allowed, "shape": shape}


if __name__ == "__main__":
    main()
