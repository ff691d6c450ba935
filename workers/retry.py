"""The retry policy: the one place that says how often a trial may be dispatched to a worker.

A trial is dispatched at most :data:`MAX_ATTEMPTS` times in all, whatever lost it: its worker
or node, its deadline (the pool finds these and dispatches again, workers/lost_workers.py), or
a restart of the controller while it ran (the controller's restart recovery dispatches again,
service/controller/recovery.py). Both count the same attempts: a trial's ``attempts`` column is
always the number of times it was dispatched (docs/workers.md, "When a worker is lost"). After
its last attempt the trial is failed, with the reason of each.

Torch- and Ray-free: the service imports it without pulling in a worker.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_ATTEMPTS = 2

# why a trial is dispatched again (the `why` of a RetryNotice and of a `trial_retried` event)
WORKER_DIED = "worker died"
NODE_DIED = "node died"
DEADLINE_EXCEEDED = "deadline exceeded"
UNRESPONSIVE = "worker unresponsive"
NOT_STARTED = "worker did not start"  # not placed or set up in time
INIT_FAILED = "worker failed to start"  # its set-up raised: another actor would fail the same way
CONTROLLER_RESTARTED = "controller restarted"  # the controller stopped while the trial ran


@dataclass(frozen=True)
class RetryNotice:
    """A trial about to be dispatched again; ``attempt`` is the number of that dispatch (from 1)."""

    trial_id: int
    attempt: int
    why: str
    detail: str


def may_retry(attempts: int) -> bool:
    """May a trial dispatched ``attempts`` times be dispatched once more?"""
    return attempts < MAX_ATTEMPTS
