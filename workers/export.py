"""Export of a finished trial to a Hugging Face model folder, content-addressed.

An export lives at ``<root>/<key>/`` where ``key`` is the sha256 of the canonical
recipe and of every source file the merge reads (:func:`export_key`), so asking twice
for the same merge of the same inputs returns the folder already made. A folder holds
the sharded safetensors and their index, ``config.json``, the tokenizer files,
``evomerge_recipe.yaml``, ``mergekit_config.yml`` (when mergekit can express the
recipe), a ``README.md`` model card, ``SHA256SUMS`` and, written last,
``evomerge_export.json`` (the :class:`ExportManifest`).

Atomicity: everything is built under ``<root>/.staging/<key>-<random>/`` and renamed
to ``<root>/<key>`` only once complete, manifest included, and fsynced. A folder at
``<root>/<key>`` holding a manifest is therefore complete; a crash at any point
leaves at most a staging folder, which is never served and which
:func:`cleanup_staging` removes (never the work of a live export: see
``workers.export_store`` for the locks that tell them apart).

This module reads weights (the worker side). It imports torch only inside the
functions that merge or hash models, so the pydantic models and :func:`load_export`
are cheap to import, but the API process must not import it anyway: it reads the
manifest's JSON and serves the folder through ``search_spaces.archive_format``.

Test hook: with ``EVOMERGE_EXPORT_TEST_SLEEP=<seconds>`` in the environment, an export
sleeps that long after merging its first tensor (announcing it on stderr), so a test
can kill it mid-merge.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from search_spaces.archive_format import MANIFEST, plan_archive
from search_spaces.lora_adapter import ADAPTER_FILES, is_adapter_folder, read_adapter
from search_spaces.recipe import Recipe
from search_spaces.tensor_names import COMPANION_FILES
from search_spaces.version import evomerge_version
from workers.export_manifest import (
    EXPORT_FORMAT,
    ExportCard,
    ExportFile,
    ExportManifest,
    ExportResult,
    ExportSource,
    SourceFile,
)
from workers.export_store import (
    DIGEST_CACHE,
    HASH_CHUNK,
    STAGING,
    DigestCache,
    StagingDir,
    cleanup_staging,
    file_sha256,
    fsync_path,
    is_key,
    remove_export,
)

if TYPE_CHECKING:
    from workers.plan import MergePlan

__all__ = [
    "ExportCard", "ExportFile", "ExportManifest", "ExportResult", "ExportSource", "SourceFile",
    "cleanup_staging", "export_key", "export_trial", "load_export", "remove_export", "run_export_task",
]

SUMS = "SHA256SUMS"
README = "README.md"
MERGEKIT_CONFIG = "mergekit_config.yml"
TEST_SLEEP_ENV = "EVOMERGE_EXPORT_TEST_SLEEP"
# shares of the progress fraction: merging, hashing the files, hashing the archive
_MERGE_SHARE, _SUMS_SHARE = 0.8, 0.1


# ---- the content address -----------------------------------------------------------------------
def source_refs(recipe: Recipe) -> list[str]:
    """Every model the merge reads, in recipe order (the tokenizer's source included)."""
    refs = recipe.referenced_models()
    if recipe.tokenizer_source not in (None, "base") and recipe.tokenizer_source not in refs:
        refs.append(recipe.tokenizer_source)
    return refs


def _source_paths(ref: str) -> tuple[Path, list[Path]]:
    """A source's folder and the files of it an export depends on: its weights, its
    config and its tokenizer files (a LoRA adapter: its config and weights)."""
    from workers.model_io import LazyModel

    if is_adapter_folder(Path(ref).expanduser()):
        folder = Path(ref).expanduser().resolve()
        files = [folder / name for name in ADAPTER_FILES]
    else:
        model = LazyModel(ref)
        try:
            folder, files = model.path, list(model.weight_files())
        finally:
            model.close()
        files.append(folder / "config.json")
    files += [folder / name for name in COMPANION_FILES]
    return folder, sorted({f for f in files if f.is_file()})


def _adapter_of(recipe: Recipe, ref: str) -> tuple[str | None, str | None]:
    """(the base a LoRA adapter source is composed onto, what the adapter is), or (None, None)."""
    if not is_adapter_folder(Path(ref).expanduser()):
        return None, None
    bases = {sl.base_model for sl in recipe.slices or [] if sl.base_model}
    return recipe.base_model or (bases.pop() if len(bases) == 1 else None), read_adapter(ref).summary()


def _content_address(recipe: Recipe, cache: DigestCache) -> tuple[str, list[ExportSource]]:
    sources = []
    for ref in source_refs(recipe):
        folder, files = _source_paths(ref)
        base, summary = _adapter_of(recipe, ref)
        sources.append(ExportSource(ref=ref, adapter_of=base, adapter=summary, files=[
            SourceFile(name=f.relative_to(folder).as_posix(), sha256=cache.digest(f),
                       size=f.stat().st_size)
            for f in files
        ]))
    cache.save()
    payload = {
        "format": EXPORT_FORMAT,
        "recipe": recipe.to_dict(),
        "sources": [{"ref": s.ref, "files": [[f.name, f.sha256] for f in s.files]} for s in sources],
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest(), sources


def export_key(recipe: Recipe, *, root: Path | None = None) -> str:
    """The content address of the export of ``recipe``: sha256 over the canonical recipe
    (sorted-key JSON, models referenced as given) and the sha256 of every file read
    from every source (weights, config, tokenizer). With ``root``, source digests are
    cached in ``root/.source_digests.json``."""
    cache = DigestCache(Path(root) / DIGEST_CACHE if root is not None else None)
    if root is not None:
        Path(root).mkdir(parents=True, exist_ok=True)
    return _content_address(recipe, cache)[0]


# ---- the export folder ---------------------------------------------------------------
def load_export(root: Path, key: str) -> ExportManifest | None:
    """The manifest of a complete export, else None (no folder, no or bad manifest)."""
    if not is_key(key):
        return None
    try:
        manifest = ExportManifest.model_validate_json((Path(root) / key / MANIFEST).read_bytes())
    except (OSError, ValidationError):
        return None
    return manifest if manifest.key == key else None


class _Progress:
    """Monotonic progress in [0, 1], reported when it moved by half a percent or more."""

    def __init__(self, callback: Callable[[float], None] | None, heartbeat: Callable[[], None]):
        self.callback = callback
        self.heartbeat = heartbeat
        self.last = -1.0
        self.value = 0.0

    def set(self, value: float, force: bool = False) -> None:
        self.value = min(1.0, max(self.value, value))
        self.heartbeat()
        if self.callback and self.value != self.last and (force or self.value - self.last >= 0.005):
            self.last = self.value
            self.callback(self.value)


def archive_name(card: ExportCard) -> str:
    """The folder name inside the download tar: ``evomerge-<study>-trial<N>``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", card.study_name or card.study_id).strip("-.")[:64]
    return f"evomerge-{slug or 'study'}-trial{card.trial_number}"


def _folder_files(folder: Path) -> list[tuple[str, Path]]:
    return sorted(
        (p.relative_to(folder).as_posix(), p) for p in folder.rglob("*") if p.is_file()
    )


def _run_merge(plan: MergePlan, out: Path, shard_size: str | int, progress: _Progress) -> None:
    from workers.merge import run_plan

    total = max(1, sum(t.nbytes for t in plan.tasks))
    done = 0
    sleep_s = float(os.environ.get(TEST_SLEEP_ENV) or 0)

    def on_tensor(nbytes: int) -> None:
        nonlocal done, sleep_s
        done += nbytes
        progress.set(_MERGE_SHARE * done / total)
        if sleep_s > 0:  # the test hook: hold still mid-merge so a test can kill us
            deadline = time.monotonic() + 10  # once the first shard is on disk (written on a thread)
            while not any(out.parent.rglob("*.safetensors*")) and time.monotonic() < deadline:
                time.sleep(0.01)
            print(f"{TEST_SLEEP_ENV}: sleeping {sleep_s} s", file=sys.stderr, flush=True)
            time.sleep(sleep_s)
            sleep_s = 0

    try:
        run_plan(plan, out, shard_size=shard_size, progress=on_tensor)
    finally:
        for model in plan.models.values():
            model.close()


def _mergekit_config(recipe: Recipe, out: Path) -> str | None:
    """Write mergekit_config.yml; return why not when mergekit cannot express the recipe."""
    from search_spaces.mergekit_format import NotExpressible, to_mergekit_yaml

    try:
        (out / MERGEKIT_CONFIG).write_text(to_mergekit_yaml(recipe))
    except NotExpressible as exc:
        return str(exc)
    return None


def _build(recipe: Recipe, out_parent: Path, key: str, card: ExportCard, sources: list[ExportSource],
           shard_size: str | int, progress: _Progress) -> tuple[Path, ExportManifest]:
    """Merge and write everything of an export into ``out_parent/model``."""
    from workers.export_card import render_readme  # torch, through workers.model_io
    from workers.plan import build_plan
    from workers.safetensors_writer import parse_size

    plan = build_plan(recipe)
    out = out_parent / "model"
    _run_merge(plan, out, shard_size, progress)
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    version = evomerge_version()
    note = _mergekit_config(recipe, out)
    title = archive_name(card)
    (out / README).write_text(render_readme(
        card=card, plan=plan, key=key, title=title, sources=sources, mergekit_note=note,
        evomerge_version=version, created_at=created_at,
    ))

    # SHA256SUMS over every file but itself and the manifest
    listed = [(rel, p) for rel, p in _folder_files(out) if rel not in (SUMS, MANIFEST)]
    total = max(1, sum(p.stat().st_size for _, p in listed))
    hashed = 0

    def on_sum_bytes(n: int) -> None:
        nonlocal hashed
        hashed += n
        progress.set(_MERGE_SHARE + _SUMS_SHARE * hashed / total)

    digests = {rel: file_sha256(p, on_sum_bytes) for rel, p in listed}
    (out / SUMS).write_text("".join(f"{sha}  {rel}\n" for rel, sha in digests.items()))
    digests[SUMS] = file_sha256(out / SUMS)

    archive = plan_archive(out, title)
    h = hashlib.sha256()
    read = 0
    for chunk in archive.iter_bytes(chunk_size=HASH_CHUNK):
        h.update(chunk)
        read += len(chunk)
        progress.set(_MERGE_SHARE + _SUMS_SHARE + (1 - _MERGE_SHARE - _SUMS_SHARE) * read / archive.size)
    manifest = ExportManifest(
        key=key, study_id=card.study_id, study_name=card.study_name, trial_number=card.trial_number,
        files=[ExportFile(name=rel, size=(out / rel).stat().st_size, sha256=sha)
               for rel, sha in sorted(digests.items())],
        archive_prefix=title, archive_sha256=h.hexdigest(), archive_size=archive.size,
        created_at=created_at, evomerge_version=version, sources=sources,
        recipe=recipe.to_dict(), mergekit_config=note is None, mergekit_note=note,
        shard_size=parse_size(shard_size), card=card,
    )
    for _, p in _folder_files(out):
        fsync_path(p)
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    fsync_path(out / MANIFEST)
    fsync_path(out, directory=True)
    return out, manifest


def export_trial(
    recipe: Recipe,
    root: Path,
    card: ExportCard,
    *,
    shard_size: str | int = "5GB",
    progress: Callable[[float], None] | None = None,
) -> ExportResult:
    """Export ``recipe`` to ``root/<key>`` (or return the export already there).

    ``progress`` receives a fraction in [0, 1]: 0.8 of it is the merge, the rest the
    hashing of the written files. The source files are hashed first (cached), to
    compute the key.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cleanup_staging(root)
    cache = DigestCache(root / DIGEST_CACHE)
    key, sources = _content_address(recipe, cache)
    final = root / key
    existing = load_export(root, key)
    if existing is not None:
        if progress:
            progress(1.0)
        return ExportResult(key=key, path=final, manifest=existing, reused=True)

    staging = StagingDir(root, key)
    try:
        report = _Progress(progress, staging.heartbeat)
        report.set(0.0, force=True)
        out, manifest = _build(recipe, staging.path, key, card, sources, shard_size, report)
        changed = cache.changed()
        if changed:
            raise RuntimeError(
                f"source files changed during the export: {[str(p) for p in changed]}; export again"
            )
        for attempt in range(2):
            try:
                os.rename(out, final)
                break
            except OSError:
                won = load_export(root, key)
                if won is not None:  # another export of the same key finished first
                    return ExportResult(key=key, path=final, manifest=won, reused=True)
                if attempt or not final.exists():
                    raise
                # an incomplete folder at the final path (not made by us): set it aside
                os.rename(final, root / STAGING / f"trash-{key}-{secrets.token_hex(6)}")
        fsync_path(root, directory=True)
        report.set(1.0, force=True)
    finally:
        staging.close()
    return ExportResult(key=key, path=final, manifest=manifest, reused=False)


def run_export_task(recipe: dict[str, Any], root: str, card: dict[str, Any], shard_size: str,
                    progress_path: str) -> dict[str, Any]:
    """The body of the controller's export Ray task (``service.export_runner``): plain data in
    and out; the progress fraction is written to ``progress_path`` (at most twice a second)."""
    last = [0.0]

    def progress(fraction: float) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.5 or fraction >= 1.0:
            last[0] = now
            Path(progress_path).write_text(f"{fraction:.4f}")

    result = export_trial(Recipe.model_validate(recipe), Path(root), ExportCard.model_validate(card),
                          shard_size=shard_size, progress=progress)
    return {"key": result.key, "path": str(result.path), "reused": result.reused,
            "manifest": result.manifest.model_dump(mode="json")}


# ---- command line ----------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.export",
        description="Export a recipe to a content-addressed Hugging Face model folder.",
    )
    parser.add_argument("--recipe", required=True, help="recipe file (YAML or JSON)")
    parser.add_argument("--root", required=True, help="export root (folders are <root>/<key>)")
    parser.add_argument("--card", help="ExportCard as JSON (study, trial, scores); default: a stub")
    parser.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = parser.parse_args(argv)
    recipe = Recipe.from_file(args.recipe)
    if args.card:
        card = ExportCard.model_validate_json(Path(args.card).read_text())
    else:
        card = ExportCard(study_id="cli", study_name="cli", trial_number=0, spec={}, optimizer={},
                          scores={})
    try:
        result = export_trial(recipe, Path(args.root), card, shard_size=args.shard_size)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(result.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
