"""What a failed write means: a full disk, a read-only disk, or a database that cannot be written.

Shared by the API (which answers 507 or 503 instead of a 500) and the controller (which stalls
visibly and repairs its studies once writes work again, docs/controller.md). No heavy import:
only the standard library; SQLAlchemy's and psycopg's errors are recognised by duck typing.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

DISK_FULL = "disk_full"
READ_ONLY = "read_only"
UNAVAILABLE = "database_unavailable"

_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# PostgreSQL SQLSTATEs: 53100 disk_full, 53xxx insufficient resources, 25006 read-only transaction
_PG_FULL = ("53100",)
_PG_READ_ONLY = ("25006",)
_PG_UNAVAILABLE = ("08", "53", "57P")  # connection, insufficient resources, operator intervention
_SQLITE_UNAVAILABLE = ("locked", "busy", "disk i/o", "unable to open")

_FIX = {
    DISK_FULL: "free space on the disk of EVOMERGE_DATA_DIR (or of the database server); exports under "
               "<data_dir>/exports can be deleted, or capped with EVOMERGE_EXPORT_BUDGET_BYTES. Studies "
               "continue by themselves once writes work again",
    READ_ONLY: "make EVOMERGE_DATA_DIR (or the database) writable again, or point EVOMERGE_DATA_DIR / "
               "EVOMERGE_DATABASE_URL at a writable place",
    UNAVAILABLE: "check that the database (EVOMERGE_DATABASE_URL) is reachable and writable; studies "
                 "continue by themselves once it answers again",
}


@dataclass(frozen=True)
class WriteFault:
    """A write that could not be done: ``kind``, the HTTP status it maps to, and a one-line reason."""

    kind: str
    what: str  # e.g. "the disk is full"
    error: str  # the exception's type name (never its text: it may quote a path or data)

    @property
    def status_code(self) -> int:
        return 507 if self.kind == DISK_FULL else 503

    @property
    def reason(self) -> str:
        return f"{self.what} ({self.error}): {_FIX[self.kind]}"


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the driver error SQLAlchemy wraps (``.orig``), its causes and contexts."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend([getattr(e, "orig", None), e.__cause__, e.__context__])


def _classify_one(e: BaseException) -> tuple[str, str] | None:
    if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
        return DISK_FULL, "the disk is full"
    if isinstance(e, OSError) and e.errno == errno.EROFS:
        return READ_ONLY, "the disk is read-only"
    text = str(e).lower()
    if isinstance(e, sqlite3.Error):
        if "disk is full" in text:
            return DISK_FULL, "the disk holding the SQLite database is full"
        if "readonly" in text or "read-only" in text:
            return READ_ONLY, "the SQLite database cannot be written (read-only)"
        if any(words in text for words in _SQLITE_UNAVAILABLE):
            return UNAVAILABLE, "the SQLite database cannot be written"
        return None
    sqlstate = str(getattr(e, "sqlstate", "") or "")
    if sqlstate.startswith(_PG_FULL):
        return DISK_FULL, "the database server's disk is full"
    if sqlstate.startswith(_PG_READ_ONLY):
        return READ_ONLY, "the database is read-only"
    if sqlstate.startswith(_PG_UNAVAILABLE):
        return UNAVAILABLE, "the database does not answer"
    return None


def _is_operational(e: BaseException) -> bool:
    """SQLAlchemy's ``OperationalError`` / ``DisconnectionError`` (and psycopg's), by name: a
    database that does not answer, or refuses the write for a reason of its own."""
    return any(cls.__name__ in ("OperationalError", "DisconnectionError", "StorageInternalError")
               for cls in type(e).__mro__)


def write_fault(exc: BaseException) -> WriteFault | None:
    """The write fault behind ``exc`` (anywhere in its chain), or None when it is something else."""
    chain = list(_chain(exc))
    for e in chain:
        found = _classify_one(e)
        if found is not None:
            return WriteFault(found[0], found[1], type(e).__name__)
    if any(isinstance(e, sqlite3.Error) for e in chain):
        return None  # an SQL error of SQLite's (no such table, …): a bug, not a fault of the disk
    for e in chain:
        if _is_operational(e):
            return WriteFault(UNAVAILABLE, "the database cannot be written", type(e).__name__)
    return None


def free_bytes(path: Path) -> int | None:
    """Free bytes (for unprivileged users) on the filesystem of ``path``; None when it does not exist."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def write_probe(folder: Path, size: int = 4096) -> str | None:
    """Write, then delete, a small file in ``folder``: None when that works, else why not (one line)."""
    probe = folder / f".evomerge-write-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(probe, "wb") as fh:  # ENOSPC shows at write or close (space is reserved then)
            fh.write(b"\0" * size)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


@dataclass
class Stall:
    """The write fault a controller is stalled on, kept in memory (the database may not hold it):
    what, since when (UTC), and which studies it held then."""

    fault: WriteFault
    since: datetime
    studies: set[str] = field(default_factory=set)
    retries: int = 0

    @property
    def reason(self) -> str:
        return self.fault.reason

    @property
    def status_code(self) -> int:
        return self.fault.status_code

    def seconds(self) -> float:
        return (datetime.now(timezone.utc) - self.since).total_seconds()
