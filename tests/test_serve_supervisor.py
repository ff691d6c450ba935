"""``evomerge serve`` runs the study controller as a supervised child process
(service/controller_process.py): a controller killed with SIGKILL is started again and the
study continues, every trial counted once; serve's exit — SIGTERM, or its own SIGKILL —
stops the controller; ``--controller in-process`` keeps it in a thread of the API process.

The supervisor itself is tested first with stand-in children (a few seconds, no Ray). The
servers join this test session's Ray (``ray_local``, EVOMERGE_RAY_ADDRESS) so that a
restarted controller needs no Ray of its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.controller_faults import WriteFaultRecovery
from service.controller_process import ControllerProcess, decode_state, encode_state, settings_env
from service.faults import DISK_FULL, Stall, WriteFault
from service.settings import Settings, get_settings

REPO = Path(__file__).resolve().parents[1]

# A stand-in for the controller: reports one state line (so the test knows it is ready), then
# behaves as argv[1] says; the supervisor appends the status pipe's descriptor to its argv.
CHILD = r"""
import json, os, signal, sys, time
mode, fd = sys.argv[1], int(sys.argv[-1])
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "exit":
    sys.exit(3)
fault = {"kind": "disk_full", "what": "the disk is full", "error": "OperationalError",
         "since": "2026-01-01T12:00:00+00:00"} if mode == "fault" else None
