"""Downloading an export from the service (the client side of ``evomerge download``):
wait for the export, stream its archive into ``OUT.tar.part`` resuming what is already
there (``Range`` + ``If-Range``), check the sha256, unpack into ``OUT``."""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.api.client import ApiError, Client

Progress = Callable[[str, int, int | None], None]  # (phase, done, total)


class DownloadError(RuntimeError):
    """The download could not be completed; the message says why and what to do."""


def wait_for_export(client: Client, study_id: str, trial: int | None, *, poll_s: float = 0.5,
                    timeout_s: float = 3600.0, progress: Progress | None = None) -> dict[str, Any]:
    """Ask for the export and wait until it is ready; returns its record."""
    export = client.export(study_id, trial)
    deadline = time.monotonic() + timeout_s
    while export["state"] in ("pending", "running"):
        if progress:
            progress("export", int(1000 * export.get("progress", 0.0)), 1000)
        if time.monotonic() > deadline:
            raise DownloadError(f"export {export['id']} was not ready after {timeout_s:.0f} s "
                                f"(state {export['state']}); try again later")
        time.sleep(poll_s)
        export = client.export_state(study_id, export["id"])
    if export["state"] != "ready":
        raise DownloadError(f"export {export['id']} of trial {export['trial_number']} is {export['state']}: "
                            f"{export.get('error') or 'no reason given'}")
    if progress:
        progress("export", 1000, 1000)
    return export


def fetch_archive(client: Client, export: dict[str, Any], part: Path, *,
                  progress: Progress | None = None, chunk_size: int = 1 << 20) -> Path:
    """Download the archive into ``part``, resuming it if it holds the start of the same archive
    (the ETag is the archive's sha256), and check the whole file's sha256."""
    size, sha = int(export["size_bytes"]), str(export["sha256"])
    etag = f'"{sha}"'
    have = part.stat().st_size if part.exists() else 0
    if have > size:
        part.unlink()
        have = 0
    if have < size:
        headers = {"Range": f"bytes={have}-", "If-Range": etag} if have else {}
        with client.stream(export["archive_url"], headers) as response:
            if response.headers.get("etag") != etag:
                raise DownloadError("the server's archive is not the one this export announced; ask again")
            if response.status_code == 200:  # the server sent everything: start over
                have = 0
            with open(part, "ab" if have else "wb") as out:
                for chunk in response.iter_bytes(chunk_size):
                    out.write(chunk)
                    have += len(chunk)
                    if progress:
                        progress("download", have, size)
    digest = hashlib.sha256()
    with open(part, "rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    if digest.hexdigest() != sha or part.stat().st_size != size:
        part.unlink()
        raise DownloadError(f"the downloaded archive does not match its sha256 ({sha}); it was removed, "
                            "run the command again")
    return part


def unpack(archive: Path, out: Path) -> Path:
    """Unpack the archive's single top folder as ``out`` (atomically: beside it, then renamed)."""
    tmp = out.parent / f".{out.name}.unpacking"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")  # refuses absolute paths, '..' and links out of tmp
    tops = list(tmp.iterdir())
    if len(tops) != 1 or not tops[0].is_dir():
        shutil.rmtree(tmp)
        raise DownloadError(f"{archive} does not hold one model folder")
    if out.exists():
        shutil.rmtree(out)
    tops[0].rename(out)
    tmp.rmdir()
    return out


def download(client: Client, study_id: str, out: Path, *, trial: int | None = None,
             keep_archive: bool = False, progress: Progress | None = None) -> dict[str, Any]:
    """The whole flow; returns the export record. ``out`` becomes the model folder."""
    try:
        export = wait_for_export(client, study_id, trial, progress=progress)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.parent / f"{out.name}.tar.part"
        archive = fetch_archive(client, export, part, progress=progress)
        final = out.parent / f"{out.name}.tar"
        archive.rename(final)
        unpack(final, out)
        if not keep_archive:
            final.unlink()
        return export
    except ApiError as exc:
        raise DownloadError(str(exc)) from None
