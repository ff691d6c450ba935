"""Collecting the problems of a study: every check adds to one :class:`Problems`, and
:func:`~service.validation.study.validate_study` raises them all at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

from service.model_headers import ModelFormatError
from service.spec import Problem, StudySpec

Loc = list[Union[str, int]]


class Refusal(Exception):
    """A check that refuses one value: what is wrong, how to fix it, and the problem's type."""

    def __init__(self, msg: str, fix: str, kind: str) -> None:
        super().__init__(msg)
        self.msg, self.fix, self.kind = msg, fix, kind


@dataclass
class Problems:
    """The problems found so far, in the order they were found."""

    items: list[Problem] = field(default_factory=list)

    def add(self, loc: Sequence[Union[str, int]], msg: str, fix: str, kind: str = "invalid") -> None:
        self.items.append(Problem(loc=list(loc), msg=msg, fix=fix, type=kind))

    def refusal(self, loc: Sequence[Union[str, int]], err: Refusal | ModelFormatError) -> None:
        self.add(loc, err.msg, err.fix, err.kind)

    def under(self, loc: Sequence[Union[str, int]]) -> bool:
        n = len(loc)
        return any(list(p.loc[:n]) == list(loc) for p in self.items)


def spec_order(p: Problem) -> tuple[int, int]:
    """Problems in the order of the spec's fields (and of list items within a field)."""
    fields = list(StudySpec.model_fields)
    first = fields.index(p.loc[0]) if p.loc and p.loc[0] in fields else -1
    second = p.loc[1] if len(p.loc) > 1 and isinstance(p.loc[1], int) else -1
    return first, second