state = {"fault": fault, "every_study": "stalled" if fault else None, "studies": {"s1": "repairing"}}
os.write(fd, json.dumps(state).encode() + b"\n")
time.sleep(60)
"""


def _wait(what: str, done: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := done()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def _supervisor(tmp_path: Path, mode: str, **kwargs: Any) -> ControllerProcess:
    settings = get_settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'x.db'}")
    return ControllerProcess(settings, command=[sys.executable, "-c", CHILD, mode], **kwargs)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---- the supervisor, with stand-in children ------------------------------------------------------
def test_settings_travel_to_the_child_as_the_same_settings(tmp_path, monkeypatch):
    for key in list(os.environ):
        if key.startswith("EVOMERGE_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    settings = get_settings(data_dir=tmp_path, database_url="postgresql://u@127.0.0.1/x",
                            model_roots=[str(tmp_path / "a"), str(tmp_path / "b")], hub_allowlist=["x/*"],
                            max_workers=3, worker_host_memory="2GiB", score_cache=False, ray_address=None)
    for key, value in settings_env(settings).items():
        if value is not None:
            monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_a_killed_child_is_started_again_and_its_state_is_shown(tmp_path):
    sup = _supervisor(tmp_path, "sleep", backoff_s=(0.05, 0.2))
    sup.start()
    try:
        first = _wait("the first child", lambda: sup.health()["pid"])
        _wait("its state line", lambda: sup.status_reason("s1"))
        assert sup.status_reason("s1") == "repairing" and sup.status_reason("s2") is None
        assert sup.problem() is None and sup.health()["restarts"] == 0
        os.kill(first, signal.SIGKILL)
        second = _wait("a new child", lambda: (pid := sup.health()["pid"]) not in (None, first) and pid)
        health = sup.health()
        assert health["restarts"] == 1 and health["last_exit"] == "killed by SIGKILL" and health["running"]
        assert not _alive(first)
    finally:
        sup.stop()
    assert not _alive(second) and not sup.running()


def test_a_child_that_keeps_dying_is_restarted_with_a_growing_pause_and_each_exit_logged(tmp_path):
    logger = logging.getLogger("uvicorn.error.controller")
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    sup = _supervisor(tmp_path, "exit", backoff_s=(0.1, 0.4))
    try:
        sup.start()
        _wait("three restarts", lambda: sup.restarts >= 3)
        assert sup.last_exit == "exit code 3"
        problem = _wait("a down moment", sup.problem, timeout=5)
        assert "not running (it ended with exit code 3" in problem, problem
    finally:
        sup.stop()
        logger.removeHandler(handler)
    assert len(lines) >= 3 and all("ended with exit code 3" in line for line in lines), lines
    pauses = [float(line.split("starting it again in ")[1].split(" s")[0]) for line in lines]
    assert pauses[:3] == [0.1, 0.2, 0.4] and max(pauses) == 0.4, pauses  # doubling, capped


def test_a_write_fault_of_the_child_reads_as_the_controllers(tmp_path):
    sup = _supervisor(tmp_path, "fault")
    sup.start()
    try:
        fault = _wait("the fault", lambda: sup.fault)
        assert fault.status_code == 507 and "free space" in fault.reason
        assert sup.status_reason("any") == "stalled" and sup.status_reason("s1") == "repairing"
        os.kill(sup.health()["pid"], signal.SIGKILL)
        _wait("the fault forgotten with its process", lambda: sup.fault is None)
    finally:
        sup.stop()


def test_stop_kills_a_child_that_ignores_sigterm_after_the_grace(tmp_path):
    sup = _supervisor(tmp_path, "stubborn", grace_s=0.5)
    sup.start()
    _wait("the child's handler", lambda: sup.status_reason("s1"))
    pid = sup.health()["pid"]
    started = time.monotonic()
    sup.stop()
    assert time.monotonic() - started >= 0.5
    assert not _alive(pid) and sup.restarts == 0


def test_the_controllers_state_survives_the_pipe():
    class Stalled(WriteFaultRecovery):
        pass

    controller = Stalled()
    controller._init_fault_state()
    assert decode_state(encode_state(controller)) == (None, None, {})
    controller._needs_repair = {"s1"}
    assert decode_state(encode_state(controller))[2] == {"s1": controller.status_reason("s1")}
    controller.fault = Stall(WriteFault(DISK_FULL, "the disk is full", "OperationalError"),
                             since=datetime(2026, 1, 1, 12, tzinfo=timezone.utc))
    stall, every, _ = decode_state(json.loads(json.dumps(encode_state(controller))))
    assert stall is not None and stall.reason == controller.fault.reason
    assert stall.since == controller.fault.since
    assert every == controller.status_reason("other") and "stalled since 2026-01-01 12:00:00" in every


# ---- the real thing: evomerge serve ----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """``evomerge serve`` in its own process group (killed whole at the end, whatever happens)."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = log
        self._out = log.open("ab")
        script = Path(sys.executable).parent / "evomerge"
        cmd = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
        self.proc = subprocess.Popen([*cmd, "serve", "--port", self.url.rsplit(":", 1)[1], "--log-level",
                                      "warning", *args], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def tail(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def get(self, path: str, **params: Any) -> Any:
        r = self.http.get(path, params=params)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:500]}\n{self.tail()}"
        return r.json()

    def health(self) -> dict[str, Any]:
        with contextlib.suppress(httpx.HTTPError):
            r = self.http.get("/health", timeout=5)
            assert r.headers.get("content-type") == "application/json", f"/health: {r.status_code} {r.text}"
            return r.json()
        return {}

    def wait_healthy(self) -> dict[str, Any]:
        def ok() -> dict[str, Any]:
            assert self.proc.poll() is None, f"serve exited:\n{self.tail()}"
            health = self.health()
            return health if health.get("status") == "ok" else {}

        return _wait("serve's health", ok, timeout=90)

    def close(self) -> None:
        self.http.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._out.close()


