"""Content digests of model folders and task folders: the score cache's key names content, not places.

A file's sha256 is kept in ``em_weight_digests`` under (real path, size, mtime_ns): each file is read
once, and read again only when its size or modification time changes (the old row is then
replaced). Hashing reads the whole file, at roughly the disk's speed (1–2 GB/s from the page
cache): a 7B model in bf16 (~15 GB) takes 10–30 s the first time it is seen, a lookup afterwards.
Each file is looked up, and recorded, in its own short transaction, so a long hash never holds a
database lock.

A model's digest covers its weight files (``*.safetensors``, ``*.bin``) and the files beside them
that change its scores (config, generation config, tokenizer, chat template, code): names and
contents, never the folder's place, so a copied folder has the same digest. A task folder's digest
covers every file under it (YAML, data, Python; caches such as ``__pycache__`` and hidden files
left out) and the files its task YAML names outside it (``include``, ``data_files``,
``dataset_path``, ``!function`` modules).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import WeightDigest
from service.db.insert_ignore import insert_ignore
from service.spec_limits import MAX_TASK_DIR_ENTRIES

CHUNK = 8 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MODEL_FILE_SUFFIXES = (*WEIGHT_SUFFIXES, ".json", ".model", ".tiktoken", ".jinja", ".py")
MODEL_FILE_NAMES = frozenset({"merges.txt", "vocab.txt"})
MAX_PATH = 1024  # WeightDigest.path: a longer path is hashed every time, never recorded
MAX_TREE_FILES = 2 * MAX_TASK_DIR_ENTRIES


class DigestError(ValueError):
    """A folder whose digest cannot be taken (no weights, too many files, unreadable)."""


def canonical_json(value: Any) -> str:
    """One text per value: keys sorted, no spaces, ASCII, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(sessions: sessionmaker[Session], path: Path) -> str:
    """The sha256 of one file, from ``em_weight_digests`` while its size and mtime are unchanged."""
    real = Path(os.path.realpath(path))
    before = real.stat()
    name = str(real)
    if len(name) > MAX_PATH:
        return hash_file(real)
    with sessions() as s:
        known = s.scalar(select(WeightDigest.sha256).where(
            WeightDigest.path == name, WeightDigest.size_bytes == before.st_size,
            WeightDigest.mtime_ns == before.st_mtime_ns))
    if known is not None:
        return known
    digest = hash_file(real)
    after = real.stat()
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return digest  # changed while it was read: not recorded, read again next time
    with sessions.begin() as s:
        s.execute(delete(WeightDigest).where(WeightDigest.path == name))  # its older versions
        insert_ignore(s, WeightDigest, {"path": name, "size_bytes": before.st_size,
                                        "mtime_ns": before.st_mtime_ns, "sha256": digest},
                      unique=("path", "size_bytes", "mtime_ns"))
    return digest


def _model_file(name: str) -> bool:
    return not name.startswith(".") and (name.endswith(MODEL_FILE_SUFFIXES) or name in MODEL_FILE_NAMES)


def model_digest(sessions: sessionmaker[Session], folder: str | Path) -> str:
    """sha256 over the sorted (name, sha256) of a model folder's weight files and the files beside
    them that change its scores."""
    root = Path(folder)
    try:
        files = sorted(p for p in root.iterdir() if p.is_file() and _model_file(p.name))
    except OSError as err:
        raise DigestError(f"model folder {str(root)!r} cannot be listed ({err.strerror})") from err
    if not any(p.name.endswith(WEIGHT_SUFFIXES) for p in files):
        raise DigestError(f"model folder {str(root)!r} holds no weight file (*.safetensors, *.bin)")
    return sha256_text(canonical_json([[p.name, file_sha256(sessions, p)] for p in files]))


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    """(relative POSIX name, path) of every file under ``folder``, symlinked folders followed once,
    caches and hidden entries left out; bounded."""
    out: list[tuple[str, Path]] = []
    seen = {Path(os.path.realpath(folder))}
    stack = [(folder, "")]
    while stack:
        current, prefix = stack.pop()
        with os.scandir(current) as it:
            items = sorted(it, key=lambda e: e.name)
        for item in items:
            if item.name.startswith(".") or item.name == "__pycache__" or item.name.endswith(".pyc"):
                continue
            rel = f"{prefix}{item.name}"
            path = Path(item.path)
            if path.is_dir():
                real = Path(os.path.realpath(path))
                if real not in seen:
                    seen.add(real)
                    stack.append((path, rel + "/"))
            elif path.is_file():
                out.append((rel, path))
                if len(out) > MAX_TREE_FILES:
                    raise DigestError(f"{str(folder)!r} holds more than {MAX_TREE_FILES} files")
    return out


def _named_outside(folder: Path, files: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """The files the folder's task YAML names outside the folder, as ``yaml->what:relative path``."""
    from service.task_dirs import _named_files, read_task_yaml  # the audit's own reading of task YAML

    real_folder = Path(os.path.realpath(folder))
    out: list[tuple[str, Path]] = []
    for rel, path in files:
        if not rel.endswith(".yaml"):
            continue
        try:
            config, functions = read_task_yaml(path)
        except Exception:  # lm-eval reports an unreadable task itself; its bytes are in the digest
            continue
        if not isinstance(config, dict):
            continue
        for what, target in _named_files(config, functions, path.parent):
            real = Path(os.path.realpath(target))
            if real.is_relative_to(real_folder) or not real.exists():
                continue
            name = f"{rel}->{what}:{os.path.relpath(target, path.parent)}"
            if real.is_dir():
                out += [(f"{name}/{sub}", p) for sub, p in _files_under(real)]
            else:
                out.append((name, real))
    return out


def tree_digest(sessions: sessionmaker[Session], folder: str | Path) -> str:
    """sha256 over the sorted (relative name, sha256) of every file a task folder leads lm-eval to."""
    root = Path(folder)
    if not root.is_dir():
        raise DigestError(f"task folder {str(root)!r} does not exist")
    files = _files_under(root)
    files += _named_outside(root, files)
    return sha256_text(canonical_json(sorted([name, file_sha256(sessions, p)] for name, p in files)))


def path_digest(sessions: sessionmaker[Session], path: str | Path) -> str:
    """A folder's :func:`tree_digest`, or a file's sha256."""
    p = Path(path)
    return tree_digest(sessions, p) if p.is_dir() else file_sha256(sessions, p)
