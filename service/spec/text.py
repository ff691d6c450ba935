"""Reading a study spec's text: YAML or JSON, with a key given twice refused, and every syntax
error as a :class:`~service.spec.problems.Problem`."""

from __future__ import annotations

import json
from typing import Any

import yaml

from service.spec.problems import Problem, StudyValidationError
from service.spec_limits import MAX_DEPTH, MAX_TEXT_BYTES


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice (YAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice (line {seen[key] + 1} and line {mark.line + 1})",
                mark,
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _DuplicateKey(ValueError):
    pass


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def parse_text(text: str | bytes) -> Any:
    """YAML or JSON text -> data; a syntax error becomes a :class:`StudyValidationError`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise StudyValidationError([Problem(
                loc=[], msg="the study spec is not UTF-8 text", fix="save the file as UTF-8",
                type="spec_not_text")]) from None
    if len(text) > MAX_TEXT_BYTES:
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec has {len(text)} characters, more than {MAX_TEXT_BYTES}",
            fix="a study spec names its models and tasks; it does not carry them", type="spec_too_large")])
    if not text.strip():
        raise StudyValidationError([Problem(loc=[], msg="the study spec is empty",
                                            fix="write a spec (docs/study-spec.md has a complete example)",
                                            type="spec_empty")])
    try:
        if text.lstrip()[:1] in ("{", "["):  # JSON: parsed as JSON (a YAML parser splits surrogate pairs)
            try:
                return json.loads(text, object_pairs_hook=_unique_json_keys)
            except json.JSONDecodeError:
                pass  # YAML's flow style, e.g. unquoted keys
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec nests too deeply (more than {MAX_DEPTH} levels are never needed)",
            fix="flatten it: no field of a study spec nests that deep", type="spec_too_deep")]) from None
    except _DuplicateKey as err:
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec is not valid JSON: {err}", fix="give each key once",
            type="spec_syntax")]) from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise StudyValidationError([Problem(
            loc=[], msg="the study spec holds a value that cannot be read (e.g. a number of thousands of "
            "digits)", fix="give numbers within their bounds (docs/study-spec.md)",
            type="spec_syntax")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err)
        if getattr(err, "context", None) and "appears twice" not in str(what):
            what = f"{err.context}: {what}"
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec is not valid YAML or JSON{where}: {what}",
            fix="fix the syntax there (indentation with spaces, a space after each ':', quotes around "
            "values with ': ' or '#')",
            type="spec_syntax",
        )]) from None
