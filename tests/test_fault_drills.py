"""Fault drills: a trial whose worker, actor or node disappears, or that hangs, is found and run
again, with a true attempt count (``attempts`` = the trial's dispatches to a worker), a
``trial_retried`` event for every retry, and the limit of docs/workers.md ("When a worker is
lost") honoured; the study ends with exactly its budget.

(a) a worker killed mid-trial, and one killed during a trial's post-restart retry;
(b) a hung trial past its deadline (the pool alone, and a study with ``trial_timeout_seconds``);
(c) a Ray node SIGKILLed mid-study, on a real cluster of raylets on this machine.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.controller import Controller
from service.db import Event, StudyStatus, Trial, TrialState
from tests.test_controller import add_study, db, llama, settings, spec, step_until, study_row, trials
from workers.pool import WorkerPool
from workers.retry import MAX_ATTEMPTS

__all__ = ["db", "llama", "settings"]  # fixtures, shared with test_controller

REPO = Path(__file__).resolve().parents[1]


# ---- helpers ----------------------------------------------------------------------------------
@pytest.fixture
def dispatches(monkeypatch) -> Counter:
    """trial id -> how many times a pool of this process sent it to an actor."""
    counts: Counter = Counter()
    original = getattr(WorkerPool, "_dispatch", None)

    def counting(self, run, *args):
        counts[run.trial_id] += 1
        return original(self, run, *args)

    monkeypatch.setattr(WorkerPool, "_dispatch", counting, raising=False)
    return counts


def study_spec(llama, *, trials: int, delay: float, parallelism: int = 1, **changes: Any) -> dict[str, Any]:
    """test_controller's study, with the random optimizer (no generations to wait for)."""
    return spec(llama, trials=trials, delay=delay, optimizer="random", parallelism=parallelism,
                **{"name": "fault drill", **changes})


def ended(sessions, study_id: str) -> bool:
    """Has the study stopped (asserted to be completed, with its error if it is not)?"""
    study = study_row(sessions, study_id)
    if study.status in (StudyStatus.QUEUED, StudyStatus.RUNNING):
        return False
    assert study.status == StudyStatus.COMPLETED, (study.status, study.error)
    return True


def retried_events(sessions, study_id: str) -> list[dict[str, Any]]:
    with sessions() as s:
        return [e.data for e in s.scalars(select(Event).where(Event.study_id == study_id,
                                                               Event.kind == "trial_retried")
                                          .order_by(Event.id))]


def running_trial(controller: Controller, number: int) -> tuple[Any, Any] | None:
    """(pool, the pool's record of the run) of the trial with this number, once it is dispatched."""
    for pool in controller.pools.values():
        for run in pool.running.values():
            for rt in controller.runtimes.values():
                if rt.in_flight.get(run.trial_id) == number:
                    return pool, run
    return None


def worker_pid(pool: WorkerPool, run: Any) -> int:
    """The process of the actor running ``run`` (answers once the actor is set up)."""
    import ray

    return ray.get(run.slot.actor.pid.remote(), timeout=120)


def assert_true_attempts(rows: list[Trial], events: list[dict[str, Any]]) -> None:
    """Every retry wrote an event, and a trial's attempts are its first dispatch plus its retries."""
    per_number = Counter(e["number"] for e in events)
    for t in rows:
        assert t.attempts == 1 + per_number[t.number], (t.number, t.attempts, events)
        assert t.attempts <= MAX_ATTEMPTS
    for e in events:
        assert {"number", "attempt", "why"} <= set(e), e


def kill_worker_of(controller: Controller, number: int) -> Any:
    """Once trial ``number`` runs, SIGKILL its worker's process; returns the pool's record of the run."""
    step_until(controller, lambda: running_trial(controller, number) is not None)
    pool, run = running_trial(controller, number)
    pid = worker_pid(pool, run)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    return run


# ---- (a) a worker killed -----------------------------------------------------------------------
def test_a_worker_killed_mid_trial_is_retried_with_an_event(llama, db, settings, ray_local, dispatches):
    _, sessions = db
    sid = add_study(sessions, study_spec(llama, trials=4, delay=1.5, parallelism=2))
    controller = Controller(settings, sessions)
    try:
        kill_worker_of(controller, 1)
        step_until(controller, lambda: ended(sessions, sid))
    finally:
        controller.stop()
    rows = trials(sessions, sid)
    assert [t.number for t in rows] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in rows), [(t.number, t.failure_reason) for t in rows]
    assert [t.attempts for t in rows] == [1, 2, 1, 1]
    events = retried_events(sessions, sid)
    assert [(e["number"], e["attempt"], e["why"]) for e in events] == [(1, 2, "worker died")]
    assert_true_attempts(rows, events)
    assert {t.id: dispatches[t.id] for t in rows} == {t.id: t.attempts for t in rows}
    assert study_row(sessions, sid).trials_done == 4


