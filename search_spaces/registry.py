"""The search-space registry.

A module of this package that defines a space registers it with ``@register_space``;
adding a space is adding one file. The registry finds them by importing the package's
top-level modules on first use (all pure Python and cheap to import; the optimizers
subpackage is not among them).

The service reads a study's ``search_space`` mapping with :func:`parse_space_spec` (or
uses :func:`space_spec_type` as a pydantic field type) and builds the space with
:func:`build_space`.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

import search_spaces
from search_spaces.base import SearchSpace, SpaceSpecBase

_SPACES: dict[str, type[SearchSpace]] = {}
_loaded = False


def register_space(cls: type[SearchSpace]) -> type[SearchSpace]:
    """Class decorator: make a space available under its ``kind``."""
    if cls.kind in _SPACES and _SPACES[cls.kind] is not cls:
        raise ValueError(f"search space kind {cls.kind!r} is registered twice")
    _SPACES[cls.kind] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(search_spaces.__path__):
        if not info.ispkg and info.name != "registry" and not info.name.startswith("_"):
            importlib.import_module(f"search_spaces.{info.name}")
    _loaded = True


def kinds() -> list[str]:
    _load_all()
    return sorted(_SPACES)


def space_class(kind: str) -> type[SearchSpace]:
    _load_all()
    try:
        return _SPACES[kind]
    except KeyError:
        close = difflib.get_close_matches(str(kind), _SPACES, n=2)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown search space kind {kind!r}.{hint} Known kinds: {', '.join(sorted(_SPACES))}"
        ) from None


def space_spec_type() -> Any:
    """The union of every registered spec, discriminated by ``kind`` (a pydantic type)."""
    _load_all()
    specs = tuple(cls.spec_class for cls in _SPACES.values())
    if len(specs) == 1:
        return specs[0]
    return Annotated[Union[specs], Field(discriminator="kind")]  # type: ignore[valid-type]


def parse_space_spec(data: Mapping[str, Any] | SpaceSpecBase) -> SpaceSpecBase:
    """Validate a space spec mapping (``kind`` picks the space)."""
    if isinstance(data, SpaceSpecBase):
        return data
    if not isinstance(data, Mapping) or "kind" not in data:
        raise ValueError(
            f"a search space spec is a mapping with a 'kind' ({' | '.join(kinds())}); got {data!r}"
        )
    cls = space_class(data["kind"])
    return TypeAdapter(cls.spec_class).validate_python(dict(data))


def build_space(spec: Mapping[str, Any] | SpaceSpecBase) -> SearchSpace:
    """The search space of a spec (a mapping or a validated spec model)."""
    parsed = parse_space_spec(spec)
    return space_class(parsed.kind)(parsed)
