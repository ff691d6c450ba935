"""Seconds per evaluation: our lm-eval adapter vs a plain ``lm_eval.simple_evaluate`` call.

    .venv/bin/python bench/eval_overhead.py                      # the demo zoo, if built
    .venv/bin/python bench/eval_overhead.py --tasks DIR --model PATH [--task NAME]

Scores one model on generation tasks (exact_match, ``limit`` examples per task) and
prints, per way of evaluating: median seconds per evaluation, the seconds inside the
model's forward passes (forward hooks), and the share of the time outside them. The
goal: our time outside the forward passes under 10 % of the total.

Without ``--tasks/--model`` it uses the demo zoo (task ``zoo_xl_add`` of
``evaluators/tasks/zoo``, the ``math`` model of a built zoo: ``evomerge zoo build``, or
``--build-zoo``); when the zoo is not built it makes a zoo-like stand-in under
``bench/out/eval_overhead``: a 4-layer, hidden-64 Llama with a character tokenizer,
trained for a few seconds on ``12p35q`` → ``47`` additions, and that task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ZOO_TASKS = REPO / "evaluators" / "tasks" / "zoo"
OUT = REPO / "bench" / "out" / "eval_overhead"


def _quiet() -> None:
    import logging

    import datasets
    import transformers

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def train_standin(out: Path, seed: int = 0, steps: int = 300) -> Path:
    """A zoo-sized Llama trained briefly on addition, so it answers and stops with EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators.testing import addition_rows
    from workers.synthetic import make_model

    if (out / "config.json").exists():
        return out
    make_model("llama", out, seed=seed, hidden=64, layers=4, intermediate=256)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    rows = addition_rows(5000, seed=seed + 1)
    seqs = [tok(r["prompt"] + r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            for r in rows]
    prompt_lens = [len(r["prompt"]) for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(seqs), (64,), generator=gen).tolist()
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((64, width), tok.pad_token_id)
        labels = torch.full((64, width), -100)
        for row, i in enumerate(idx):
            ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
            labels[row, prompt_lens[i]: len(seqs[i])] = torch.tensor(seqs[i][prompt_lens[i]:])
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(out)
    return out


def standin(seed: int) -> tuple[Path, Path, list[str]]:
    from evaluators.testing import addition_rows, write_generate_task

    tasks = OUT / "tasks"
    write_generate_task(tasks, "standin_add", addition_rows(300, seed=seed + 7))
    return tasks, train_standin(OUT / "model", seed), ["standin_add"]


def zoo(seed: int, name: str | None, build: bool) -> tuple[Path, Path, list[str]] | None:
    """The demo zoo's task directory and one of its models, if the zoo is built (or ``build``)."""
    if not ZOO_TASKS.is_dir():
        return None
    try:
        from workers.zoo import build as zoo_build
    except ImportError:
        return None
    built = zoo_build.build_zoo(seed=seed) if build else zoo_build.load(zoo_build.default_dir(seed))
    if built is None:
        return None
    models = {k: Path(v) for k, v in (built.models if hasattr(built, "models") else built).items()}
    path = models[name] if name else models.get("math", next(iter(models.values())))
    tasks = ["zoo_xl_add"] if (ZOO_TASKS / "zoo_xl_add.yaml").exists() else []
    return ZOO_TASKS, path, tasks


def generation_tasks(task_dir: Path) -> list[str]:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    return [n for n in tm.all_subtasks
            if (tm.task_index[n].cfg or {}).get("output_type", "generate_until") == "generate_until"]


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def time_adapter(model, tok, spec, repeats: int) -> dict:
    from evaluators import registry

    evaluator = registry.create(spec)
    first = evaluator.evaluate(model, tok)
    evaluator.evaluate(model, tok)  # warm-up
    runs = [evaluator.evaluate(model, tok).timings for _ in range(repeats)]
    total = [t.total_s for t in runs]
    forward = [t.forward_s for t in runs]
    return {
        "seconds": _median(total), "forward_s": _median(forward),
        "outside_share": _median([(t.total_s - t.forward_s) / t.total_s for t in runs]),
        "model_calls": runs[0].model_calls, "prepare_s": first.timings.prepare_s,
        "scores": first.scores, "samples": evaluator.suite.samples,
    }


def time_simple_evaluate(model, tok, task_dir: Path, tasks: list[str], samples: dict, batch_size: int,
                         seed: int, repeats: int) -> dict:
    """``simple_evaluate`` on the same in-memory model, tasks and examples, with a TaskManager
    built beforehand (its best case: no model reload, no task re-indexing)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from evaluators.runtime.timing import ForwardTimer

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    tm = TaskManager(include_path=str(task_dir), include_defaults=False)
    total, forward, scores = [], [], {}
    for i in range(repeats + 1):
        with ForwardTimer(model) as timer:
            start = time.perf_counter()
            res = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=tm, samples={k: v for k, v in samples.items() if v},
                bootstrap_iters=0, log_samples=False, fewshot_random_seed=seed,
            )
            elapsed = time.perf_counter() - start
        if i:  # the first call warms up
            total.append(elapsed)
            forward.append(timer.seconds)
            calls = timer.calls
        scores = {t: float(res["results"][t]["exact_match,none"]) for t in tasks}
    return {"seconds": _median(total), "forward_s": _median(forward), "model_calls": calls,
            "outside_share": _median([(t - f) / t for t, f in zip(total, forward)]), "scores": scores}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=Path, help="directory of task YAML files (default: the zoo's)")
    parser.add_argument("--model", type=Path, help="model folder (default: a zoo model)")
    parser.add_argument("--task", action="append", help="task name (repeat for more)")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--zoo-model", help="which zoo model (default: math)")
    parser.add_argument("--build-zoo", action="store_true", help="build the zoo if it is not built")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    _quiet()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import EvaluationSpec, ObjectiveSpec, registry

    if args.tasks and args.model:
        task_dir, model_path, names, source = args.tasks, args.model, [], "given"
    else:
        found = zoo(0, args.zoo_model, args.build_zoo)
        (task_dir, model_path, names), source = (found, "zoo") if found else (standin(args.seed), "stand-in")
    names = args.task or names or generation_tasks(task_dir)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    n_params = sum(p.numel() for p in model.parameters())

    def spec(fast: bool) -> EvaluationSpec:
        return registry.validate_spec(EvaluationSpec(
            objectives=[ObjectiveSpec(task=n, metric="exact_match", limit=args.limit) for n in names],
            seed=args.seed, batch_size=args.batch_size,
            options={"task_dirs": [str(task_dir)], "fast_generate": fast}))

    ours = time_adapter(model, tok, spec(True), args.repeats)
    plain_decode = time_adapter(model, tok, spec(False), max(3, args.repeats // 4))
    simple = time_simple_evaluate(model, tok, task_dir, names, ours.pop("samples"), args.batch_size,
                                  args.seed, max(3, args.repeats // 4))
    plain_decode.pop("samples")
    assert ours["scores"] == plain_decode["scores"], "the fast decoder changed a score"
    if list(ours["scores"].values()) != list(simple["scores"].values()):
        raise AssertionError(f"scores differ from simple_evaluate: {ours['scores']} vs {simple['scores']}")

    figures = {
        "source": source, "model": str(model_path), "params": n_params, "tasks": names,
        "limit": args.limit, "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "ours": ours, "ours_with_model_generate": plain_decode, "simple_evaluate": simple,
    }
    print(f"model: {model_path} ({source}, {n_params / 1e3:.0f}k params); tasks: {', '.join(names)}; "
          f"{args.limit} examples per task; batch size {args.batch_size}; 1 thread")
    print(f"scores: {ours['scores']}")
    print(f"{'':34}{'s / eval':>10}{'forward s':>11}{'outside forward':>17}{'calls':>8}")
    for label, row in [("evomerge adapter (fast decoder)", ours),
                       ("evomerge adapter (model.generate)", plain_decode),
                       ("lm_eval.simple_evaluate", simple)]:
        print(f"{label:34}{row['seconds']:>10.4f}{row['forward_s']:>11.4f}{row['outside_share']:>16.1%}"
              f"{row['model_calls']:>8}")
    print(f"one-time set-up per worker (tasks, requests, plans): {ours['prepare_s']:.3f} s; "
          f"speed-up over simple_evaluate: {simple['seconds'] / ours['seconds']:.1f}x")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
