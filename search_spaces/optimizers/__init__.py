"""The optimizer registry.

Every module of this package that defines an optimizer registers it with ``@register``
(under each of its ``names``); adding an optimizer is adding one file here.
:func:`create_optimizer` builds one for a search space from an :class:`OptimizerSpec`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from search_spaces.optimizers.base import (
    Failure,
    Optimizer,
    OptimizerError,
    OptimizerSpec,
    Point,
)

if TYPE_CHECKING:
    from search_spaces.base import SearchSpace
    from search_spaces.genes import GeneSet

_REGISTRY: dict[str, type[Optimizer]] = {}
_loaded = False


def register(cls: type[Optimizer]) -> type[Optimizer]:
    """Class decorator: make an optimizer available under each of its ``names``."""
    for name in cls.names:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"optimizer {name!r} is registered twice")
        _REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get(name: str) -> type[Optimizer]:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown optimizer {name!r}.{hint} Known optimizers: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def create_optimizer(
    spec: OptimizerSpec | dict[str, Any],
    space: SearchSpace | GeneSet,
    *,
    storage: Any = None,
    study_name: str | None = None,
    state: bytes | None = None,
) -> Optimizer:
    """An optimizer for ``space``.

    Optuna-based optimizers keep their state in ``storage`` (an Optuna storage or URL;
    in memory when None) under ``study_name``: a new optimizer on the same study
    continues it. ``cma`` keeps its own state: pass the bytes of its last ``state()``
    to continue. ``spec.x0`` (a recipe) is encoded by the space.
    """
    from search_spaces.base import SearchSpace

    if not isinstance(spec, OptimizerSpec):
        spec = OptimizerSpec.model_validate(spec)
    genes = space.genes if isinstance(space, SearchSpace) else space
    x0 = None
    if spec.x0 is not None:
        if not isinstance(space, SearchSpace):
            raise OptimizerError("x0 is a recipe: pass the search space (it encodes the recipe)")
        x0 = space.encode(spec.x0)
    return get(spec.name).create(spec, genes, x0, storage=storage, study_name=study_name, state=state)


__all__ = [
    "Failure",
    "Optimizer",
    "OptimizerError",
    "OptimizerSpec",
    "Point",
    "create_optimizer",
    "get",
    "names",
    "register",
]
