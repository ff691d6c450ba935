"""The zoo family's lm-eval tasks: one YAML + one JSONL per task, shipped in the package
under ``evaluators/tasks/<folder>`` (one folder per distinct task set; ``distractor``
shares ``zoo`` with ``two-experts``). ``python -m workers.zoo.tasks`` regenerates every
folder (a test checks the shipped files are current)."""

from __future__ import annotations

import json
from pathlib import Path

from workers.zoo.variant import ZooVariant
from workers.zoo.variants import DEFAULT, VARIANTS, get_variant

TASKS_ROOT = Path(__file__).resolve().parents[2] / "evaluators" / "tasks"
TASK_DIR = TASKS_ROOT / get_variant(DEFAULT).task_folder  # the first zoo's: evaluators/tasks/zoo

LOADER = '''"""Loads a zoo task's JSONL file from this folder (lm-eval's custom_dataset hook)."""

import json
from pathlib import Path


def load(split_file: str, **_: object):
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (Path(__file__).parent / split_file).read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})
'''


def task_yaml(name: str, variant: ZooVariant | None = None) -> str:
    v = variant or get_variant(DEFAULT)
    description = v.descriptions.get(name, f"zoo skill: {name.replace('_', ' ')}")
    return f"""# {description}
task: {v.task(name)}
tag: {v.task_folder}
custom_dataset: !function zoo_data.load
dataset_kwargs:
  split_file: {name}.jsonl
output_type: generate_until
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def render(variant: ZooVariant | str = DEFAULT) -> dict[str, str]:
    """File name -> content of every task file of ``variant``'s folder."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    files = {"zoo_data.py": LOADER}
    for name, examples in v.evaluation_splits().items():
        files[f"{name}.jsonl"] = "".join(
            json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in examples
        )
        files[f"{v.task_prefix}{name}.yaml"] = task_yaml(name, v)
    return files


def folders() -> dict[Path, dict[str, str]]:
    """Every shipped task folder and its files, each folder rendered once; variants that
    share a folder must render the same files."""
    out: dict[Path, dict[str, str]] = {}
    owner: dict[Path, str] = {}
    for v in VARIANTS.values():
        folder = TASKS_ROOT / v.task_folder
        files = render(v)
        if folder in out and out[folder] != files:
            raise ValueError(f"{v.name} and {owner[folder]} share {folder} but their tasks differ")
        out.setdefault(folder, files)
        owner.setdefault(folder, v.name)
    return out


def write() -> list[Path]:
    written = []
    for folder, files in folders().items():
        folder.mkdir(parents=True, exist_ok=True)
        for fname, content in files.items():
            (folder / fname).write_text(content)
        written.append(folder)
    return written


if __name__ == "__main__":
    for folder in write():
        print(f"wrote the zoo's tasks to {folder}")
