"""Ray actors that run trials, and a pool that keeps every one of them busy.

One actor per device slot (a GPU, or a CPU slot), created once per study's source set
and reused across trials. The pool has no generation barrier: the moment an actor
finishes it can take the next trial (``idle()`` says how many can).

A trial whose worker is lost is found and dispatched again (docs/workers.md, "When a worker
is lost"): Ray reports the actor or its node dead, the actor stops answering its pings, Ray
lists its node as dead, or the trial runs past its deadline. The actor is killed and replaced
and the trial re-dispatched to the new one, up to ``max_attempts`` dispatches in all; then it
is recorded as failed with the reason. ``on_retry`` hears of each re-dispatch *before* it
happens, so that the controller commits the new attempt count and a ``trial_retried`` event
first (and may call the retry off).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field

from workers.trial import TrialResult, WorkerSpec

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

# why a trial is dispatched again (the `why` of a RetryNotice and of a `trial_retried` event)
WORKER_DIED = "worker died"
NODE_DIED = "node died"
DEADLINE_EXCEEDED = "deadline exceeded"
UNRESPONSIVE = "worker unresponsive"
NOT_STARTED = "worker did not start"  # not placed or set up in time
INIT_FAILED = "worker failed to start"  # its set-up raised: another actor would fail the same way


class WorkerResources(BaseModel):
    """Ray resources of one actor: a GPU each where there are GPUs, else CPUs."""

    num_cpus: float = Field(default=1, ge=0)
    num_gpus: float = Field(default=0, ge=0)
    memory_bytes: int | None = Field(default=None, description="Ray memory reservation")
    custom: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")


@dataclass(frozen=True)
class RetryNotice:
    """A trial about to be dispatched again; ``attempt`` is the number of that dispatch (from 1)."""

    trial_id: int
    attempt: int
    why: str
    detail: str


# ---- starting Ray -----------------------------------------------------------------------------
def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``); with neither, start a local Ray in-process, bound to
    loopback and with token authentication (:func:`start_local_ray`)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    opts.update(kwargs)
    if not address:
        start_local_ray(**opts)
        return
    opts.pop("num_cpus", None)
    with _loopback_kept() if _is_loopback(address) else contextlib.nullcontext():
        ray.init(address=address, **opts)


def start_local_ray(**opts: Any) -> None:
    """``ray.init()`` of a single-machine Ray that nobody else can reach: its servers (GCS,
    raylet, workers, agents) on loopback only (:func:`_loopback_kept`), and token
    authentication, the same for every process (:func:`local_ray_auth`)."""
    import ray

    local_ray_auth()
    opts.setdefault("_node_ip_address", "127.0.0.1")
    with _loopback_kept():
        ray.init(**opts)


@contextlib.contextmanager
def _loopback_kept() -> Iterator[None]:
    """While it lasts, Ray keeps ``127.0.0.1`` as it is.

    Ray's servers bind 127.0.0.1 only when the node's address is exactly ``127.0.0.1``, but on
    Linux Ray replaces that address (a node's, or a cluster address to join) with the machine's
    own, unless it believes it cannot form clusters (its Windows/macOS mode). That belief is
    switched on here, for ``ray.init`` alone: a local Ray then listens on loopback only, and a
    process joining it at ``127.0.0.1:port`` reaches it there.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _is_loopback(address: str) -> bool:
    """Is ``host:port`` on this machine's loopback (``ray://`` client addresses never are)?"""
    if "://" in address:
        return False
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_ray_auth() -> None:
    """Token authentication for the embedded Ray, consistent across its processes.

    ``RAY_AUTH_MODE`` is respected when set; unset, Ray itself turns token mode on for the
    cluster it starts (and writes it into this process's environment, which Ray's processes
    inherit). Where token mode would find no token, a random one is put in ``RAY_AUTH_TOKEN``
    of this process's environment, inherited the same way, rather than letting Ray write one
    under ``~/.ray``.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").strip().lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


# ---- the actor --------------------------------------------------------------------------------
class _Actor:
    """The Ray actor: a :class:`TrialRunner` behind ``evaluate``."""

    def __init__(self, spec: dict[str, Any]):
        from workers.trial import TrialRunner

        self.runner = TrialRunner(spec)

    def evaluate(self, trial_id: int, recipe: dict[str, Any]) -> dict[str, Any]:
        return self.runner.run(trial_id, recipe).model_dump()

    def ping(self) -> dict[str, Any]:
        """Answered once the actor is set up, even while a trial runs (``max_concurrency=2``)."""
        import ray

        return {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

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
    ping: Any = None  # the ObjectRef of the ping in flight
    ping_sent: float = 0.0
    ready_at: float | None = None  # when the actor first answered: placed and set up
    last_seen: float = 0.0
    node_id: str | None = None
    dead: str | None = None  # an idle actor known to be gone: replaced before its next trial
    finished: int = 0  # trials this actor brought to an end (0: its next trial is its first)


@dataclass
class _Running:
    trial_id: int
    recipe: dict[str, Any]
    attempt: int
    timeout_s: float | None = None
    slot: Any = None  # _Slot, set at dispatch
    submitted: float = 0.0
    first: bool = False  # the actor's first trial (set at dispatch): it gets the warm-up allowance
    history: list[str] = field(default_factory=list)  # "attempt 1: worker died (...)"


@dataclass
class _Retry:
    """A lost trial waiting for its slot's new actor to be ready, then for ``on_retry``."""

    run: _Running
    notice: RetryNotice
    restarts: int = 0  # new actors of its slot that were lost before they were ready


MAX_RESTARTS = 3  # new actors lost before they were ready, per retry: then the trial is failed


def _brief(err: BaseException) -> str:
    """An exception in one line: its type and its message's lines joined, at most 300 characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{type(err).__name__}: {text}"[:300]


class WorkerPool:
    """``n`` actors sharing one :class:`WorkerSpec`."""

    def __init__(self, spec: WorkerSpec, n: int = 1, resources: WorkerResources | None = None,
                 max_attempts: int = 2, on_retry: Callable[[RetryNotice], bool | None] | None = None,
                 warmup_s: float = WARMUP_S):
        import ray

        self.spec = spec
        self.resources = resources or WorkerResources()
        self.max_attempts = max_attempts
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
        self.slots = [self._start(_Slot(None, i)) for i in range(n)]
        self.running: dict[Any, _Running] = {}  # ObjectRef -> trial
        self.replaced = 0
        self.started = time.perf_counter()
        self._retries: list[_Retry] = []  # lost trials, each holding its (idle) slot
        self._failed: list[TrialResult] = []  # given up, reported by the next wait()
        self._durations: deque[float] = deque(maxlen=1000)  # run times of completed trials
        self._nodes_checked = time.perf_counter()
        self._unrecorded: set[int] = set()  # retries on_retry failed on (logged once)

    def _start(self, slot: _Slot) -> _Slot:
        """A new actor in ``slot``; its first ping answers when it is ready."""
        slot.actor = self._cls.remote(self.spec.model_dump(mode="json"))
        slot.created = time.perf_counter()
        slot.ping, slot.ping_sent = slot.actor.ping.remote(), slot.created
        slot.ready_at, slot.node_id, slot.dead, slot.finished = None, None, None, 0
        return slot

    # ---- dispatch ------------------------------------------------------------------------------
    def _free_slots(self) -> list[_Slot]:
        """Idle slots not held for a lost trial's retry."""
        held = {id(r.run.slot) for r in self._retries}
        return [s for s in self.slots if s.busy_since is None and id(s) not in held]

    def idle(self) -> int:
        """Actors free for a new trial."""
        return len(self._free_slots())

    def busy(self) -> bool:
        """Is any trial of this pool in flight (running, about to be retried, or to be reported)?"""
        return bool(self.running or self._retries or self._failed)

    def submit(self, trial_id: int, recipe: Any, attempt: int = 1, timeout_s: float | None = None) -> None:
        """Run a trial on an idle actor. ``attempt``: the how-manieth dispatch of this trial this is
        (a caller re-running a trial says so); ``timeout_s``: its deadline (default: derived)."""
        free = self._free_slots()
        if not free:
            raise RuntimeError("no idle worker: call idle() before submit()")
        slot = free[0]
        if slot.dead is not None:  # known gone while idle: a new actor first
            self._replace(slot)
        data = recipe if isinstance(recipe, dict) else recipe.model_dump(mode="json")
        self._dispatch(_Running(trial_id, data, attempt, timeout_s), slot)

    def _dispatch(self, run: _Running, slot: _Slot) -> None:
        """Every dispatch of a trial to an actor goes through here."""
        ref = slot.actor.evaluate.remote(run.trial_id, run.recipe)
        slot.busy_since = time.perf_counter()
        run.slot, run.submitted, run.first = slot, slot.busy_since, slot.finished == 0
        self.running[ref] = run

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

    def _restart_for(self, retry: _Retry) -> None:
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
        self._failed.append(self._failed_result(
            retry.run, f"{NOT_STARTED}: none of {retry.restarts + 1} new worker(s) for its attempt "
                       f"{retry.notice.attempt} became ready (the last: {slot.dead}); earlier: "
                       + "; ".join(retry.run.history)))

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
            result = TrialResult.model_validate(ray.get(ref))
        except RayTaskError as err:  # evaluate() raised: a bug in the trial code, not a lost worker
            results.append(self._failed_result(run, f"the worker raised {_brief(err)}"))
            return
        except RayError as err:  # the actor, its worker process or its node is gone
            self._lost(run, *self._classify(err, slot))
            return
        except Exception as err:  # e.g. a result that does not validate
            results.append(self._failed_result(run, f"the worker's result could not be read: {_brief(err)}"))
            return
        now = time.perf_counter()
        slot.last_seen = now
        slot.finished += 1
        if result.state == "complete" and not run.first:
            self._durations.append(now - self._trial_start(run))
        result.attempts = run.attempt
        results.append(result)

    @staticmethod
    def _failed_result(run: _Running, error: str) -> TrialResult:
        return TrialResult(trial_id=run.trial_id, state="failed", attempts=run.attempt, error=error)

    def _release(self, slot: _Slot) -> None:
        slot.busy_s += time.perf_counter() - (slot.busy_since or time.perf_counter())
        slot.busy_since = None

    # ---- lost workers --------------------------------------------------------------------------
    def _lost(self, run: _Running, why: str, detail: str) -> None:
        """``run``'s actor is gone or given up on (its slot is already released): replace the actor,
        then hold the trial for another dispatch, or fail it if it had all its attempts."""
        self._replace(run.slot)
        run.history.append(f"attempt {run.attempt}: {why} ({detail})")
        log.warning("trial %s, attempt %d of %d: %s (%s)", run.trial_id, run.attempt, self.max_attempts,
                    why, detail)
        if run.attempt < self.max_attempts:
            self._retries.append(_Retry(run, RetryNotice(run.trial_id, run.attempt + 1, why, detail)))
            return
        self._failed.append(self._failed_result(
            run, f"{why}: the trial was dispatched {run.attempt} time(s), the most allowed "
                 f"({self.max_attempts}, docs/workers.md), and lost its worker each time: "
                 + "; ".join(run.history)))

    def _abandon(self, ref: Any, why: str, detail: str) -> None:
        """Give up on a trial still in flight (its actor is killed by the replacement)."""
        run = self.running.pop(ref)
        self._release(run.slot)
        self._lost(run, why, detail)

    def _classify(self, err: BaseException, slot: _Slot) -> tuple[str, str]:
        """(why, detail) of a Ray error: the node died, the actor never started, it cannot be
        reached (yet), or its worker process died."""
        from ray.exceptions import ActorUnavailableError, NodeDiedError, RayActorError

        detail = _brief(err)
        if isinstance(err, NodeDiedError) or "node has died" in str(err) or self._node_dead(slot):
            return NODE_DIED, detail
        if isinstance(err, RayActorError) and getattr(err, "actor_init_failed", False):
            return INIT_FAILED, detail
        if isinstance(err, ActorUnavailableError):
            return UNRESPONSIVE, detail
        return WORKER_DIED, detail

    def _node_dead(self, slot: _Slot) -> bool:
        return slot.node_id is not None and slot.node_id not in self._alive_nodes(slot.node_id)

    @staticmethod
    def _alive_nodes(default: str | None = None) -> set[str]:
        """IDs of the nodes Ray lists as alive (``{default}`` when Ray cannot be asked)."""
        import ray

        try:
            return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception as err:
            log.warning("Ray's node table could not be read: %s", _brief(err))
            return {default} if default else set()

    def _trial_start(self, run: _Running) -> float:
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

    def _running_on(self, slot: _Slot) -> Any | None:
        return next((ref for ref, run in self.running.items() if run.slot is slot), None)

    def _actor_gone(self, slot: _Slot, why: str, detail: str) -> None:
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

    def _replace(self, slot: _Slot) -> None:
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
