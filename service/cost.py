"""What a study spent on evaluation, and what pruning and the score cache saved it.

Every trial and baseline row holds its own cost (``examples``, ``tokens``, ``worker_seconds``:
what its worker reported, ``workers.trial.TrialCost``); a cache hit (``cached``) holds the cost
it saved, not spent. :func:`recount` sums the rows with one grouped query per table, never
incrementing, so that a replayed result cannot count twice; the recorder writes the sum to
``Study.cost`` with every result, and the scheduler checks the cost budgets against it.

A pruned trial (multi-fidelity racing) saved the examples it was not scored on: the full
examples per candidate (:func:`full_examples`) less those it scored, and about as many
worker-seconds as its seconds per example times those examples.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field
from sqlalchemy import Float, case, cast, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.db import Baseline, Trial, TrialState
from service.spec.bounds import MAX_TRIALS

if TYPE_CHECKING:
    from evaluators.base import EvaluationSpec
    from service.runtime import StudyRuntime
    from service.spec.study import Budget

# the states whose trials ran on a worker (a cancelled one was stopped, a pending one never ran)
RAN = (TrialState.COMPLETE, TrialState.FAILED, TrialState.PRUNED)


class Spent(BaseModel):
    """Examples scored, tokens through the model and seconds on workers, over ``trials`` rows."""

    examples: int = Field(default=0, ge=0)
    tokens: int = Field(default=0, ge=0)
    worker_seconds: float = Field(default=0.0, ge=0.0)
    trials: int = Field(default=0, ge=0, description="how many rows (trials, or baselines) this sums")


class CacheSaving(Spent):
    """What the score cache saved: the cost of the first scoring, once per hit (``trials``
    counts the trials that were hits, ``baselines`` the baselines)."""

    baselines: int = Field(default=0, ge=0)


class PruningSaving(BaseModel):
    """What racing saved by stopping ``trials`` candidates early (seconds are an estimate)."""

    examples: int = Field(default=0, ge=0)
    worker_seconds: float = Field(default=0.0, ge=0.0)
    trials: int = Field(default=0, ge=0)


class StudyCost(BaseModel):
    """``Study.cost``: the study's evaluation cost, recounted from its rows."""

    spent: Spent = Field(default_factory=Spent, description="by the trials (cache hits excluded)")
    saved_by_cache: CacheSaving = Field(default_factory=CacheSaving)
    saved_by_pruning: PruningSaving = Field(default_factory=PruningSaving)
    baselines: Spent = Field(default_factory=Spent, description="by the baselines (cache hits excluded)")
    full_examples: int | None = Field(
        default=None, ge=0, description="examples one candidate is scored on at full fidelity (None: "
        "not known yet: a fractional or absent `limit` and no complete trial)")


def full_examples(evaluation: EvaluationSpec) -> int | None:
    """Examples per candidate at full fidelity: the sum over the tasks scored of their ``limit``
    (objectives on one task and split share their examples); None when a task has no count
    (no ``limit``, or a fraction: the dataset decides)."""
    limits: dict[tuple[str, str | None], int] = {}
    for o in evaluation.objectives:
        if o.limit is None or isinstance(o.limit, float):
            return None
        key = (o.task, o.split)
        limits[key] = max(limits.get(key, 0), int(o.limit))
    return sum(limits.values())


def _sums(model: type[Trial] | type[Baseline]) -> list[Any]:
    per_example = case((model.examples > 0, cast(model.worker_seconds, Float) / model.examples))
    return [func.count(), func.coalesce(func.sum(model.examples), 0),
            func.coalesce(func.sum(model.tokens), 0), func.coalesce(func.sum(model.worker_seconds), 0.0),
            func.count(model.examples),
            func.max(model.examples), func.sum(per_example),
            func.sum(case((model.examples > 0, model.worker_seconds)))]


