"""A deterministic, *virtual* tar of a folder: served with Content-Length and HTTP
Range straight from the folder's files, never written to disk.

The archive is uncompressed (safetensors do not compress) and its bytes depend only
on the files' relative paths and contents: members are the regular files under the
folder, sorted by relative path, each stored as ``prefix/relpath`` with mode 0644,
uid/gid 0, empty user/group names and mtime 0. A name that is not ASCII or longer
than the 100 bytes a ustar header holds (or a file of 8 GiB or more) gets a POSIX pax
extended header first, as GNU tar, bsdtar and Python's ``tarfile`` all read. Two
zero blocks end the archive. Because every byte's position is known in advance, any
``[start, end)`` range is produced by reading only the files it covers.

The headers are written here rather than with ``tarfile`` so that the bytes (and the
sha256 recorded when an export is made) do not change with the Python version.

Stdlib only, and shared: the worker that makes an export records the archive's sha256
and size (``workers.export``), the API serves the same bytes (``service.api.exports``).
Both also agree here on the name of the export folder's manifest, :data:`MANIFEST`.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "evomerge_export.json"
"""The export folder's manifest: written last (its presence marks the folder complete),
never part of the archive."""

BLOCK = 512
_MAX_OCTAL_SIZE = 8**11 - 1  # the largest size an 11-digit octal field holds
_NAME_LEN = 100
_PAX_NAME = "././@PaxHeader"


def _octal(value: int, width: int) -> bytes:
    """A numeric header field: zero-padded octal digits and a NUL."""
    return f"{value:0{width - 1}o}".encode("ascii") + b"\0"


def _header(name: bytes, size: int, typeflag: bytes) -> bytes:
    """One 512-byte ustar header with the fixed metadata of this format."""
    fields = [
        name[:_NAME_LEN].ljust(_NAME_LEN, b"\0"),  # name
        _octal(0o644, 8),  # mode
        _octal(0, 8),  # uid
        _octal(0, 8),  # gid
        _octal(size, 12),  # size
        _octal(0, 12),  # mtime
        b" " * 8,  # checksum, computed below with this field as spaces
        typeflag,
        b"\0" * 100,  # linkname
        b"ustar\x0000",  # magic and version (POSIX)
        b"\0" * 32,  # uname
        b"\0" * 32,  # gname
        _octal(0, 8),  # devmajor
        _octal(0, 8),  # devminor
        b"\0" * 155,  # prefix
    ]
    block = b"".join(fields).ljust(BLOCK, b"\0")
    checksum = f"{sum(block):06o}".encode("ascii") + b"\0 "
    return block[:148] + checksum + block[156:]


def _pax_record(key: str, value: str) -> bytes:
    """``"<len> key=value\\n"`` where ``len`` counts the whole record, itself included."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return str(length).encode("ascii") + body


def _padding(size: int) -> int:
    return -size % BLOCK


def member_headers(name: str, size: int) -> bytes:
    """The header block(s) of one regular file: a pax header when needed, then ustar."""
    raw = name.encode("utf-8")
    records = b""
    if not name.isascii() or len(raw) > _NAME_LEN:
        records += _pax_record("path", name)
    if size > _MAX_OCTAL_SIZE:
        records += _pax_record("size", str(size))
    out = b""
    if records:
        out += _header(_PAX_NAME.encode("ascii"), len(records), b"x")
        out += records + b"\0" * _padding(len(records))
        # the ustar header keeps what fits; the pax records take precedence
        raw = raw if len(raw) <= _NAME_LEN and name.isascii() else name.encode("ascii", "replace")
    return out + _header(raw, size if size <= _MAX_OCTAL_SIZE else 0, b"0")


@dataclass(frozen=True)
class Segment:
    """A run of archive bytes at ``offset``: literal ``data``, or ``length`` bytes of ``path``."""

    offset: int
    length: int
    data: bytes | None = None
    path: Path | None = None


class ArchiveChanged(OSError):
    """A file changed size after the archive was planned (its layout no longer holds)."""


