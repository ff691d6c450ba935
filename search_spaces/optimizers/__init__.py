"""The optimizer registry.

Every module of this package that defines an optimizer registers it with ``@register``
(under each of its ``names``); adding an optimizer is adding one file here.
:func:`create_optimizer` builds one for a search space from an :class:`OptimizerSpec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from search_spaces.optimizers.base import (
    Failure,
    Optimizer,
    OptimizerError,
    OptimizerSpec,
    Point,
    Pruned,
)
from search_spaces.plugin_registry import Registry

if TYPE_CHECKING:
    from search_spaces.base import SearchSpace
    from search_spaces.genes import GeneSet

OPTIMIZERS: Registry[type[Optimizer]] = Registry(
    "optimizer", __name__, names=lambda cls: cls.names, skip=("base",))


def register(cls: type[Optimizer]) -> type[Optimizer]:
    """Class decorator: make an optimizer available under each of its ``names``."""
    return OPTIMIZERS.register(cls)


def get(name: str) -> type[Optimizer]:
    return OPTIMIZERS.get(name)


def names() -> list[str]:
    return OPTIMIZERS.names()


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
    to continue. ``spec.x0`` (a recipe) is encoded by the space; without it a space's
    own :meth:`~search_spaces.base.SearchSpace.start` is the start.
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
    elif isinstance(space, SearchSpace) and get(spec.name).uses_space_start:
        x0 = space.start()
        sigma = space.start_sigma()
        if x0 is not None and sigma is not None and spec.sigma0 is None:
            spec = spec.model_copy(update={"sigma0": sigma})
    return get(spec.name).create(spec, genes, x0, storage=storage, study_name=study_name, state=state)


__all__ = [
    "OPTIMIZERS",
    "Failure",
    "Optimizer",
    "OptimizerError",
    "OptimizerSpec",
    "Point",
    "Pruned",
    "create_optimizer",
    "get",
    "names",
    "register",
]
