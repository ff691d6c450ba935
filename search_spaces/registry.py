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

from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from search_spaces.base import SearchSpace, SpaceSpecBase
from search_spaces.plugin_registry import Registry

SPACES: Registry[type[SearchSpace]] = Registry(
    "search space kind", "search_spaces", names=lambda cls: (cls.kind,), known="Known kinds",
    skip=("registry",))


def register_space(cls: type[SearchSpace]) -> type[SearchSpace]:
    """Class decorator: make a space available under its ``kind``."""
    return SPACES.register(cls)


def kinds() -> list[str]:
    return SPACES.names()


def space_class(kind: str) -> type[SearchSpace]:
    return SPACES.get(kind)


def space_spec_type() -> Any:
    """The union of every registered spec, discriminated by ``kind`` (a pydantic type)."""
    specs = tuple(cls.spec_class for cls in SPACES.values())
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
