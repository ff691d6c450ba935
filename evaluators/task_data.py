"""Data loaders for task YAML files that ship their data beside them.

lm-eval resolves ``dataset_kwargs.data_files`` against the current directory, so a task
directory that moves (installed in a package, copied to a worker) breaks. Point the
task at this loader instead and give paths relative to the YAML file::

    dataset_path: json                     # ignored when custom_dataset is set
    custom_dataset: !function evaluators.task_data.local_jsonl
    dataset_kwargs:
      data_files: {test: add.jsonl, train: add_train.jsonl}
    test_split: test
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def local_jsonl(data_files: dict[str, str] | str, config_source: str | None = None, **_: Any):
    """A ``datasets.DatasetDict`` from JSON-lines files named relative to the task YAML.

    lm-eval calls ``custom_dataset(**metadata, **dataset_kwargs)``; its metadata carries
    ``config_source``, the path of the YAML file.
    """
    import datasets

    base = Path(config_source).parent if config_source and config_source != "inline" else Path.cwd()
    files = {"test": data_files} if isinstance(data_files, str) else dict(data_files)
    resolved = {split: str((base / path).resolve()) for split, path in files.items()}
    missing = [p for p in resolved.values() if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"task data not found: {missing} (paths are relative to {base})")
    return datasets.load_dataset("json", data_files=resolved)
