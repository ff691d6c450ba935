"""Small lm-eval task directories for tests and benchmarks (no network, no model).

The prompts use characters of ``workers.synthetic.VOCAB`` (digits, letters, ``+=?-.,: ``)
so that the character-level fixture tokenizer encodes them without ``<unk>``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

_LOADER = "custom_dataset: !function evaluators.task_data.local_jsonl"


def addition_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``{"prompt": "12p35q", "answer": "47"}`` rows, like the demo zoo's tasks."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        rows.append({"prompt": f"{a}p{b}q", "answer": str(a + b)})
    return rows


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_generate_task(out_dir: Path, name: str, rows: Sequence[dict], *, max_gen_toks: int = 8,
                        until: Sequence[str] = ("</s>",), train_rows: Sequence[dict] = ()) -> Path:
    """A ``generate_until`` task scored by ``exact_match``; rows have ``prompt`` and ``answer``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / f"{name}.jsonl", rows)
    files = f"test: {name}.jsonl"
    if train_rows:
        _write_jsonl(out_dir / f"{name}_train.jsonl", train_rows)
        files += f", train: {name}_train.jsonl"
    stops = ", ".join(json.dumps(s) for s in until)
    path = out_dir / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        f"dataset_path: json\n{_LOADER}\n"
        f"dataset_kwargs:\n  data_files: {{{files}}}\n"
        "test_split: test\n" + ("training_split: train\n" if train_rows else "") +
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "target_delimiter: \"\"\nfewshot_delimiter: \" \"\n"
        f"generation_kwargs:\n  until: [{stops}]\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return path


def choice_rows(n: int, seed: int = 0, n_choices: int = 3) -> list[dict]:
    """Multiple-choice rows: which continuation of ``prompt`` is right (``label``)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        right = a + b
        wrong = rng.sample([v for v in range(100) if v != right], n_choices - 1)
        choices = [str(v) for v in [right, *wrong]]
        rng.shuffle(choices)
        rows.append({"prompt": f"{a}p{b}q", "choices": choices, "label": choices.index(str(right))})
    return rows


def write_choice_task(out_dir: Path, name: str, rows: Sequence[dict]) -> Path:
    """A ``multiple_choice`` task (loglikelihood requests) scored by ``acc`` and ``acc_norm``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / f"{name}.jsonl", rows)
    path = out_dir / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        f"dataset_path: json\n{_LOADER}\n"
        f"dataset_kwargs:\n  data_files: {{test: {name}.jsonl}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return path


def write_group(out_dir: Path, name: str, tasks: Sequence[str], metric: str = "acc") -> Path:
    """A group of ``tasks`` whose ``metric`` is the size-weighted mean over them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.yaml"
    path.write_text(
        f"group: {name}\ntask: [{', '.join(tasks)}]\n"
        f"aggregate_metric_list:\n  - metric: {metric}\n    aggregation: mean\n    weight_by_size: true\n",
        encoding="utf-8",
    )
    return path


def write_loglikelihood_task(out_dir: Path, name: str, rows: Sequence[dict]) -> Path:
    """A ``loglikelihood`` task (answer given prompt): ``perplexity`` (lower is better), ``acc``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out_dir / f"{name}.jsonl", rows)
    path = out_dir / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        f"dataset_path: json\n{_LOADER}\n"
        f"dataset_kwargs:\n  data_files: {{test: {name}.jsonl}}\n"
        "test_split: test\n"
        "output_type: loglikelihood\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\n'
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
        encoding="utf-8",
    )
    return path
