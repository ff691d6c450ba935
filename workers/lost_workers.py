"""Lost workers: how the pool finds them, and what becomes of their trials.

A worker is lost when Ray reports its actor or node dead, the actor stops answering its pings,
Ray lists its node as dead, or its trial runs past its deadline (docs/workers.md, "When a worker
is lost"). The actor is killed and replaced, and the trial dispatched again to the new one once
it is ready, as the retry policy (workers/retry.py) allows; else it is failed with the reason of
each attempt. :class:`LostWorkers` is the part of :class:`workers.pool.WorkerPool` that does it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workers.retry import (
    DEADLINE_EXCEEDED,
    INIT_FAILED,
    MAX_ATTEMPTS,
    NODE_DIED,
    NOT_STARTED,
    UNRESPONSIVE,
    WORKER_DIED,
    RetryNotice,
    may_retry,
)
from workers.trial import TrialResult

log = logging.getLogger("evomerge.workers")

# ---- the per-trial deadline (docs/workers.md) -------------------------------------------------
# Counted from when the trial's actor is ready (its sources loaded) or from the dispatch, whichever
# is later. A study's `trial_timeout_seconds` sets it; otherwise it follows this pool's trials:
DEADLINE_START_S = 3600.0  # while no trial of the pool has completed yet
DEADLINE_FACTOR = 5.0  # then: this many times the longest completed trial (first trials aside) ...
DEADLINE_FLOOR_S = 60.0  # ... and never less than this
WARMUP_S = 600.0  # added for an actor's first trial, which pays the rest of its set-up (tokenizer,
#                   resident model, the evaluator's tasks)
# ---- actor health ------------------------------------------------------------------------------
HEALTH_PERIOD_S = 5.0  # a busy actor is pinged, and Ray's node table read, this often
PING_TIMEOUT_S = 60.0  # a ping unanswered this long: the actor is unresponsive
STARTUP_TIMEOUT_S = 3600.0  # an actor not ready (placed, sources loaded) after this long is replaced
TICK_S = 0.5  # wait() without a timeout looks at health at least this often
MAX_RESTARTS = 3  # new actors lost before they were ready, per retry: then the trial is failed


@dataclass
class Slot:
    actor: Any
    index: int
    busy_since: float | None = None
    busy_s: float = 0.0
    created: float = field(default_factory=time.perf_counter)
    ping: Any = None  # the ObjectRef of the ping in flight
    ping_sent: float = 0.0
    ready_at: float | None = None  # when the actor first answered: placed and set up
    last_seen: float = 0.0
    node_id: str | None = None
    dead: str | None = None  # an idle actor known to be gone: replaced before its next trial
    finished: int = 0  # trials this actor brought to an end (0: its next trial is its first)


@dataclass
class Running:
    trial_id: int
    recipe: Any  # a search_spaces.recipe.Recipe, or its JSON (a row read back)
    attempt: int
    timeout_s: float | None = None
    slot: Any = None  # Slot, set at dispatch
    submitted: float = 0.0
    first: bool = False  # the actor's first trial (set at dispatch): it gets the warm-up allowance
    history: list[str] = field(default_factory=list)  # "attempt 1: worker died (...)"
    race: Any = None  # a workers.racing.RaceTicket: the trial is raced over rungs


@dataclass
class Retry:
    """A lost trial waiting for its slot's new actor to be ready, then for ``on_retry``."""

    run: Running
    notice: RetryNotice
    restarts: int = 0  # new actors of its slot that were lost before they were ready


