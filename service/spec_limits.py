"""The bounds every study spec is held to, and the shape check that runs before pydantic.

A spec is parsed from text a stranger sent, so its shape is checked before any model is
built from it: how deep it nests, how long its lists, mappings and strings are, how many
values it holds in all, how large its integers are, and that every string is valid
Unicode without NUL. The walk is iterative and stops at the first limit it crosses, so a
YAML alias bomb or a 10,000-level nesting costs microseconds, not minutes.

The per-field bounds (``population_size``, ``granularity``, ``limit``, …) sit on the
fields themselves and read their numbers from here; docs/study-spec.md lists them all.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from typing import Any, Union

# ---- the structure of any spec ---------------------------------------------------------
MAX_DEPTH = 32  # nested mappings and lists
MAX_LIST_ITEMS = 1024  # items of any one list
MAX_MAPPING_KEYS = 256  # keys of any one mapping
MAX_STRING_CHARS = 16_384  # characters of any one string (a system instruction is the longest)
MAX_VALUES = 20_000  # values in the whole spec (aliases counted each time they are used)
MAX_ABS_INT = 2**53  # integers beyond it are no count, seed or size a study can use
MAX_TEXT_BYTES = 1_000_000  # the spec's text (the API's body limit is EVOMERGE_MAX_BODY_BYTES)

# ---- the study (the bounds of its parts live beside their fields: evaluators.base,
# search_spaces.optimizers.base, the spaces; docs/study-spec.md lists every one) ----------
MAX_NAME_CHARS = 200
MAX_SEED = 2**32 - 1  # what numpy's and Optuna's samplers take
MAX_TASK_DIRS = 16
MAX_TASK_DIR_ENTRIES = 2_000  # files and folders in one task directory, all levels
MAX_TASK_FILE_BYTES = 1_000_000  # one task YAML file read to check what it names


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None. NUL breaks PostgreSQL; a lone surrogate is not
    Unicode (a JSON ``\\ud83e\\uddea`` pair is one character and is fine)."""
    if "\x00" in text:
        return "contains a NUL character"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        return "contains a lone UTF-16 surrogate (not valid Unicode)"
    return None


def control_characters(text: str) -> list[str]:
    """The control characters in ``text`` (for names shown to people), as U+XXXX."""
    return sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cc"})


Loc = list[Union[str, int]]


def shape_problems(data: Any) -> list[tuple[Loc, str, str]]:
    """``(loc, what is wrong, how to fix it)`` for the first limit ``data`` crosses (empty: fine).

    Iterative, so that depth costs no Python stack, and it stops early.
    """
    stack: list[tuple[Any, Loc, int]] = [(data, [], 0)]
    seen = 0
    while stack:
        value, loc, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            return [([], f"the spec holds more than {MAX_VALUES} values",
                     "a study spec names models and tasks; it does not carry data (YAML aliases count "
                     "each time they are used)")]
        if depth > MAX_DEPTH:
            return [(loc[:MAX_DEPTH], f"the spec nests more than {MAX_DEPTH} levels deep",
                     "flatten it: no field of a study spec nests that deep (docs/study-spec.md)")]
        if isinstance(value, str):
            problem = _bad_text(value)
            if problem:
                return [(loc, f"the text {problem}", "remove that character")]
            if len(value) > MAX_STRING_CHARS:
                return [(loc, f"a text of {len(value)} characters exceeds {MAX_STRING_CHARS}",
                         "shorten it")]
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            continue
        elif isinstance(value, int):
            if abs(value) > MAX_ABS_INT:
                return [(loc, f"an integer of {value.bit_length()} bits is beyond any bound of a study "
                         f"spec (at most {MAX_ABS_INT})",
                         "give a number within the field's bound (docs/study-spec.md lists them)")]
        elif isinstance(value, Mapping):
            if len(value) > MAX_MAPPING_KEYS:
                return [(loc, f"a mapping of {len(value)} keys exceeds {MAX_MAPPING_KEYS}", "remove keys")]
            for key, item in value.items():
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    return [(loc, f"a key of type {type(key).__name__} is not allowed",
                             "write keys as plain text")]
                text = str(key)
                problem = _bad_text(text) or ("is longer than 200 characters" if len(text) > 200 else None)
                if problem:
                    return [(loc, f"a key {problem}", "rename the key")]
                stack.append((item, [*loc, text], depth + 1))
        elif isinstance(value, (list, tuple)):
            if len(value) > MAX_LIST_ITEMS:
                return [(loc, f"a list of {len(value)} items exceeds {MAX_LIST_ITEMS}",
                         "shorten the list (docs/study-spec.md gives each list's bound)")]
            stack.extend((item, [*loc, i], depth + 1) for i, item in enumerate(value))
        else:  # YAML dates, binary, sets: not JSON
            return [(loc, f"a value of type {type(value).__name__} is not JSON",
                     "quote it to make it text, or write a number, true/false, a list or a mapping")]
    return []
