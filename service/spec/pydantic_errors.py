"""Pydantic's validation errors as :class:`~service.spec.problems.Problem` objects: locations
that name only the user's fields, and a fix for each."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

from pydantic import BaseModel, ValidationError

from search_spaces import registry as space_registry
from search_spaces.sources import StudyRef
from service.spec.forms import DERIVED_FIELDS, SPACE_FORMS
from service.spec.problems import Problem

_TYPE_TAG = re.compile(
    r"^(int|float|str|bool|none|list\[.*\]|dict\[.*\]|tuple\[.*\]|set\[.*\]|literal\[.*\]|"
    r"function-\w+\[.*\]|constrained-.*|lax-.*|json-or-python\[.*\]|is-instance\[.*\]|chain\[.*\]|"
    r"path-or-hub-id|study-reference|nullable\[.*\]|union\[.*\])$"
)


def _clean_loc(loc: Iterable[Union[str, int]]) -> list[Union[str, int]]:
    """Drop pydantic's union-member tags from an error location (``['space', 'parameter', 'x']``
    -> ``['space', 'x']``) so that locations name only the user's fields."""
    out: list[Union[str, int]] = []
    kinds = set(space_registry.kinds())
    for item in loc:
        if isinstance(item, str) and _TYPE_TAG.match(item):
            continue
        if isinstance(item, str) and out and out[-1] == "space" and item in kinds:
            continue
        out.append(item)
    return out


def _fields_at(loc: Sequence[Union[str, int]]) -> list[str]:
    """The user's field names of the (nested) model at a raw pydantic ``loc``, when it can be followed."""
    from service.spec.study import StudySpec  # the spec's module reports its errors with this one

    current: Any = StudySpec
    for item in loc:
        if isinstance(item, int) or (isinstance(item, str) and _TYPE_TAG.match(item)):
            if item == "study-reference":
                current = StudyRef
            continue
        if current == "space" and item in SPACE_FORMS:
            current = SPACE_FORMS[str(item)]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        if current is StudySpec and item == "space":
            current = "space"
            continue
        info = current.model_fields.get(str(item))
        if info is None:
            return []
        current = _model_in(info.annotation)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    hidden = set(DERIVED_FIELDS.get(getattr(current.model_fields.get("kind"), "default", None) or "", ()))
    return [f for f in current.model_fields if f not in hidden]


def _model_in(annotation: Any) -> Any:
    """The one BaseModel class inside an annotation such as ``list[X] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [m for m in (_model_in(a) for a in getattr(annotation, "__args__", ()) or ()) if m is not None]
    return found[0] if len(found) == 1 else None


def _fix_for(error: Mapping[str, Any], loc: list[Union[str, int]], raw_loc: list[Union[str, int]]) -> str:
    """How to fix a pydantic error (``loc``: its cleaned location, ``raw_loc``: pydantic's)."""
    kind = error.get("type", "")
    field = str(loc[-1]) if loc else "the spec"
    if kind == "missing":
        return f"add `{field}`; docs/study-spec.md describes every field"
    if kind == "extra_forbidden":
        known = _fields_at(raw_loc[:-1])
        close = difflib.get_close_matches(field, known, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        listed = (f"the fields here are: {', '.join(known)}" if known
                  else "docs/study-spec.md lists the fields")
        return f"{hint}remove `{field}` ({listed})"
    if kind in ("union_tag_invalid", "union_tag_not_found") and loc[:1] == ["space"]:
        return f"set space.kind to one of: {', '.join(space_registry.kinds())}"
    if kind == "value_error":
        return "change the value as the message says"
    return "correct the value (docs/study-spec.md describes every field)"


def problems_from_pydantic(err: ValidationError, prefix: Sequence[Union[str, int]] = ()) -> list[Problem]:
    """A pydantic ``ValidationError`` as problems (locations under ``prefix``)."""
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors(include_url=False):
        loc = [*prefix, *_clean_loc(e["loc"])]
        msg = str(e["msg"]).removeprefix("Value error, ")
        key = (json.dumps(loc), msg)
        if key in seen:
            continue
        seen.add(key)
        out.append(Problem(loc=loc, msg=msg, fix=_fix_for(e, loc, [*prefix, *e["loc"]]), type=str(e["type"])))
    return out

