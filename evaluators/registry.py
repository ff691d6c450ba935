"""Evaluators by name. Adding one is one new module in this package that defines an
``Evaluator`` subclass decorated with ``@register`` (and keeps heavy imports inside its
methods, so that discovering it stays cheap).
"""

from __future__ import annotations

from evaluators.base import EvaluationSpec, Evaluator, SpecError
from search_spaces.plugin_registry import Registry

EVALUATORS: Registry[type[Evaluator]] = Registry(
    "evaluator", "evaluators", error=SpecError, known="Available", max_close=3, cutoff=0.5,
    quote_close=True, duplicate_error=TypeError)


def register(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} needs a class attribute `name` to be registered")
    return EVALUATORS.register(cls)


def available() -> list[str]:
    return EVALUATORS.names()


def get(name: str) -> type[Evaluator]:
    return EVALUATORS.get(name)


def validate_spec(spec: EvaluationSpec) -> EvaluationSpec:
    """Check a study's evaluation spec before any compute (no model, no torch)."""
    return get(spec.evaluator).validate(spec)


def create(spec: EvaluationSpec) -> Evaluator:
    """The evaluator a worker keeps for the whole study."""
    return get(spec.evaluator)(spec)
