"""Which examples a task is scored on: the same seeded subset for every candidate."""

from __future__ import annotations

import math
import random

from evaluators.base import SpecError


def select_indices(n_docs: int, limit: int | float | None, seed: int, task: str,
                   subset: str = "search") -> list[int] | None:
    """Sorted example indices to score, or None for all of them.

    ``search`` is a seeded random subset of ``limit`` examples (a count, or a fraction
    below 1), identical for every candidate and every worker with the same seed;
    ``holdout`` is the complement, for re-scoring the best candidates at the end.
    """
    k = search_size(n_docs, limit)
    if subset == "search" and k >= n_docs:
        return None
    order = seeded_order(n_docs, seed, task)
    chosen = sorted(order[:k] if subset == "search" else order[k:])
    if not chosen:
        raise SpecError(
            f"task {task!r}: no held-out examples (limit {limit} covers all {n_docs}); "
            "set a smaller limit for the search"
        )
    return chosen


def search_size(n_docs: int, limit: int | float | None) -> int:
    """How many examples ``limit`` (a count, a fraction below 1, or None: all) selects."""
    return n_docs if limit is None else (math.ceil(n_docs * limit) if limit < 1 else min(int(limit), n_docs))


def seeded_order(n_docs: int, seed: int, task: str) -> list[int]:
    """The task's examples in the seeded order the search subset is the first ``k`` of.

    Racing's rungs are prefixes of this order: a rung's examples are all in the next rung's.
    """
    order = list(range(n_docs))
    random.Random(f"{seed}:{task}").shuffle(order)
    return order


def rung_ranks(n_docs: int, limit: int | float | None, seed: int, task: str) -> dict[int, int]:
    """Each search example's position in the seeded order (a rung of ``n`` examples scores
    those with position < n)."""
    order = seeded_order(n_docs, seed, task)[:search_size(n_docs, limit)]
    return {doc: pos for pos, doc in enumerate(order)}