def brief(err: BaseException) -> str:
    """An exception in one line: its type and its message's lines joined, at most 300 characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}"[:300]


def failed_result(run: Running, error: str) -> TrialResult:
    return TrialResult(trial_id=run.trial_id, state="failed", attempts=run.attempt, error=error)


class LostWorkers:
    """Mixed into the pool: health checks, deadlines and retries. The pool provides ``slots``,
    ``running`` (ObjectRef -> :class:`Running`), ``on_retry``, ``warmup_s``, ``_dispatch``,
    ``_release`` and ``_replace``."""

    slots: list[Slot]
    running: dict[Any, Running]
    on_retry: Callable[[RetryNotice], bool | None] | None
    warmup_s: float

    def _init_lost_workers(self) -> None:
        self._retries: list[Retry] = []  # lost trials, each holding its (idle) slot
        self._failed: list[TrialResult] = []  # given up, reported by the next wait()
        self._durations: deque[float] = deque(maxlen=1000)  # run times of completed trials
        self._nodes_checked = time.perf_counter()
        self._unrecorded: set[int] = set()  # retries on_retry failed on (logged once)

    # ---- retries -------------------------------------------------------------------------------
    def _dispatch_retries(self) -> None:
        """Dispatch the lost trials whose new actor is ready, each once ``on_retry`` has recorded
        it (one it could not record waits for the next call; one it declines is dropped). A new
        actor lost before it was ready is replaced, at most MAX_RESTARTS times per retry."""
        for retry in list(self._retries):
            run, notice, slot = retry.run, retry.notice, retry.run.slot
            waited = time.perf_counter() - slot.created
            if slot.dead is None and slot.ready_at is None and waited > STARTUP_TIMEOUT_S:
                slot.dead = f"{NOT_STARTED} (not placed or set up after {waited:.0f} s)"
            if slot.dead is not None:
                self._restart_for(retry)
                continue
            if slot.ready_at is None:
                continue  # its new actor is starting
            answer = self._ask_on_retry(notice)
            if answer is None:
                continue
            self._retries.remove(retry)
            if answer:
                run.attempt = notice.attempt
                self._dispatch(run, slot)

    def _ask_on_retry(self, notice: RetryNotice) -> bool | None:
        """``on_retry``'s answer: go ahead (True) or not (False); None: it raised, ask again later."""
        if self.on_retry is None:
            return True
        try:
            answer = self.on_retry(notice) is not False
        except Exception:
            if notice.trial_id not in self._unrecorded:
                log.exception("trial %s: its retry could not be recorded; trying again", notice.trial_id)
                self._unrecorded.add(notice.trial_id)
            return None
        self._unrecorded.discard(notice.trial_id)
        return answer

    def _restart_for(self, retry: Retry) -> None:
        """The new actor meant for a retry was lost before it was ready: another one, or, after
        MAX_RESTARTS or when its set-up raised, the trial is failed (no dispatch happened: its
        attempts stay as they were)."""
        slot = retry.run.slot
        if retry.restarts < MAX_RESTARTS and not (slot.dead or "").startswith(INIT_FAILED):
            log.warning("trial %s: the new worker for its attempt %d was lost before it was ready (%s); "
                        "starting another", retry.run.trial_id, retry.notice.attempt, slot.dead)
            retry.restarts += 1
            self._replace(slot)
            return
        self._retries.remove(retry)
        self._failed.append(failed_result(
            retry.run, f"{NOT_STARTED}: none of {retry.restarts + 1} new worker(s) for its attempt "
                       f"{retry.notice.attempt} became ready (the last: {slot.dead}); earlier: "
                       + "; ".join(retry.run.history)))

    # ---- lost workers --------------------------------------------------------------------------
    def _lost(self, run: Running, why: str, detail: str) -> None:
        """``run``'s actor is gone or given up on (its slot is already released): replace the actor,
        then hold the trial for another dispatch, or fail it if it had all its attempts."""
        self._replace(run.slot)
        run.history.append(f"attempt {run.attempt}: {why} ({detail})")
        log.warning("trial %s, attempt %d of %d: %s (%s)", run.trial_id, run.attempt, MAX_ATTEMPTS,
                    why, detail)
        if may_retry(run.attempt):
            self._retries.append(Retry(run, RetryNotice(run.trial_id, run.attempt + 1, why, detail)))
            return
        self._failed.append(failed_result(
            run, f"{why}: the trial was dispatched {run.attempt} time(s), the most allowed "
                 f"({MAX_ATTEMPTS}, docs/workers.md), and lost its worker each time: "
                 + "; ".join(run.history)))

    def _abandon(self, ref: Any, why: str, detail: str) -> None:
        """Give up on a trial still in flight (its actor is killed by the replacement)."""
        run = self.running.pop(ref)
        self._release(run.slot)
        self._lost(run, why, detail)

    def _classify(self, err: BaseException, slot: Slot) -> tuple[str, str]:
        """(why, detail) of a Ray error: the node died, the actor never started, it cannot be
        reached (yet), or its worker process died."""
        from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError

        detail = brief(err)
        if isinstance(err, NodeDiedError) or "node has died" in str(err) or self._node_dead(slot):
            return NODE_DIED, detail
        if isinstance(err, RayActorError) and getattr(err, "actor_init_failed", False):
            return INIT_FAILED, detail
        if isinstance(err, ActorUnavailableError):
            return UNRESPONSIVE, detail
        return WORKER_DIED, detail

    def _node_dead(self, slot: Slot) -> bool:
        return slot.node_id is not None and slot.node_id not in self._alive_nodes(slot.node_id)

    @staticmethod
    def _alive_nodes(default: str | None = None) -> set[str]:
        """IDs of the nodes Ray lists as alive (``{default}`` when Ray cannot be asked)."""
        import ray

        try:
            return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception as err:
            log.warning("Ray's node table could not be read: %s", brief(err))
            return {default} if default else set()

    def _trial_start(self, run: Running) -> float:
        """When a trial's clock started: its dispatch, or its actor's readiness if that came later."""
        ready = run.slot.ready_at
        return run.submitted if ready is None else max(run.submitted, ready)

    def deadline(self, timeout_s: float | None = None, first: bool = False) -> tuple[float, str]:
        """A trial's deadline in seconds, and where it comes from (docs/workers.md); ``first``: the
        trial is its actor's first, which gets the warm-up allowance on top."""
        if timeout_s is not None:
            limit, source = float(timeout_s), "the study's trial_timeout_seconds"
        elif not self._durations:
            limit, source = DEADLINE_START_S, "no trial of this pool has completed yet"
        else:
            longest = max(self._durations)
            limit = max(DEADLINE_FLOOR_S, DEADLINE_FACTOR * longest)
            source = (f"{DEADLINE_FACTOR:g} × the longest completed trial ({longest:.1f} s), at least "
                      f"{DEADLINE_FLOOR_S:g} s")
        if first and self.warmup_s:
            limit += self.warmup_s
            source += f", + {self.warmup_s:g} s for a new worker's first trial"
        return limit, source

    def _poll_pings(self) -> None:
        """Read the answered pings: an answer marks the actor ready and alive, an error gone."""
        import ray

        pending = {s.ping: s for s in self.slots if s.ping is not None}
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        now = time.perf_counter()
        for ref in ready:
            slot = pending[ref]
            slot.ping = None
            try:
                info = ray.get(ref)
            except Exception as err:
                self._actor_gone(slot, *self._classify(err, slot))
                continue
            slot.last_seen, slot.node_id = now, info.get("node_id")
            if slot.ready_at is None:
                slot.ready_at = now

    def _running_on(self, slot: Slot) -> Any | None:
        return next((ref for ref, run in self.running.items() if run.slot is slot), None)

    def _actor_gone(self, slot: Slot, why: str, detail: str) -> None:
        ref = self._running_on(slot)
        if ref is not None:
            self._abandon(ref, why, detail)
        else:
            slot.dead = f"{why} ({detail})"

    def _check_health(self) -> None:
        """Pings, deadlines and Ray's node table, for the actors with a trial."""
        self._poll_pings()
        now = time.perf_counter()
        for ref, run in list(self.running.items()):
            slot = run.slot
            if slot.ready_at is None:
                if now - slot.created > STARTUP_TIMEOUT_S:
                    self._abandon(ref, NOT_STARTED, f"not placed or set up after {now - slot.created:.0f} s")
                continue
            if slot.ping is not None and now - slot.ping_sent > PING_TIMEOUT_S:
                self._abandon(ref, UNRESPONSIVE, f"no answer to a ping in {now - slot.ping_sent:.0f} s")
                continue
            limit, source = self.deadline(run.timeout_s, run.first)
            ran = now - self._trial_start(run)
            if ran > limit:
                self._abandon(ref, DEADLINE_EXCEEDED,
                              f"ran {ran:.1f} s, its deadline is {limit:.1f} s ({source})")
                continue
            if slot.ping is None and now - slot.last_seen > HEALTH_PERIOD_S:
                slot.ping, slot.ping_sent = slot.actor.ping.remote(), now
        if now - self._nodes_checked > HEALTH_PERIOD_S and any(s.node_id for s in self.slots):
            self._nodes_checked = now
            self._check_nodes()

    def _check_nodes(self) -> None:
        """Actors on nodes Ray lists as dead: their trials are lost, idle ones replaced before use."""
        alive = self._alive_nodes()
        if not alive:
            return  # the table could not be read: judge nothing on it
        for slot in self.slots:
            if slot.node_id is not None and slot.node_id not in alive and slot.dead is None:
                self._actor_gone(slot, NODE_DIED, f"Ray lists node {slot.node_id[:12]} as dead")