def test_a_worker_killed_during_a_post_restart_retry_fails_the_trial_at_the_limit(
        llama, db, settings, ray_local, dispatches):
    """The first controller stops while trial 0 runs (attempt 1); the next one runs it again
    (attempt 2, the limit) and that worker is killed too: the trial is failed, not run a third time."""
    _, sessions = db
    sid = add_study(sessions, study_spec(llama, trials=3, delay=1.5))
    first = Controller(settings, sessions)
    try:
        step_until(first, lambda: running_trial(first, 0) is not None)
    finally:
        first.stop()  # trials running stay `running` in the database, as after a crash
    assert [(t.number, t.state, t.attempts) for t in trials(sessions, sid)] == [(0, TrialState.RUNNING, 1)]
    dispatches.clear()

    second = Controller(settings, sessions)
    try:
        run = kill_worker_of(second, 0)
        assert run.attempt == 2
        step_until(second, lambda: ended(sessions, sid))
    finally:
        second.stop()
    rows = trials(sessions, sid)
    assert [t.number for t in rows] == [0, 1, 2]
    zero = rows[0]
    assert zero.state == TrialState.FAILED and zero.attempts == MAX_ATTEMPTS == 2
    assert "worker died" in zero.failure_reason and "the most allowed (2" in zero.failure_reason
    assert [(t.state, t.attempts) for t in rows[1:]] == [(TrialState.COMPLETE, 1)] * 2
    events = retried_events(sessions, sid)
    assert [(e["number"], e["attempt"], e["why"]) for e in events] == [(0, 2, "controller restarted")]
    assert_true_attempts(rows, events)
    assert dispatches[zero.id] == 1  # after the restart: its second run only, no third
    study = study_row(sessions, sid)
    assert study.trials_done == 3 and study.trials_failed == 1


# ---- (b) a trial that hangs -----------------------------------------------------------------------
def test_a_hung_trial_is_abandoned_at_its_deadline_and_failed_at_the_limit(llama, ray_local):
    from evaluators.base import EvaluationSpec, ObjectiveSpec
    from search_spaces.recipe import Recipe
    from workers.trial import WorkerSpec

    base, experts = llama
    spec = WorkerSpec(sources=[str(e) for e in experts], base_model=str(base), evaluation=EvaluationSpec(
        evaluator="noop", objectives=[ObjectiveSpec(task="fingerprint", metric="mean")],
        options={"delay_s": 120.0}))
    recipe = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(base),
                               "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts]})
    notices = []
    # no warm-up allowance: the evaluation hangs on every run, a new worker's first one included
    pool = WorkerPool(spec, n=1, on_retry=notices.append, warmup_s=0)
    try:
        pids = [pool.pids()[0]]
        start = time.monotonic()
        pool.submit(5, recipe, timeout_s=2.0)
        results = []
        while not results:
            results = pool.wait(timeout=1.0)
            if len(pids) < 2 and notices:  # the retry runs on a new actor
                pids.append(pool.pids()[0])
        took = time.monotonic() - start
    finally:
        pool.shutdown()
    (result,) = results
    assert result.state == "failed" and result.attempts == 2
    assert "deadline exceeded" in result.error and "trial_timeout_seconds" in result.error
    assert [(n.trial_id, n.attempt, n.why) for n in notices] == [(5, 2, "deadline exceeded")]
    assert took < 100, took  # two deadlines of 2 s and a new actor, not the 120 s evaluation
    assert pool.replaced == 2 and len(set(pids)) == 2
    _assert_gone(pids)


def _assert_gone(pids: list[int]) -> None:
    import psutil

    deadline = time.monotonic() + 30
    for pid in pids:
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"the abandoned worker {pid} still runs"
            time.sleep(0.2)


def test_a_study_trial_that_hangs_once_is_run_again_and_the_study_completes(
        llama, db, settings, ray_local, dispatches):
    """A worker frozen (SIGSTOP) mid-trial: the trial passes the study's trial_timeout_seconds, its
    worker is replaced and the trial runs again on the new one."""
    _, sessions = db
    sid = add_study(sessions, study_spec(llama, trials=4, delay=0.3, parallelism=2,
                                         trial_timeout_seconds=3))
    controller = Controller(settings, sessions)
    frozen = None
    try:
        step_until(controller, lambda: running_trial(controller, 1) is not None)
        pool, run = running_trial(controller, 1)
        frozen = worker_pid(pool, run)
        os.kill(frozen, signal.SIGSTOP)
        step_until(controller, lambda: ended(sessions, sid))
    finally:
        controller.stop()
        if frozen is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGKILL)
    rows = trials(sessions, sid)
    events = retried_events(sessions, sid)
    assert [t.number for t in rows] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in rows), [(t.number, t.failure_reason) for t in rows]
    # the frozen trial may be trial 1 or, had trial 1 finished before the SIGSTOP landed, the next one
    assert len(events) == 1 and events[0]["why"] == "deadline exceeded" and events[0]["attempt"] == 2
    assert "trial_timeout_seconds" in events[0]["detail"]
    assert_true_attempts(rows, events)
    assert {t.id: dispatches[t.id] for t in rows} == {t.id: t.attempts for t in rows}


