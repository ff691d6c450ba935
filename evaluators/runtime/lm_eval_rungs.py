"""Racing's rungs on an :class:`LmEvalSuite`: score one candidate on growing, nested prefixes
of each task's seeded order of search examples, paying only for the examples each rung adds.

A rung of ``n`` examples scores, per task, the documents whose position in the seeded order
(``evaluators.subsets.seeded_order``) is below ``n``; the next rung runs the requests of the
documents it adds and aggregates their per-document metrics with those already scored, with
the task's own aggregation. So the last rung's results equal what ``LmEvalSuite.run`` gives on
the same documents, and a rung never scores an example twice.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from evaluators.runtime.lm_eval_suite import LmEvalSuite, answer_requests


@dataclass
class _Slice:
    """The documents a rung adds (per task, positions into ``run.docs``) and their requests."""

    docs: dict[str, list[int]]
    requests: dict[str, list]
    plans: dict[str, Any] = field(default_factory=dict)


class RungScorer:
    """One worker's rungs over a suite; ``start`` a candidate, then ``score`` growing sizes."""

    def __init__(self, suite: LmEvalSuite, *, fast_generate: bool = True) -> None:
        self.suite = suite
        self.fast_generate = fast_generate
        self._slices: dict[tuple[int, int], _Slice] = {}
        self._raw: dict[str, dict[tuple[str, str], list]] = {}
        self._done = 0  # examples per task scored for the current candidate

    def start(self) -> None:
        """A new candidate: forget what the previous one scored."""
        self._raw = {run.name: defaultdict(list) for run in self.suite.runs}
        self._done = 0

    def score(self, lm, examples: int) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
        """Results with the first ``examples`` of every task scored (and counts per task)."""
        if examples < self._done:
            raise ValueError(f"rungs grow: {examples} examples after {self._done}")
        if examples > self._done:
            self._run(lm, self._slice(lm, self._done, examples))
            self._done = examples
        results: dict[str, dict[str, Any]] = {}
        counts: dict[str, int] = {}
        for run in self.suite.runs:
            results[run.name], counts[run.name] = LmEvalSuite.aggregate(run, self._raw[run.name])
        for group in self.suite._groups_bottom_up():
            results[group.name] = group.aggregate(results)
        return results, counts

    def _slice(self, lm, lo: int, hi: int) -> _Slice:
        found = self._slices.get((lo, hi))
        if found is not None:
            return found
        docs: dict[str, list[int]] = {}
        requests: dict[str, list] = defaultdict(list)
        for run in self.suite.runs:
            picked = [i for i, p in enumerate(run.positions) if lo <= p < hi]
            docs[run.name] = picked
            for i in picked:
                for inst in run.by_doc[i]:
                    requests[inst.request_type].extend([inst] * inst.repeats)
        made = _Slice(docs, dict(requests))
        if self.fast_generate and "generate_until" in made.requests and hasattr(lm, "plan_generation"):
            made.plans["generate_until"] = lm.plan_generation(made.requests["generate_until"])
        self._slices[(lo, hi)] = made
        return made

    def _run(self, lm, piece: _Slice) -> None:
        runs = {run.name: run for run in self.suite.runs}
        for name, picked in piece.docs.items():
            for i in picked:
                for inst in runs[name].by_doc[i]:
                    inst.resps.clear()
                    inst.filtered_resps.clear()
        answer_requests(lm, piece.requests, piece.plans)
        for name, picked in piece.docs.items():
            if not picked:
                continue
            run = runs[name]
            instances = [inst for i in picked for inst in run.by_doc[i]]
            for ensemble in run.task._filters:
                ensemble.apply(instances)
            LmEvalSuite.doc_metrics(run, picked, self._raw[name])
