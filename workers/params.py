"""Resolving a recipe parameter to its value for one tensor.

A value is a scalar, a per-layer list, or a list of filtered values. A per-layer list
of ``n`` values is a gradient over the layers of a slice: layer ``i`` of ``L`` sits at
``t = i / (L - 1)`` and takes the linear interpolation of the list at ``t * (n - 1)``
(mergekit's rule; a list of exactly ``L`` values gives each layer its own value).
Tensors outside the layers (embeddings, final norm, head) sit at ``t = 0``.

Precedence, first match wins: the slice source's parameters, the model's parameters,
the slice's parameters, the recipe's global parameters, the method's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from search_spaces.recipe import evaluate_setting, resolve_setting
from workers.architecture import CATEGORIES, category


def filter_matches(flt: str | None, tensor_name: str) -> bool:
    if flt is None or flt == "*":
        return True
    if flt in CATEGORIES:
        return category(tensor_name) == flt
    return flt in tensor_name


def evaluate(setting: Any, tensor_name: str, pos: Fraction | float) -> Any:
    """Value of one setting for a tensor at relative depth ``pos`` (None: no match)."""
    return evaluate_setting(setting, lambda flt: filter_matches(flt, tensor_name), pos)


def layer_position(index_in_slice: int, slice_length: int) -> Fraction:
    """Relative depth of a layer inside its slice (exact, so lists of L values hit)."""
    if slice_length <= 1:
        return Fraction(1)
    return Fraction(index_in_slice, slice_length - 1)


def resolve(
    name: str,
    scopes: Sequence[dict[str, Any] | None],
    tensor_name: str,
    pos: Fraction | float,
) -> Any:
    """First value of ``name`` found in ``scopes`` (most specific first), else None."""
    return resolve_setting(name, scopes, lambda flt: filter_matches(flt, tensor_name), pos)
