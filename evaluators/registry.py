"""Evaluators by name. Adding one is one new module in this package that defines an
``Evaluator`` subclass decorated with ``@register`` (and keeps heavy imports inside its
methods, so that discovering it stays cheap).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from pathlib import Path

from evaluators.base import EvaluationSpec, Evaluator, SpecError

_REGISTRY: dict[str, type[Evaluator]] = {}
_discovered = False


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
    other = _REGISTRY.get(name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"evaluator name {name!r} is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    """Import the top-level modules of this package once (subpackages are helpers)."""
    global _discovered
    if _discovered:
        return
    here = Path(__file__).parent
    for info in pkgutil.iter_modules([str(here)]):
        if not info.ispkg and not info.name.startswith("_"):
            importlib.import_module(f"evaluators.{info.name}")
    _discovered = True


def available() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get(name: str) -> type[Evaluator]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise SpecError(
            f"unknown evaluator {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def validate_spec(spec: EvaluationSpec) -> EvaluationSpec:
    """Check a study's evaluation spec before any compute (no model, no torch)."""
    return get(spec.evaluator).validate(spec)


def create(spec: EvaluationSpec) -> Evaluator:
    """The evaluator a worker keeps for the whole study."""
    return get(spec.evaluator)(spec)
