"""The merge-method registry.

Every module in this package that defines a method registers it with ``@register``;
adding a method is adding one file here. ``get(name)`` finds a method by name and
refuses unknown names with the close matches.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil

from workers.methods.base import MergeError, MergeInputs, MergeMethod, ParamSpec

_REGISTRY: dict[str, MergeMethod] = {}
_loaded = False


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def get(name: str) -> MergeMethod:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise MergeError(
            f"unknown merge method {name!r}.{hint} Known methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


__all__ = ["MergeError", "MergeInputs", "MergeMethod", "ParamSpec", "get", "names", "register"]
