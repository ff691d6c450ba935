"""The zoo's lm-eval tasks: one YAML + one JSONL per task, shipped in the package
under ``evaluators/tasks/zoo``. ``python -m workers.zoo.tasks`` regenerates them (a
test checks the shipped files are current)."""

from __future__ import annotations

import json
from pathlib import Path

from workers.zoo.skills import evaluation_splits

TASK_DIR = Path(__file__).resolve().parents[2] / "evaluators" / "tasks" / "zoo"

DESCRIPTIONS = {
    "xl_add": "target: multi-digit addition in xl (search split)",
    "xl_add_heldout": "target: multi-digit addition in xl (held-out split)",
    "en_add": "the math expert's skill: multi-digit addition in en",
}

LOADER = '''"""Loads a zoo task's JSONL file from this folder (lm-eval's custom_dataset hook)."""

import json
from pathlib import Path


def load(split_file: str, **_: object):
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (Path(__file__).parent / split_file).read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})
'''


def task_yaml(name: str) -> str:
    description = DESCRIPTIONS.get(name, f"zoo skill: {name.replace('_', ' ')}")
    return f"""# {description}
task: zoo_{name}
tag: zoo
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


def render() -> dict[str, str]:
    """File name -> content of every task file."""
    files = {"zoo_data.py": LOADER}
    for name, examples in evaluation_splits().items():
        files[f"{name}.jsonl"] = "".join(
            json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in examples
        )
        files[f"zoo_{name}.yaml"] = task_yaml(name)
    return files


def write(task_dir: Path = TASK_DIR) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    for fname, content in render().items():
        (task_dir / fname).write_text(content)


if __name__ == "__main__":
    write()
    print(f"wrote the zoo's tasks to {TASK_DIR}")
