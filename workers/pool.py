"""Ray actors that run trials, and a pool that keeps every one of them busy.

One actor per device slot (a GPU, or a CPU slot), created once per study's source set
and reused across trials. The pool has no generation barrier: the moment an actor
finishes it can take the next trial (``idle()`` says how many can). The ask → dispatch →
tell loop around it is the controller's (service/controller/scheduler.py).

A trial whose worker is lost is found and dispatched again (workers/lost_workers.py), as the
retry policy allows (workers/retry.py); then it is recorded as failed with the reason.
``on_retry`` hears of each re-dispatch *before* it happens, so that the controller commits
the new attempt count and a ``trial_retried`` event first (and may call the retry off).
Starting Ray is workers/ray_init.py's (``init_ray`` is importable from here too).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from workers.lost_workers import TICK_S, WARMUP_S, LostWorkers, Running, Slot, brief, failed_result
from workers.ray_init import init_ray, local_ray_auth, start_local_ray
from workers.retry import RetryNotice
from workers.trial import TrialResult, WorkerSpec

if TYPE_CHECKING:
    from search_spaces.recipe import Recipe
    from workers.racing import RaceTicket

__all__ = ["RetryNotice", "WorkerPool", "WorkerResources", "init_ray", "local_ray_auth", "start_local_ray"]


class WorkerResources(BaseModel):
    """Ray resources of one actor: a GPU each where there are GPUs, else CPUs."""

    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory_bytes: int | None = Field(default=None, description="Ray memory reservation")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")


# ---- the actor --------------------------------------------------------------------------------
class _Actor:
    """The Ray actor: a :class:`TrialRunner` behind ``evaluate``.

    Ray pickles the arguments and the result: a :class:`WorkerSpec`, a ``Recipe`` and a
    :class:`TrialResult` arrive as the validated objects they were, with no JSON in between."""

    def __init__(self, spec: WorkerSpec):
        from workers.trial import TrialRunner

        self.runner = TrialRunner(spec)

    def evaluate(self, trial_id: int, recipe: Any, race: Any = None) -> TrialResult:
        """``recipe``: a ``Recipe``, or its JSON (a row read back; the runner validates it);
        ``race``: a ``RaceTicket`` to score it over rungs (workers/racing.py)."""
        return self.runner.run(trial_id, recipe, race=race)

    def ping(self) -> dict[str, Any]:
        """Answered once the actor is set up, even while a trial runs (``max_concurrency=2``)."""
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        return self.runner.builder.memory_bytes()


def _result(value: Any) -> TrialResult:
    """What ``evaluate`` returned: a :class:`TrialResult` (anything else is validated, and
    fails the trial if it does not validate)."""
    return value if isinstance(value, TrialResult) else TrialResult.model_validate(value)


# ---- the pool ---------------------------------------------------------------------------------
class WorkerPool(LostWorkers):
    """``n`` actors sharing one :class:`WorkerSpec`."""

    def __init__(self, spec: WorkerSpec, n: int = 1, resources: WorkerResources | None = None,
                 on_retry: Callable[[RetryNotice], bool | None] | None = None, warmup_s: float = WARMUP_S):
        import ray

        self.spec = spec
        self.resources = resources or WorkerResources()
        self.on_retry = on_retry
        self.warmup_s = warmup_s
        opts: dict[str, Any] = {
            "num_cpus": self.resources.num_cpus,
            "num_gpus": self.resources.num_gpus,
            "max_restarts": 0,
            "max_concurrency": 2,  # ping() / pid() / memory() answer while a trial runs
        }
        if self.resources.memory_bytes:
            opts["memory"] = self.resources.memory_bytes
        if self.resources.custom:
            opts["resources"] = self.resources.custom
        self._cls = ray.remote(**opts)(_Actor)
        self.slots = [self._start(Slot(None, i)) for i in range(n)]
        self.running: dict[Any, Running] = {}  # ObjectRef -> trial
        self.replaced = 0
        self.started = time.perf_counter()
        self._init_lost_workers()

    def _start(self, slot: Slot) -> Slot:
        """A new actor in ``slot``; its first ping answers when it is ready."""
        slot.actor = self._cls.remote(self.spec)  # pickled by Ray, not validated again
        slot.created = time.perf_counter()
        slot.ping, slot.ping_sent = slot.actor.ping.remote(), slot.created
        slot.ready_at, slot.node_id, slot.dead, slot.finished = None, None, None, 0
        return slot

    # ---- dispatch ------------------------------------------------------------------------------
    def _free_slots(self) -> list[Slot]:
        """Idle slots not held for a lost trial's retry."""
        held = {id(r.run.slot) for r in self._retries}
        return [s for s in self.slots if s.busy_since is None and id(s) not in held]

    def idle(self) -> int:
        """Actors free for a new trial."""
        return len(self._free_slots())

    def busy(self) -> bool:
        """Is any trial of this pool in flight (running, about to be retried, or to be reported)?"""
        return bool(self.running or self._retries or self._failed)

    def submit(self, trial_id: int, recipe: Recipe | dict[str, Any], attempt: int = 1,
               timeout_s: float | None = None, race: RaceTicket | None = None) -> None:
        """Run a trial on an idle actor. ``recipe``: the object, or its JSON (validated on the actor,
        where a recipe that does not validate fails its trial); ``attempt``: the how-manieth dispatch
        of this trial this is (a caller re-running a trial says so); ``timeout_s``: its deadline
        (default: derived); ``race``: score it over racing's rungs (workers/racing.py)."""
        free = self._free_slots()
        if not free:
            raise RuntimeError("no idle worker: call idle() before submit()")
        slot = free[0]
        if slot.dead is not None:  # known gone while idle: a new actor first
            self._replace(slot)
        self._dispatch(Running(trial_id, recipe, attempt, timeout_s, race=race), slot)

    def _dispatch(self, run: Running, slot: Slot) -> None:
        """Every dispatch of a trial to an actor goes through here."""
        ref = slot.actor.evaluate.remote(run.trial_id, run.recipe, run.race)
        slot.busy_since = time.perf_counter()
        run.slot, run.submitted, run.first = slot, slot.busy_since, slot.finished == 0
        self.running[ref] = run

    # ---- results -------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> list[TrialResult]:
        """Results of the trials that finished (at least one, unless ``timeout`` runs out first).

        Meanwhile lost workers are found (Ray's errors, pings, Ray's node table, deadlines) and
        their trials dispatched again, or failed once they had all their attempts."""
        import ray

        end = None if timeout is None else time.perf_counter() + timeout
        results: list[TrialResult] = []
        while True:
            self._dispatch_retries()
            left = TICK_S if end is None else max(0.0, min(TICK_S, end - time.perf_counter()))
            if self.running:
                done, rest = ray.wait(list(self.running), num_returns=1, timeout=left)
                if done and rest:  # collect whatever else is finished, without waiting
                    more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                    done = done + more
                for ref in done:
                    if ref in self.running:
                        self._finish(ref, results)
            elif self._retries and left:  # a new actor starting, or on_retry failing: wait a little
                pings = [s.ping for s in self.slots if s.ping is not None]
                if pings:
                    ray.wait(pings, num_returns=1, timeout=left)
                else:
                    time.sleep(left)
            self._check_health()
            results += self._failed
            self._failed.clear()
            if results or not self.busy() or (end is not None and time.perf_counter() >= end):
                return results

    def _finish(self, ref: Any, results: list[TrialResult]) -> None:
        import ray
        from ray.exceptions import RayError, RayTaskError

        run = self.running.pop(ref)
        slot = run.slot
        self._release(slot)
        try:
            result = _result(ray.get(ref))
        except RayTaskError as err:  # evaluate() raised: a bug in the trial code, not a lost worker
            results.append(failed_result(run, f"the worker raised {brief(err)}"))
            return
        except RayError as err:  # the actor, its worker process or its node is gone
            self._lost(run, *self._classify(err, slot))
            return
        except Exception as err:  # e.g. a result that does not validate
            results.append(failed_result(run, f"the worker's result could not be read: {brief(err)}"))
            return
        now = time.perf_counter()
        slot.last_seen = now
        slot.finished += 1
        if result.state == "complete" and not run.first:
            self._durations.append(now - self._trial_start(run))
        result.attempts = run.attempt
        results.append(result)

    def _release(self, slot: Slot) -> None:
        slot.busy_s += time.perf_counter() - (slot.busy_since or time.perf_counter())
        slot.busy_since = None

    def _replace(self, slot: Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        self._start(slot)
        self.replaced += 1

    # ---- introspection -------------------------------------------------------------------------
    def pids(self) -> list[int]:
        import ray

        return ray.get([s.actor.pid.remote() for s in self.slots])

    def memory(self) -> list[dict[str, int]]:
        import ray

        return ray.get([s.actor.memory.remote() for s in self.slots])

    def shutdown(self) -> None:
        import ray

        for slot in self.slots:
            try:
                ray.kill(slot.actor, no_restart=True)
            except Exception:
                pass
        self.running.clear()
        self._retries.clear()
        self._failed.clear()

