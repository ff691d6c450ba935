"""The merge methods' arithmetic, found from their declarations.

A method is its declaration in ``search_spaces.merge_methods`` (torch-free: every fact
about it) and one small module here whose ``MergeMethod`` subclass is decorated with
``@implements(name)``. ``get(name)`` finds the declaration (an unknown name is refused
with the close matches), imports the module its ``implementation`` names and returns
the method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from search_spaces import merge_methods
from search_spaces.method_declaration import MethodDeclaration
from workers.methods.base import MergeError, MergeInputs, MergeMethod, ParamSpec, _Declared

M = TypeVar("M", bound=type[MergeMethod])

_CLASSES: dict[str, type[MergeMethod]] = {}  # bound by @implements
_INSTANCES: dict[str, MergeMethod] = {}


def implements(name: str) -> Callable[[M], M]:
    """Class decorator: ``cls`` is the arithmetic of the declared method ``name``.

    The class takes every fact from the declaration; it may not set one itself (each
    fact is written once, in the declaration).
    """
    declaration = merge_methods.get(name)

    def bind(cls: M) -> M:
        declared = {k for k, v in vars(MergeMethod).items() if isinstance(v, _Declared)}
        for klass in cls.__mro__[: cls.__mro__.index(MergeMethod)]:
            written = declared & set(vars(klass))
            if written:
                raise TypeError(f"{klass.__qualname__} sets {sorted(written)}: a method's facts are "
                                f"its declaration's (search_spaces.merge_methods, {name!r})")
        cls.declaration = declaration
        _CLASSES[name] = cls
        _INSTANCES.pop(name, None)
        return cls

    return bind


def implementation(declaration: MethodDeclaration) -> type[MergeMethod]:
    """The class that implements a declaration (imported from ``declaration.implementation``
    unless a class bound to it by ``@implements`` is already known)."""
    cls = _CLASSES.get(declaration.name)
    if cls is None or cls.declaration is not declaration:
        module, _, qualname = declaration.implementation.partition(":")
        found: object = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        cls = found  # type: ignore[assignment]
    if not (isinstance(cls, type) and issubclass(cls, MergeMethod)) or cls.declaration is not declaration:
        raise MergeError(
            f"merge method {declaration.name!r}: {declaration.implementation} does not implement it "
            f"(a MergeMethod subclass decorated with @implements({declaration.name!r}))"
        )
    return cls


def get(name: str) -> MergeMethod:
    """The method named ``name``; an unknown name raises :class:`MergeError`."""
    declaration = merge_methods.get(name)
    method = _INSTANCES.get(name)
    if method is None or method.declaration is not declaration:
        method = _INSTANCES[name] = implementation(declaration)()
    return method


def names() -> list[str]:
    return merge_methods.names()


__all__ = ["MergeError", "MergeInputs", "MergeMethod", "ParamSpec", "get", "implementation", "implements",
           "names"]
