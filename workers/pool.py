"""Ray actors that run trials, and a pool that keeps every one of them busy.

One actor per device slot (a GPU, or a CPU slot), created once per study's source set
and reused across trials. The pool has no generation barrier: the moment an actor
finishes it can take the next trial (``idle()`` says how many can). An actor that dies
is replaced and its trial retried once, then recorded as failed with the reason.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from workers.trial import TrialResult, WorkerSpec


class WorkerResources(BaseModel):
    """Ray resources of one actor: a GPU each where there are GPUs, else CPUs."""

    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory_bytes: int | None = Field(default=None, description="Ray memory reservation")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``); with neither, start a local Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    opts.update(kwargs)
    if address:
        opts.pop("num_cpus", None)
        ray.init(address=address, **opts)
    else:
        ray.init(**opts)


class _Actor:
    """The Ray actor: a :class:`TrialRunner` behind ``evaluate``."""

    def __init__(self, spec: dict[str, Any]):
        from workers.trial import TrialRunner

        self.runner = TrialRunner(spec)

    def evaluate(self, trial_id: int, recipe: dict[str, Any]) -> dict[str, Any]:
        return self.runner.run(trial_id, recipe).model_dump()

    def pid(self) -> int:
        return os.getpid()

    def memory(self) -> dict[str, int]:
        return self.runner.builder.memory_bytes()


@dataclass
class _Slot:
    actor: Any
    index: int
    busy_since: float | None = None
    busy_s: float = 0.0
    created: float = field(default_factory=time.perf_counter)


@dataclass
class _Running:
    trial_id: int
    recipe: dict[str, Any]
    slot: _Slot
    attempt: int
    submitted: float


class WorkerPool:
    """``n`` actors sharing one :class:`WorkerSpec`."""

    def __init__(self, spec: WorkerSpec, n: int = 1, resources: WorkerResources | None = None,
                 max_attempts: int = 2):
        import ray

        self.spec = spec
        self.resources = resources or WorkerResources()
        self.max_attempts = max_attempts
        opts: dict[str, Any] = {
            "num_cpus": self.resources.num_cpus,
            "num_gpus": self.resources.num_gpus,
            "max_restarts": 0,
            "max_concurrency": 2,  # pid() / memory() answer while a trial runs
        }
        if self.resources.memory_bytes:
            opts["memory"] = self.resources.memory_bytes
        if self.resources.custom:
            opts["resources"] = self.resources.custom
        self._cls = ray.remote(**opts)(_Actor)
        self.slots = [_Slot(self._new_actor(), i) for i in range(n)]
        self.running: dict[Any, _Running] = {}  # ObjectRef -> trial
        self.replaced = 0
        self.started = time.perf_counter()

    def _new_actor(self):
        return self._cls.remote(self.spec.model_dump(mode="json"))

    # ---- dispatch ------------------------------------------------------------------
    def idle(self) -> int:
        return sum(1 for s in self.slots if s.busy_since is None)

    def submit(self, trial_id: int, recipe: Any, attempt: int = 1) -> None:
        slot = next((s for s in self.slots if s.busy_since is None), None)
        if slot is None:
            raise RuntimeError("no idle worker: call idle() before submit()")
        data = recipe if isinstance(recipe, dict) else recipe.model_dump(mode="json")
        ref = slot.actor.evaluate.remote(trial_id, data)
        slot.busy_since = time.perf_counter()
        self.running[ref] = _Running(trial_id, data, slot, attempt, slot.busy_since)

    def wait(self, timeout: float | None = None) -> list[TrialResult]:
        """Results of the trials that finished (at least one unless ``timeout``)."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        if not self.running:
            return []
        done, _ = ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if done:  # collect everything else that is already finished, without waiting
            more, _ = ray.wait([r for r in self.running if r not in done],
                               num_returns=len(self.running) - len(done), timeout=0)
            done = done + more
        results = []
        for ref in done:
            run = self.running.pop(ref)
            slot = run.slot
            slot.busy_s += time.perf_counter() - (slot.busy_since or time.perf_counter())
            slot.busy_since = None
            try:
                result = TrialResult.model_validate(ray.get(ref))
                result.attempts = run.attempt
                results.append(result)
            except (RayActorError, WorkerCrashedError) as err:
                self._replace(slot)
                if run.attempt < self.max_attempts:
                    self.submit(run.trial_id, run.recipe, run.attempt + 1)
                else:
                    results.append(TrialResult(
                        trial_id=run.trial_id, state="failed", attempts=run.attempt,
                        error=f"the worker died {run.attempt} times running this trial: "
                              f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                    ))
        return results

    def _replace(self, slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:
            pass
        slot.actor = self._new_actor()
        self.replaced += 1

    # ---- introspection -------------------------------------------------------------
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


def run_search(optimizer: Any, decode: Callable[[dict[str, float]], Any], pool: WorkerPool,
               budget: int, on_result: Callable[[TrialResult], None] | None = None
               ) -> list[TrialResult]:
    """Ask, dispatch and tell until ``budget`` trials are done — no generation barrier:
    whenever a worker is idle and the budget allows, the optimizer is asked for one more
    point. Failed trials are told as failures, never as scores."""
    from search_spaces.optimizers.base import Failure

    asked = 0
    results: list[TrialResult] = []
    while len(results) < budget:
        while pool.idle() and asked < budget:
            point = optimizer.ask(1)[0]
            try:
                recipe = decode(point.params)
            except Exception as err:  # a point the space cannot decode is a failed trial
                optimizer.tell(point.id, Failure(str(err)))
                results.append(TrialResult(trial_id=point.id, state="failed", error=str(err)))
                asked += 1
                continue
            pool.submit(point.id, recipe)
            asked += 1
        for result in pool.wait():
            value = result.values if result.state == "complete" else Failure(result.error or "")
            if isinstance(value, list) and len(value) == 1:
                value = value[0]
            optimizer.tell(result.trial_id, value)
            results.append(result)
            if on_result:
                on_result(result)
    return results