def recount(session: Session, study_id: str, full: int | None) -> StudyCost:
    """The study's cost from its rows (one grouped query over its trials, one over its baselines);
    ``full``: :func:`full_examples` of its evaluation (None: the largest a complete trial scored)."""
    cost = StudyCost()
    pruned: tuple[Any, ...] | None = None
    observed: int | None = None
    rows = session.execute(select(Trial.state, Trial.cached, *_sums(Trial))
                           .where(Trial.study_id == study_id).group_by(Trial.state, Trial.cached)).all()
    for state, cached, n, examples, tokens, seconds, with_examples, most, per_example, timed in rows:
        if state not in RAN:
            continue
        into = cost.saved_by_cache if cached else cost.spent
        _add(into, n, examples, tokens, seconds)
        if state == TrialState.COMPLETE and most is not None:
            observed = max(observed or 0, int(most))
        if state == TrialState.PRUNED:
            p = pruned or (0, 0, 0, 0.0, 0.0)
            pruned = (p[0] + n, p[1] + with_examples, p[2] + int(examples), p[3] + float(per_example or 0.0),
                      p[4] + float(timed or 0.0))
    # a count the dataset caps (fewer examples than `limit`) shows in what complete trials scored
    cost.full_examples = full if observed is None else observed if full is None else min(full, observed)
    if pruned is not None and cost.full_examples is not None:
        n, with_examples, examples, per_example, timed = pruned
        cost.saved_by_pruning = PruningSaving(
            trials=n, examples=max(cost.full_examples * with_examples - examples, 0),
            worker_seconds=max(cost.full_examples * per_example - timed, 0.0))
    elif pruned is not None:
        cost.saved_by_pruning.trials = pruned[0]
    done = (TrialState.COMPLETE, TrialState.FAILED)
    for cached, n, examples, tokens, seconds, *_ in session.execute(
            select(Baseline.cached, *_sums(Baseline))
            .where(Baseline.study_id == study_id, Baseline.state.in_(done)).group_by(Baseline.cached)).all():
        if cached:
            _add(cost.saved_by_cache, 0, examples, tokens, seconds)
            cost.saved_by_cache.baselines += n
        else:
            _add(cost.baselines, n, examples, tokens, seconds)
    return cost


def _add(into: Spent, n: int, examples: Any, tokens: Any, seconds: Any) -> None:
    into.trials += int(n)
    into.examples += int(examples or 0)
    into.tokens += int(tokens or 0)
    into.worker_seconds += float(seconds or 0.0)


def cost_budget_reached(sessions: sessionmaker[Session], rt: StudyRuntime) -> bool:
    """Whether an open study's cost budgets are reached (False when it has none): against its last
    recount (:attr:`StudyRuntime.cost`, recounted from the rows once when it was just opened)."""
    budget = rt.spec.budget
    if budget.max_examples is None and budget.max_worker_seconds is None:
        return False
    if rt.cost is None:
        with sessions() as s:
            rt.cost = recount(s, rt.study_id, full_examples(rt.validated.evaluation))
    if cost_budget_spent(budget, rt.cost, sum(1 for t in rt.in_flight if t > 0)):  # baselines: < 0
        return True
    # failed trials spend no examples: a study of failures still ends, at the most trials any study has
    return budget.max_trials is None and rt.used >= MAX_TRIALS


def cost_budget_spent(budget: Budget, cost: StudyCost, running: int) -> bool:
    """Whether the study's cost budgets (``max_examples``, ``max_worker_seconds``) are reached by
    what its trials spent, with the ``running`` trials counted at the mean cost of a trial so far
    (so that a wide study does not start trials it cannot afford)."""
    spent = cost.spent
    trials = max(spent.trials, 1)
    examples = spent.examples + running * spent.examples / trials
    if budget.max_examples is not None and examples >= budget.max_examples:
        return True
    seconds = spent.worker_seconds + running * spent.worker_seconds / trials
    return budget.max_worker_seconds is not None and seconds >= budget.max_worker_seconds