class ArchivePlan:
    """The layout of the virtual tar; :meth:`iter_bytes` reads the files lazily."""

    def __init__(self, folder: Path, prefix: str, members: list[tuple[str, int]],
                 segments: list[Segment]):
        self.folder = folder
        self.prefix = prefix
        self._members = members
        self.segments = segments
        self._offsets = [s.offset for s in segments]
        last = segments[-1]
        self.size: int = last.offset + last.length

    @property
    def members(self) -> list[tuple[str, int]]:
        """``(name in the archive, size)`` of every file, in archive order."""
        return list(self._members)

    def iter_bytes(self, start: int = 0, end: int | None = None,
                   chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """Exactly the bytes ``[start, end)`` of the archive (``end`` defaults to its size),
        in chunks of at most ``chunk_size``."""
        end = self.size if end is None else end
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"range [{start}, {end}) is outside the archive's {self.size} bytes")
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        pos = start
        i = bisect.bisect_right(self._offsets, start) - 1
        while pos < end:
            seg = self.segments[i]
            lo = pos - seg.offset
            hi = min(seg.length, end - seg.offset)
            if seg.data is not None:
                for k in range(lo, hi, chunk_size):
                    yield seg.data[k:min(hi, k + chunk_size)]
            elif hi > lo:
                assert seg.path is not None
                yield from _read_file(seg.path, seg.length, lo, hi, chunk_size)
            pos = seg.offset + hi
            i += 1

    def sha256(self) -> str:
        """Hex sha256 of the whole archive."""
        h = hashlib.sha256()
        for chunk in self.iter_bytes(chunk_size=8 << 20):
            h.update(chunk)
        return h.hexdigest()


def _read_file(path: Path, size: int, lo: int, hi: int, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        if os.fstat(fh.fileno()).st_size != size:
            raise ArchiveChanged(f"{path} changed size since the archive was planned")
        fh.seek(lo)
        pos = lo
        while pos < hi:
            data = fh.read(min(chunk_size, hi - pos))
            if not data:
                raise ArchiveChanged(f"{path} ended early (truncated since the archive was planned)")
            pos += len(data)
            yield data


def _regular_files(folder: Path) -> list[tuple[str, Path]]:
    """``(posix relative path, path)`` of every regular file under ``folder``, sorted.

    Symbolic links are skipped (neither files nor folders behind them are followed),
    so nothing outside the folder can end up in an archive.
    """
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
        for fname in filenames:
            path = here / fname
            if path.is_symlink() or not path.is_file():
                continue
            found.append((path.relative_to(folder).as_posix(), path))
    found.sort(key=lambda item: item[0].encode("utf-8"))
    return found


def _check_prefix(prefix: str) -> str:
    prefix = prefix.strip("/")
    parts = prefix.split("/")
    if not prefix or any(p in ("", ".", "..") for p in parts) or "\0" in prefix:
        raise ValueError(f"archive prefix {prefix!r} must be a plain relative folder name")
    return prefix


def plan_archive(folder: Path, prefix: str,
                 exclude: set[str] | frozenset[str] = frozenset({MANIFEST})) -> ArchivePlan:
    """Plan the virtual tar of ``folder``: every regular file but those whose relative
    path is in ``exclude``, stored under ``prefix/``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    prefix = _check_prefix(prefix)
    segments: list[Segment] = []
    members: list[tuple[str, int]] = []
    offset = 0

    def add(length: int, data: bytes | None = None, path: Path | None = None) -> None:
        nonlocal offset
        if length:
            segments.append(Segment(offset, length, data, path))
            offset += length

    for rel, path in _regular_files(folder):
        if rel in exclude:
            continue
        name = f"{prefix}/{rel}"
        size = path.stat().st_size
        members.append((name, size))
        headers = member_headers(name, size)
        add(len(headers), data=headers)
        add(size, path=path)
        pad = _padding(size)
        add(pad, data=b"\0" * pad)
    add(2 * BLOCK, data=b"\0" * (2 * BLOCK))
    return ArchivePlan(folder, prefix, members, segments)
