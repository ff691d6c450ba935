"""evomerge's version: one source of truth, ``version`` in pyproject.toml.

An installed distribution (``pip install``, editable or not) carries it in its metadata.
A source tree used without installing it (``PYTHONPATH=.``) has no metadata, so the
version is then read from the pyproject.toml beside the packages; failing both it is
``0+unknown``, never an error. Shared by the service (``service.__version__``, the API)
and the workers (the export manifest and model card).
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "evomerge"
UNKNOWN = "0+unknown"
_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
_PROJECT_VERSION = re.compile(r'^version\s*=\s*"([^"]+)"\s*$', re.MULTILINE)


def _from_pyproject(path: Path = _PYPROJECT) -> str | None:
    """``[project] version`` of a pyproject.toml (a regular expression: tomllib is 3.11+)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    section = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    found = _PROJECT_VERSION.search(section.group(1)) if section else None
    return found.group(1) if found else None


def evomerge_version() -> str:
    """The installed distribution's version, else the source tree's, else ``0+unknown``."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return _from_pyproject() or UNKNOWN


__version__ = evomerge_version()
