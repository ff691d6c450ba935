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
    k = n_docs if limit is None else (math.ceil(n_docs * limit) if limit < 1 else min(int(limit), n_docs))
    if subset == "search" and k >= n_docs:
        return None
    order = list(range(n_docs))
    random.Random(f"{seed}:{task}").shuffle(order)
    chosen = sorted(order[:k] if subset == "search" else order[k:])
    if not chosen:
        raise SpecError(
            f"task {task!r}: no held-out examples (limit {limit} covers all {n_docs}); "
            "set a smaller limit for the search"
        )
    return chosen