# ---- (c) a Ray node killed mid-study ------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayNode:
    """``ray start ... --block`` in a session of its own: a raylet (the head: also the GCS) and
    every process it starts share that session's process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log = logs / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *args,
                                          "--disable-usage-stats", "--block"],
                                         env=env, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"{self.name} exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} did not start:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the node at once: its raylet, its worker processes, everything it started."""
        import psutil

        try:
            family = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in family:  # any that left the group
            with contextlib.suppress(psutil.Error):
                p.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


@pytest.mark.slow
def test_a_ray_node_killed_mid_study_loses_no_trial(llama, db, model_root, tmp_path):
    """A cluster of raylets on this machine: the head (GCS, no CPUs: no work lands there) and node
    B, where the study's two workers are placed; the controller joins through the head's address.
    B is SIGKILLed mid-study (its raylet, its workers, everything it started) and node C joins:
    the lost trials are found (Ray's errors, Ray's node table), their workers replaced on C, and
    the study ends with exactly its budget."""
    url, sessions = db
    budget = 12
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))  # short: Ray's socket paths have a limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EVOMERGE_"))}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),  # the same for all
                # Ray marks a silent node dead after 3 missed 1 s health checks (by default ~15 s)
                "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                "RAY_health_check_failure_threshold": "3",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    nodes: list[RayNode] = []
    controller = None
    try:
        head = RayNode("head", ["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=0",
                                "--num-gpus=0", "--include-dashboard=false", f"--temp-dir={temp}"],
                       env, tmp_path)
        nodes.append(head)
        head.wait_started()
        worker_args = [f"--address={address}", "--num-gpus=0", f"--temp-dir={temp}"]
        node_b = RayNode("node-b", [*worker_args, "--num-cpus=2"], env, tmp_path)
        nodes.append(node_b)
        node_b.wait_started()

        sid = add_study(sessions, study_spec(llama, trials=budget, delay=0.5, parallelism=2))
        controller_env = {**env, "EVOMERGE_RAY_ADDRESS": address, "EVOMERGE_MODEL_ROOTS": str(model_root),
                          "EVOMERGE_MAX_WORKERS": "2", "EVOMERGE_DATA_DIR": str(tmp_path / "data"),
                          "EVOMERGE_LEASE_SECONDS": "60"}
        controller_log = tmp_path / "controller.log"
        with controller_log.open("wb") as out:
            controller = subprocess.Popen([sys.executable, "-m", "service.controller", "--database-url", url,
                                           "--exit-when-idle"], cwd=REPO, env=controller_env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def progress(at_least: int, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while study_row(sessions, sid).trials_done < at_least:
                assert controller.poll() is None, controller_log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no progress:\n{controller_log.read_text()[-3000:]}"
                time.sleep(0.1)

        progress(2, 120)  # the workers are up, on B: the only node with CPUs
        deadline = time.monotonic() + 30
        while not any(t.state == TrialState.RUNNING for t in trials(sessions, sid)):
            assert time.monotonic() < deadline, "the kill must fall while trials run"
            time.sleep(0.05)
        node_b.kill()
        print(f"node B killed at {time.strftime('%H:%M:%S')}")
        running = {t.number for t in trials(sessions, sid) if t.state == TrialState.RUNNING}
        assert running, "the kill must fall while trials run"
        # capacity comes back: the lost trials' new workers are placed on C
        node_c = RayNode("node-c", [*worker_args, "--num-cpus=2"], env, tmp_path)
        nodes.append(node_c)

        try:
            controller.wait(120)
        except subprocess.TimeoutExpired:
            pytest.fail("the study did not finish after the node died:\n"
                        + controller_log.read_text()[-4000:])
        assert controller.returncode == 0, controller_log.read_text()[-3000:]
    finally:
        if controller is not None and controller.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(controller.pid, signal.SIGKILL)
            controller.wait(10)
        for node in reversed(nodes):
            node.kill()
        import shutil

        shutil.rmtree(temp, ignore_errors=True)

    study = study_row(sessions, sid)
    rows = trials(sessions, sid)
    assert study.status == StudyStatus.COMPLETED
    assert [t.number for t in rows] == list(range(budget))
    assert all(t.state in (TrialState.COMPLETE, TrialState.FAILED) for t in rows)
    assert study.trials_done == budget
    events = retried_events(sessions, sid)
    assert events, "the trials running on the killed node were not retried"
    assert {e["number"] for e in events} <= running
    assert {e["why"] for e in events} <= {"node died", "worker died", "worker unresponsive"}, events
    assert_true_attempts(rows, events)
    retried = [t for t in rows if t.number in {e["number"] for e in events}]
    assert all(t.state == TrialState.COMPLETE and t.attempts == 2 for t in retried), [
        (t.number, t.state, t.attempts, t.failure_reason) for t in retried]
