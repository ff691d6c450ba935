"""Source models of a search space, including the best model of another study.

A source is a model reference exactly as a recipe writes it (a local folder or a hub
id), or a :class:`StudyRef`: "the best (or the n-th) trial of study X". That is how a
layer-stacking study chains onto a finished parameter-space study ("PS then DFS").

A search space never resolves a study reference itself (it reads no weights and no
database). It writes the reference into the decoded recipe as a placeholder string
``study:<id>/best`` or ``study:<id>/trial/<n>``; the service calls
:func:`resolve_sources` with the path of each referenced model before it dispatches the
recipe to a worker. :func:`study_refs` lists what a recipe still needs resolved.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from search_spaces.recipe import Recipe

PLACEHOLDER_PREFIX = "study:"
_PLACEHOLDER = re.compile(r"^study:(?P<study>[A-Za-z0-9_.\-]+)/(?:(?P<best>best)|trial/(?P<trial>\d+))$")


class StudyRef(BaseModel):
    """The model of one trial of a study: ``{"study": "<id>", "trial": "best"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    study: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", description="id of the study")
    trial: Literal["best"] | Annotated[int, Field(ge=0, le=2**31 - 1)] = Field(
        default="best", description="'best' or a trial number of that study"
    )

    def placeholder(self) -> str:
        """The string that stands for this model in a recipe until the service resolves it."""
        tail = "best" if self.trial == "best" else f"trial/{self.trial}"
        return f"{PLACEHOLDER_PREFIX}{self.study}/{tail}"


# A source model: a path / hub id, or another study's model.
ModelRef = Union[str, StudyRef]


def model_string(ref: ModelRef) -> str:
    """The model reference as a recipe writes it (placeholders for study references)."""
    return ref.placeholder() if isinstance(ref, StudyRef) else ref


def source_letter(i: int) -> str:
    """A, B, …, Z, AA, AB, …: the short name of source model ``i`` in gene labels."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(65 + r) + out
    return out


def parse_placeholder(text: str) -> StudyRef | None:
    """The :class:`StudyRef` a placeholder string stands for, or None for a plain model."""
    m = _PLACEHOLDER.match(text)
    if not m:
        if text.startswith(PLACEHOLDER_PREFIX):
            raise ValueError(
                f"{text!r} looks like a study reference but is malformed: write "
                "'study:<id>/best' or 'study:<id>/trial/<n>'"
            )
        return None
    trial: Literal["best"] | int = "best" if m["best"] else int(m["trial"])
    return StudyRef(study=m["study"], trial=trial)


def study_refs(recipe: Recipe) -> list[StudyRef]:
    """The study references a recipe still holds, in first-seen order."""
    names = [*recipe.referenced_models()]
    if recipe.tokenizer_source and recipe.tokenizer_source != "base":
        names.append(recipe.tokenizer_source)
    found: dict[StudyRef, None] = {}
    for name in names:
        ref = parse_placeholder(name)
        if ref is not None:
            found[ref] = None
    return list(found)


Resolver = Union[Mapping[str, str], Callable[[StudyRef], str]]


def resolve_sources(recipe: Recipe, resolver: Resolver) -> Recipe:
    """A copy of ``recipe`` with every study placeholder replaced by a model path.

    ``resolver`` maps placeholder strings (``study:abc/best``) to paths, or is a
    function of the :class:`StudyRef`. A placeholder it cannot resolve raises
    ``KeyError`` naming it.
    """

    def fix(name: str) -> str:
        ref = parse_placeholder(name)
        if ref is None:
            return name
        if callable(resolver):
            return resolver(ref)
        if name not in resolver:
            raise KeyError(
                f"no model path for {name!r}: the study {ref.study!r} must be finished and "
                "its model exported before a recipe that uses it can run"
            )
        return resolver[name]

    return recipe.with_models_renamed(fix)
