"""Local paths a study names (models, task folders, files) must lie under the allowed roots."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from service.model_headers import inside
from service.validation.problems import Refusal


def real_roots(roots: Sequence[Union[str, Path]]) -> list[Path]:
    return [Path(os.path.realpath(r)) for r in roots]


def roots_text(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots) or "(none)"


def close_entries(text: str, roots: Sequence[Path]) -> str:
    """' Close matches: …' among the folders next to where a relative path was looked for."""
    rel = Path(text)
    names: list[str] = []
    for root in roots:
        parent = root / rel.parent
        if parent.is_dir() and inside(Path(os.path.realpath(parent)), roots):
            try:
                names += [str(rel.parent / p.name) if str(rel.parent) != "." else p.name
                          for p in parent.iterdir() if p.is_dir()][:1000]
            except OSError:
                continue
    close = difflib.get_close_matches(text, names, n=3, cutoff=0.6)
    return f" Close matches: {', '.join(close)}." if close else ""


def resolve_under_roots(text: str, roots: Sequence[Path], *, what: str = "model") -> Path:
    """The real path of a local path that must lie inside one of ``roots`` (real paths).

    Absolute paths are taken as they are; relative ones are looked up under each root in
    order. Symlinks are followed before the check, so a link that leads out is refused;
    the refusal never says whether the outside path exists.
    """
    missing = what.replace(" ", "_") + "_not_found"
    if not roots:
        raise Refusal(
            f"{what} {text!r} is a local path, but this server allows no local paths (no model roots)",
            "ask an administrator to set EVOMERGE_MODEL_ROOTS, or use an allowed hub id",
            "no_model_roots",
        )
    if "\x00" in text:
        raise Refusal(f"{what} path {text!r} is not a valid path", "remove the NUL character", "bad_path")
    path = Path(text)
    if path.is_absolute():
        candidate = path
    else:
        found = [r / path for r in roots if os.path.lexists(r / path)]
        if not found:
            escapes = not all(inside(Path(os.path.realpath(r / path)), roots) for r in roots)
            if ".." in path.parts and escapes:  # worded as for an existing path: existence is not told
                raise Refusal(
                    f"{what} path {text!r} is outside the allowed roots ({roots_text(roots)})",
                    f"copy or move the {what} into one of the roots (a symlink that points outside is "
                    "refused)",
                    "path_outside_roots",
                )
            raise Refusal(
                f"{what} {text!r} not found under the allowed roots ({roots_text(roots)})."
                f"{close_entries(text, roots)}",
                "give its path relative to a root, or its absolute path inside one",
                missing,
            )
        candidate = found[0]
    real = Path(os.path.realpath(candidate))
    if not inside(real, roots):
        via = "resolves through a symlink to a location" if real != Path(os.path.abspath(candidate)) else "is"
        raise Refusal(
            f"{what} path {text!r} {via} outside the allowed roots ({roots_text(roots)})",
            f"copy or move the {what} into one of the roots (a symlink that points outside is refused)",
            "path_outside_roots",
        )
    if not real.exists():
        raise Refusal(f"{what} {text!r} not found (looked at {candidate})",
                       "check the path; relative paths are relative to a root", missing)
    return real

