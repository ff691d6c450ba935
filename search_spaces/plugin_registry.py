"""One registry for every plugin kind: search spaces, optimizers, merge methods,
evaluators.

A plugin registers itself (``@registry.register``) when its module is imported; the
registry imports the modules of its package the first time it is asked for a name, so
adding a plugin is adding one module. An unknown name is refused with the kind's own
error type, the close matches and the known names.

Torch-free and dependency-free on purpose: every layer imports this module.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _default_names(item: Any) -> Iterable[str]:
    return (item.name,)


def _qualified(item: object) -> str:
    """``module.qualname`` of a class (or of an instance's class)."""
    cls = item if isinstance(item, type) else type(item)
    return f"{cls.__module__}.{cls.__qualname__}"


class Registry(Generic[T]):
    """Plugins of one kind by name, discovered lazily from a package.

    ``kind`` names the plugin kind in messages ("optimizer"); ``package`` is the dotted
    name of the package whose top-level modules define the plugins (None: plugins are
    registered explicitly); ``names`` gives an item's name(s) (default: its ``name``);
    ``error`` is the exception an unknown name raises; ``known`` starts the list of known
    names in that message; ``skip`` names modules of the package that are not plugins.
    """

    def __init__(self, kind: str, package: str | None = None, *,
                 names: Callable[[T], Iterable[str]] = _default_names,
                 error: type[Exception] = ValueError, known: str | None = None,
                 max_close: int = 2, cutoff: float = 0.6, quote_close: bool = False,
                 skip: Collection[str] = (), duplicate_error: type[Exception] = ValueError) -> None:
        self.kind = kind
        self.package = package
        self._names = names
        self.error = error
        self.known = known or f"Known {kind}s"
        self.max_close = max_close
        self.cutoff = cutoff
        self.quote_close = quote_close
        self.skip = frozenset(skip)
        self.duplicate_error = duplicate_error
        self._items: dict[str, T] = {}
        self._discovered = package is None

    # ---- registering -----------------------------------------------------------------
    def register(self, item: T) -> T:
        """Make ``item`` available under each of its names (usable as a decorator).

        Registering a second item under a taken name is refused; registering the same
        class again (same module and qualified name: a module imported twice), or an equal
        item, replaces it.
        """
        names = list(self._names(item))
        if not names or not all(isinstance(n, str) and n for n in names):
            raise TypeError(f"{_qualified(item)} needs a name to be registered as a {self.kind}")
        for name in names:
            other = self._items.get(name)
            if other is not None and other is not item and not self._same(other, item):
                raise self.duplicate_error(
                    f"{self.kind} {name!r} is registered twice: by {_qualified(other)} "
                    f"and by {_qualified(item)}"
                )
        for name in names:
            self._items[name] = item
        return item

    def unregister(self, name: str) -> T | None:
        """Remove a name (a plugin registered by a test); returns what it named."""
        return self._items.pop(name, None)

    @staticmethod
    def _same(a: object, b: object) -> bool:
        if isinstance(a, type) and isinstance(b, type):
            return _qualified(a) == _qualified(b)
        return a == b

    # ---- discovery -------------------------------------------------------------------
    def _discover(self) -> None:
        if self._discovered:
            return
        self._discovered = True  # first: a plugin module may ask its registry for a name
        assert self.package is not None
        try:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if info.ispkg or info.name.startswith("_") or info.name in self.skip:
                    continue
                importlib.import_module(f"{self.package}.{info.name}")
        except BaseException:
            self._discovered = False  # a broken plugin fails every lookup, not only the first
            raise

    # ---- lookup ----------------------------------------------------------------------
    def get(self, name: str) -> T:
        """The plugin named ``name``; an unknown name raises ``self.error``."""
        self._discover()
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise self.error(self.unknown_message(name)) from None

    def unknown_message(self, name: object) -> str:
        close = difflib.get_close_matches(str(name), list(self._items), n=self.max_close,
                                          cutoff=self.cutoff)
        shown = [repr(c) for c in close] if self.quote_close else close
        hint = f" Did you mean {', '.join(shown)}?" if close else ""
        return f"unknown {self.kind} {name!r}.{hint} {self.known}: {', '.join(self.names())}"

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self._discover()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        """``(name, plugin)`` in registration order."""
        self._discover()
        return list(self._items.items())

    def values(self) -> list[T]:
        """Each plugin once, in registration order (a plugin may have several names)."""
        self._discover()
        seen: list[T] = []
        for item in self._items.values():
            if not any(item is s for s in seen):
                seen.append(item)
        return seen

    def __contains__(self, name: object) -> bool:
        self._discover()
        return isinstance(name, str) and name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._discover()
        return len(self._items)
