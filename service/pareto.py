"""The Pareto front of a multi-objective study (every value is to be maximized)."""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is at least as good as ``b`` everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b, strict=True)) and any(x > y for x, y in zip(a, b, strict=True))


def pareto_front(points: Sequence[tuple[int, Sequence[float]]]) -> list[int]:
    """The keys of the non-dominated points, in the order given.

    Points with equal values are all kept (neither dominates the other). Quadratic, which
    is fine for the few thousand trials of a study; a sort-based sweep would pay off only
    far beyond that.
    """
    front = []
    for key, values in points:
        if not any(dominates(other, values) for _, other in points):
            front.append(key)
    return front