@pytest.fixture
def serve_env(ray_local, model_root, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVOMERGE_", "RAY_ADDRESS"))}
    env.update({"EVOMERGE_DATABASE_URL": f"sqlite:///{tmp_path / 'evomerge.db'}",
                "EVOMERGE_DATA_DIR": str(tmp_path / "data"), "EVOMERGE_MODEL_ROOTS": str(model_root),
                "EVOMERGE_RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
                "EVOMERGE_MAX_WORKERS": "2", "EVOMERGE_LEASE_SECONDS": "60", "EVOMERGE_AUTH": "false",
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return env


def _spec(llama: tuple[Path, list[Path]], budget: int) -> dict[str, Any]:
    base, (e0, e1) = llama
    return {"name": "supervised", "sources": [str(e0), str(e1)], "base_model": str(base),
            "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
            "evaluation": {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}],
                           "options": {"delay_s": 0.3}},
            "optimizer": {"name": "optuna-cmaes", "population_size": 4},
            "budget": {"max_trials": budget}, "parallelism": 2, "seed": 0}


@pytest.mark.slow
def test_serve_restarts_a_killed_controller_and_the_study_completes(family, serve_env, tmp_path):
    import psutil
    from sqlalchemy import select

    from service.db import Event, make_engine, session_factory

    budget = 12
    server = Serve(serve_env, tmp_path / "serve.log")
    try:
        health = server.wait_healthy()
        assert health["controller"]["mode"] == "process" and health["controller"]["running"], health
        first = health["controller"]["pid"]
        assert first in {p.pid for p in psutil.Process(server.proc.pid).children()}
        r = server.http.post("/studies", json=_spec(family("llama"), budget))
        assert r.status_code == 201, r.text
        sid = r.json()["id"]

        def running_after_some() -> bool:
            study = server.get(f"/studies/{sid}")
            assert study["status"] in ("queued", "running"), study
            page = server.get(f"/studies/{sid}/trials", state="running")
            return study["trials_done"] >= 3 and bool(page["items"])

        _wait("trials running after a few finished", running_after_some, timeout=180)
        os.kill(first, signal.SIGKILL)  # the controller alone
        running_at_kill = {t["number"] for t in server.get(
            f"/studies/{sid}/trials", state="running")["items"]}

        health = _wait("the controller back", lambda: (h := server.health()).get("controller", {}).get(
            "pid") not in (None, first) and h)["controller"]
        assert (health["restarts"], health["last_exit"]) == (1, "killed by SIGKILL")
        assert server.proc.poll() is None  # serve itself never noticed beyond that
        second = health["pid"]

        def finished() -> dict[str, Any]:
            study = server.get(f"/studies/{sid}")
            return study if study["status"] not in ("queued", "running") else {}

        study = _wait("the study to finish", finished, timeout=240)
        assert study["status"] == "completed" and study["trials_done"] == budget, study
        rows = server.get(f"/studies/{sid}/trials", limit=100)["items"]
        assert sorted(t["number"] for t in rows) == list(range(budget))
        assert all(t["state"] == "complete" for t in rows), [(t["number"], t["state"]) for t in rows]
        assert running_at_kill and {t["number"] for t in rows if t["attempts"] == 2} == running_at_kill
        assert "was killed by SIGKILL" in server.tail()

        # serve's exit (SIGTERM) stops the controller: no orphan
        server.proc.terminate()
        server.proc.wait(60)
        _wait("the controller to stop with serve", lambda: not _alive(second), timeout=30)
    finally:
        server.close()
    engine = make_engine(serve_env["EVOMERGE_DATABASE_URL"])
    with session_factory(engine)() as s:
        kinds = [e.kind for e in s.scalars(select(Event).where(Event.study_id == sid))]
    engine.dispose()
    assert kinds.count("trial_complete") == budget and kinds.count("study_completed") == 1  # counted once


@pytest.mark.slow
def test_a_controller_outlives_no_serve_killed_with_sigkill(serve_env, tmp_path):
    server = Serve(serve_env, tmp_path / "serve.log")
    try:
        pid = server.wait_healthy()["controller"]["pid"]
        server.proc.kill()  # serve alone, not its group: the controller must notice by itself
        server.proc.wait(30)
        _wait("the controller to stop by itself", lambda: not _alive(pid), timeout=30)
    finally:
        server.close()


@pytest.mark.slow
def test_the_in_process_controller_is_still_there(serve_env, tmp_path):
    server = Serve(serve_env, tmp_path / "serve.log", "--controller", "in-process")
    try:
        health = server.wait_healthy()
        assert health["controller"] == {"mode": "in-process", "running": True, "pid": None, "restarts": 0,
                                        "last_exit": None, "up_since": None, "next_start_in_s": None}
        import psutil

        assert not [p for p in psutil.Process(server.proc.pid).children() if "service.controller" in
                    " ".join(p.cmdline())]
    finally:
        server.close()
    off = Serve(serve_env, tmp_path / "serve.log", "--no-controller")
    try:
        assert off.wait_healthy()["controller"] is None
    finally:
        off.close()
