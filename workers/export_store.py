"""The on-disk mechanics of exports: source digests, staging folders and their locks,
crash leftovers, atomic removal. No torch; nothing here knows what a model is.

A staging folder ``<root>/.staging/<key>-<random>/`` has a lock file beside it,
``<name>.lock``, created and ``flock``-ed *before* the folder exists and held by the
building process until the folder is gone. The kernel releases the lock when its
process dies, even by SIGKILL, so :func:`cleanup_staging` tells a crashed export's
leftovers from a live one's by trying the lock, and never removes live work.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

STAGING = ".staging"
DIGEST_CACHE = ".source_digests.json"
HASH_CHUNK = 8 << 20  # bytes read at a time when hashing
STALE_STAGING_S = 3600.0
KEY_RE = re.compile(r"^[0-9a-f]{64}$")


def is_key(key: str) -> bool:
    """A well-formed export key (64 lowercase hex digits): never a path trick."""
    return bool(KEY_RE.match(key))


def file_sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            h.update(chunk)
            if on_bytes:
                on_bytes(len(chunk))
    return h.hexdigest()


def _signature(st: os.stat_result) -> list[int]:
    # ctime too: it changes on any write, even when mtime is set back afterwards
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


class DigestCache:
    """sha256 of source files, remembered in a JSON sidecar by (real path, size,
    mtime_ns, ctime_ns, inode) so that a large source is hashed once, not per export.

    Concurrent writers merge their entries into what is on disk and replace the file
    atomically; a lost update only costs a hash later.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = self._load()
        self.new: dict[str, dict[str, Any]] = {}
        self.seen: dict[Path, list[int]] = {}

    def _load(self) -> dict[str, dict[str, Any]]:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text())
            return dict(data.get("entries", {})) if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def digest(self, path: Path) -> str:
        real = Path(os.path.realpath(path))
        sig = _signature(real.stat())
        self.seen[real] = sig
        entry = self.new.get(str(real)) or self.entries.get(str(real))
        if entry and entry.get("sig") == sig:
            return str(entry["sha256"])
        sha = file_sha256(real)
        if _signature(real.stat()) != sig:
            raise RuntimeError(f"source file {real} changed while it was being hashed")
        self.new[str(real)] = {"sig": sig, "sha256": sha}
        return sha

    def changed(self) -> list[Path]:
        """Files hashed (or looked up) here whose size, times or inode changed since."""
        out = []
        for path, sig in self.seen.items():
            try:
                if _signature(path.stat()) != sig:
                    out.append(path)
            except OSError:
                out.append(path)
        return out

    def save(self) -> None:
        if self.path is None or not self.new:
            return
        entries = self._load()
        entries.update(self.new)
        entries = {p: e for p, e in entries.items() if os.path.exists(p)}
        # written in staging, so that a crash leaves the litter where cleanup looks; a
        # failure only costs hashing again later
        with contextlib.suppress(OSError):
            (self.path.parent / STAGING).mkdir(exist_ok=True)
            tmp = self.path.parent / STAGING / f"digests-{secrets.token_hex(6)}.tmp"
            tmp.write_text(json.dumps({"version": 1, "entries": entries}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        self.entries, self.new = entries, {}


def remove_export(root: Path, key: str) -> bool:
    """Remove an export atomically: moved into staging first (so it stops being servable
    at once and a half-deleted folder is never taken as complete), then deleted."""
    if not is_key(key):
        raise ValueError(f"{key!r} is not an export key")
    root = Path(root)
    (root / STAGING).mkdir(parents=True, exist_ok=True)
    trash = root / STAGING / f"trash-{key}-{secrets.token_hex(6)}"
    try:
        os.rename(root / key, trash)
    except FileNotFoundError:
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


@contextlib.contextmanager
def _try_lock(lock: Path) -> Iterator[bool]:
    """Hold ``lock`` for the body if nobody else does: yields whether we got it (a
    missing file counts as got: nobody holds it)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def _age_s(*paths: Path) -> float:
    newest = 0.0
    for p in paths:
        with contextlib.suppress(OSError):
            newest = max(newest, p.stat().st_mtime)
    return time.time() - newest


def cleanup_staging(root: Path, older_than_s: float = STALE_STAGING_S) -> list[Path]:
    """Remove leftovers of crashed exports: staging folders that no live export holds
    and that were last touched at least ``older_than_s`` ago (a live export touches its
    lock at least once a minute, a second guard where ``flock`` is unreliable).
    ``older_than_s=0`` removes every leftover. Returns what was removed."""
    staging = Path(root) / STAGING
    if not staging.is_dir():
        return []
    removed = []
    for entry in sorted(staging.iterdir()):
        if entry.name.endswith(".lock"):
            # an orphan lock; held while unlinked, so a starting export that just
            # created it sees it vanish and takes another name
            with _try_lock(entry) as free:
                if free and not entry.with_suffix("").exists():
                    entry.unlink(missing_ok=True)
            continue
        lock = entry.with_name(entry.name + ".lock")
        with _try_lock(lock) as free:
            if not free or _age_s(entry, lock) < older_than_s:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        removed.append(entry)
    return removed


class StagingDir:
    """A staging folder with its lock held for as long as the export runs."""

    def __init__(self, root: Path, key: str):
        base = root / STAGING
        base.mkdir(parents=True, exist_ok=True)
        while True:
            name = f"{key}-{secrets.token_hex(6)}"
            self.lock = base / f"{name}.lock"
            # the lock exists and is held before the folder does, so a cleanup never
            # sees this folder unguarded
            self._fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.lock).st_ino == os.fstat(self._fd).st_ino:
                    break
            # a cleanup took the fresh lock file for an orphan and removed it: again
            os.close(self._fd)
        self.path = base / name
        self.path.mkdir()
        self._touched = time.monotonic()

    def heartbeat(self) -> None:
        if time.monotonic() - self._touched > 60:
            with contextlib.suppress(OSError):
                os.utime(self.lock)
            self._touched = time.monotonic()

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.lock.unlink(missing_ok=True)
        os.close(self._fd)


def fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
