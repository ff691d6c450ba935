"""A problem with a study spec, and the error that lists them (a 422 response's ``detail``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Union

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """One thing wrong with a study spec (an item of a 422 response's ``detail``)."""

    loc: list[Union[str, int]] = Field(
        description="where: e.g. ['sources', 1] or ['evaluation', 'objectives', 0, 'task']"
    )
    msg: str = Field(description="what is wrong")
    fix: str = Field(description="how to fix it")
    type: str = Field(default="invalid", description="a stable kind for programs, e.g. path_outside_roots")


class StudyValidationError(ValueError):
    """A study spec that cannot run; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        lines = [f"{len(self.problems)} problem(s) with the study spec:"]
        for p in self.problems:
            where = ".".join(str(x) for x in p.loc) or "(spec)"
            lines.append(f"- {where}: {p.msg} — fix: {p.fix}")
        return "\n".join(lines)

    def detail(self) -> list[dict[str, Any]]:
        """The problems as plain dicts, for a 422 response body."""
        return [p.model_dump() for p in self.problems]

