"""Loads a zoo task's JSONL file from this folder (lm-eval's custom_dataset hook)."""

import json
from pathlib import Path


def load(split_file: str, **_: object):
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in (Path(__file__).parent / split_file).read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})
