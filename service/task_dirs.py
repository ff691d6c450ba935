"""What a task folder may reach, checked before lm-eval indexes it.

lm-eval reads every ``*.yaml`` under a task folder (following symlinked folders), loads
the files their ``include:`` names and imports the Python files their ``!function``
tags name. A task folder named in a study must therefore hold nothing that leads outside
the administrator's roots: every file and folder in it (symlinks resolved), every
``include``, every ``!function`` module file and every local data file a task names must
lie inside the roots. The walk is bounded in entries and bytes, so pointing at a huge
tree costs milliseconds, not a minute.

Only the folder's own files are read, and a refusal never echoes their contents.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from service.model_headers import inside
from service.spec_limits import MAX_TASK_DIR_ENTRIES, MAX_TASK_FILE_BYTES


class TaskDirRefusal(Exception):
    """A task folder that must not be indexed; ``msg`` and ``fix`` are for the user."""

    def __init__(self, msg: str, fix: str, kind: str) -> None:
        super().__init__(msg)
        self.msg, self.fix, self.kind = msg, fix, kind


def _entries(folder: Path) -> Iterator[tuple[Path, Path]]:
    """(path as listed, real path) of everything under ``folder``, symlinked folders followed
    once each (as lm-eval's ``**`` glob follows them)."""
    seen = {folder}
    stack = [folder]
    while stack:
        current = stack.pop()
        try:
            with os.scandir(current) as it:
                items = list(it)
        except OSError:
            continue
        for item in items:
            path = Path(item.path)
            real = Path(os.path.realpath(path))
            yield path, real
            if real.is_dir() and real not in seen:
                seen.add(real)
                stack.append(real)


def read_task_yaml(path: Path) -> tuple[Any, dict[str, Any]]:
    """A task YAML's data and its ``!function`` references, read without running anything."""
    loader = _AuditLoader(path.read_text(encoding="utf-8", errors="replace"))
    try:
        return loader.get_single_data(), loader.functions
    finally:
        loader.dispose()


class _AuditLoader(yaml.SafeLoader):
    """Reads task YAML without running anything: every tag becomes plain data, and the
    ``!function`` references are collected."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.functions: list[str] = []


def _any_tag(loader: _AuditLoader, suffix: str, node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if node.tag == "!function":
            loader.functions.append(str(value))
        return value
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_mapping(node)  # type: ignore[arg-type]


_AuditLoader.add_multi_constructor("!", _any_tag)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    return []


def _named_files(config: dict[str, Any], functions: list[str], yaml_dir: Path) -> list[tuple[str, Path]]:
    """(what, path) of the local files one task YAML makes lm-eval read or import."""
    out = [("include", yaml_dir / inc) for inc in _strings(config.get("include"))]
    for qual in functions:
        module, _, _ = qual.rpartition(".")
        candidate = yaml_dir / f"{module.replace('.', '/')}.py"
        if module and os.path.lexists(candidate):  # else lm-eval imports an installed module
            out.append(("!function", candidate))
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        out += [("data_files", yaml_dir / f) for f in _strings(kwargs.get("data_files"))]
    path = config.get("dataset_path")
    if isinstance(path, str) and (path.startswith(("/", ".", "~")) or os.path.lexists(yaml_dir / path)):
        out.append(("dataset_path", yaml_dir / os.path.expanduser(path)))
    return out


def audit_task_dir(folder: Path, roots: Sequence[Path]) -> None:
    """Raise :class:`TaskDirRefusal` unless everything ``folder`` leads lm-eval to lies in ``roots``
    (real paths). ``folder`` is already a real path inside the roots."""
    count = 0
    shown = folder
    seen: set[Path] = set()
    for path, real in _entries(folder):
        count += 1
        if count > MAX_TASK_DIR_ENTRIES:
            raise TaskDirRefusal(
                f"task directory {str(shown)!r} holds more than {MAX_TASK_DIR_ENTRIES} files and folders",
                "point task_dirs at the folder of the task YAML files, not at a whole tree",
                "task_dir_too_large")
        rel = path.relative_to(folder) if path.is_relative_to(folder) else path.name
        if not inside(real, roots):
            raise TaskDirRefusal(
                f"task directory {str(shown)!r}: {rel} leads outside the allowed roots",
                "replace the link with the file itself, inside the roots", "path_outside_roots")
        if path.suffix == ".yaml" and real.is_file():
            _audit_yaml(real, rel, shown, roots, seen)


def _audit_yaml(real: Path, rel: Any, shown: Path, roots: Sequence[Path], seen: set[Path]) -> None:
    """Check what one task YAML names, and the YAML files it includes (once each)."""
    if real in seen or len(seen) > MAX_TASK_DIR_ENTRIES:
        return
    seen.add(real)
    try:
        size = real.stat().st_size
    except OSError:
        return
    if size > MAX_TASK_FILE_BYTES:
        raise TaskDirRefusal(
            f"task directory {str(shown)!r}: {rel} is larger than {MAX_TASK_FILE_BYTES} bytes",
            "a task YAML is a few kilobytes: keep data in separate files", "task_file_too_large")
    try:
        config, functions = read_task_yaml(real)
    except (OSError, yaml.YAMLError, RecursionError, ValueError):
        return  # lm-eval reports an unreadable task itself when it is named
    if not isinstance(config, dict):
        return
    for what, target in _named_files(config, functions, real.parent):
        target_real = Path(os.path.realpath(target))
        if not inside(target_real, roots):
            raise TaskDirRefusal(
                f"task directory {str(shown)!r}: {rel} names a file outside the allowed roots ({what})",
                "keep every file a task includes, imports or reads inside the roots",
                "path_outside_roots")
        if what == "include" and target_real.is_file():
            _audit_yaml(target_real, rel, shown, roots, seen)
