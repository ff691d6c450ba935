"""A real ``evomerge serve`` killed with SIGKILL mid-study and started again: the study
completes with exactly its budget of trials (none lost or duplicated) and the CMA-ES
generation continues rather than restarting.

The server runs in its own session with its own local Ray (no ``RAY_ADDRESS``); the kill is
``os.killpg(SIGKILL)`` on that session's process group — the server, Ray's GCS, raylet and
workers at once, as when the machine dies — and no process of it may survive.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.db import Event, Study, Trial, TrialState, make_engine, optuna_storage, session_factory

REPO = Path(__file__).resolve().parents[1]
BUDGET = 16
KILL_AFTER = 5  # trials finished before the kill
DELAY_S = 0.5  # the run time of a trial (the noop evaluator sleeps)

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command() -> list[str]:
    script = Path(sys.executable).parent / "evomerge"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "service.cli", "serve"]


class Server:
    """``evomerge serve`` in its own session (its process group: it, Ray's processes and workers)."""

    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = log.open("ab")
        self.proc = subprocess.Popen([*_command(), "--port", str(port), "--log-level", "warning"],
                                     cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid  # a session leader: its pid is its process group's id

    def tail(self, n: int = 4000) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-n:]

    def check_alive(self) -> None:
        assert self.proc.poll() is None, f"evomerge serve exited ({self.proc.returncode}):\n{self.tail()}"

    def wait_healthy(self, http: httpx.Client, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if http.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            assert time.monotonic() < deadline, f"evomerge serve never became healthy:\n{self.tail()}"
            time.sleep(0.2)

    def descendants(self) -> list[Any]:
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_group(self) -> list[Any]:
        """SIGKILL the whole process group (a crash of the machine); returns the processes that
        were descendants of the server and are still alive afterwards (should be none)."""
        import psutil

        family = self.descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        self.proc.wait(30)
        _, alive = psutil.wait_procs(family, timeout=15)
        alive = [p for p in alive if _running(p)]
        for p in alive:  # never leak them into the rest of the session, even when the test fails
            with contextlib.suppress(psutil.Error):
                p.kill()
        return alive

    def stop(self) -> None:
        """A clean stop (SIGTERM to the server: uvicorn's shutdown stops the controller), then SIGKILL
        whatever of its group is left."""
        import psutil

        family = self.descendants()
        if self.proc.poll() is None:
            self.proc.terminate()  # the server only: its shutdown stops the workers and Ray
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self._log_file.close()


def _running(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _spec(llama: tuple[Path, list[Path]]) -> dict[str, Any]:
    base, (e0, e1) = llama
    return {
        "name": "serve restart",
        "sources": [str(e0), str(e1)],
        "base_model": str(base),
        "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
        "evaluation": {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}],
                       "options": {"delay_s": DELAY_S}},
        "optimizer": {"name": "optuna-cmaes", "population_size": 4},
        "budget": {"max_trials": BUDGET},
        "parallelism": 2,
        "seed": 0,
    }


def _trials(http: httpx.Client, url: str, study_id: str) -> list[dict[str, Any]]:
    r = http.get(f"{url}/studies/{study_id}/trials", params={"limit": 500, "include": "params"})
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _fresh_running(http: httpx.Client, url: str, study_id: str) -> bool:
    """Is a trial running that started less than half its run time ago? (So that the kill
    that follows at once lands while it runs: a trial to be retried after the restart.)"""
    r = http.get(f"{url}/studies/{study_id}/trials", params={"state": "running", "limit": 10})
    assert r.status_code == 200, r.text
    now = datetime.now(timezone.utc)
    started = [datetime.fromisoformat(t["started_at"].replace("Z", "+00:00"))  # 3.10 reads no "Z"
               for t in r.json()["items"] if t["started_at"]]
    return any((now - at).total_seconds() < DELAY_S / 2 for at in started)


def _generation(trial: dict[str, Any]) -> int:
    gen = ((trial.get("metrics") or {}).get("optimizer") or {}).get("generation")
    assert gen is not None, f"trial {trial['number']} has no CMA-ES generation: {trial.get('metrics')}"
    return int(gen)


def test_serve_killed_mid_study_and_restarted_completes_the_study(family, model_root, tmp_path):
    import optuna

    llama = family("llama")
    db_url = f"sqlite:///{tmp_path / 'evomerge.db'}"
    # its own settings only, and no RAY_ADDRESS: the server starts a local Ray of its own
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVOMERGE_", "RAY_ADDRESS"))}
    env.update({
        "EVOMERGE_DATABASE_URL": db_url,
        "EVOMERGE_DATA_DIR": str(tmp_path / "data"),
        "EVOMERGE_MODEL_ROOTS": str(model_root),
        "EVOMERGE_HOST": "127.0.0.1",
        "EVOMERGE_AUTH": "false",
        "EVOMERGE_MAX_WORKERS": "2",
        "EVOMERGE_LEASE_SECONDS": "60",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    })
    log = tmp_path / "serve.log"
    http = httpx.Client(timeout=30)
    servers: list[Server] = []
    try:
        # ---- the first server: submit, let some trials finish, then crash it -----------------
        first = Server(env, _free_port(), log)
        servers.append(first)
        first.wait_healthy(http)
        r = http.post(f"{first.url}/studies", json=_spec(llama))
        assert r.status_code == 201, r.text
        study_id = r.json()["id"]

        deadline = time.monotonic() + 180
        while True:
            first.check_alive()
            study = http.get(f"{first.url}/studies/{study_id}").json()
            assert study["status"] in ("queued", "running"), (study, first.tail())
            if study["trials_done"] >= KILL_AFTER and _fresh_running(http, first.url, study_id):
                break
            assert time.monotonic() < deadline, f"no progress before the kill: {study}\n{first.tail()}"
            time.sleep(0.05)
        survivors = first.kill_group()
        assert not survivors, f"processes of the killed server survived SIGKILL of its group: {survivors}"

        # ---- what the crash left: read straight from the database (no server is running) ------
        engine = make_engine(db_url)
        sessions = session_factory(engine)
        try:
            with sessions() as s:
                row = s.get(Study, study_id)
                assert row is not None
                assert row.status.value == "running", "the study must still be unfinished at the kill"
                optuna_name = row.optuna_study_name
                before = list(s.scalars(select(Trial).where(Trial.study_id == study_id)
                                        .order_by(Trial.number)))
            assert KILL_AFTER <= len(before) < BUDGET, [t.number for t in before]
            assert [t.number for t in before] == list(range(len(before)))
            running_at_kill = {t.number for t in before if t.state == TrialState.RUNNING}
            assert running_at_kill, "the kill should fall while trials are running (mid-study)"
            # (trial 0 is the space's start, enqueued: CMA-ES sampled it in no generation)
            gen_before = max(int(t.metrics["optimizer"]["generation"]) for t in before
                             if "optimizer" in (t.metrics or {}))
            numbers_before = len(before)

            # ---- the second server on the same database: it continues the study ---------------
            second = Server(env, _free_port(), log)
            servers.append(second)
            second.wait_healthy(http)
            deadline = time.monotonic() + 240
            while True:
                second.check_alive()
                study = http.get(f"{second.url}/studies/{study_id}").json()
                if study["status"] not in ("queued", "running"):
                    break
                assert time.monotonic() < deadline, f"the study never completed: {study}\n{second.tail()}"
                time.sleep(0.2)
            assert study["status"] == "completed", (study, second.tail())
            rows = _trials(http, second.url, study_id)
            second.stop()

            # exactly its budget of trials: numbers 0..N-1, each once, all complete
            assert [t["number"] for t in rows] == list(range(BUDGET))
            assert all(t["state"] == "complete" for t in rows), [(t["number"], t["state"],
                                                                   t["failure_reason"]) for t in rows]
            assert study["trials_done"] == BUDGET and study["trials_failed"] == 0
            # the trials running at the kill were re-run once (same point), the rest ran once
            retried = {t["number"] for t in rows if t["attempts"] == 2}
            assert retried == running_at_kill
            assert all(t["attempts"] == 1 for t in rows if t["number"] not in retried)
            for old in before:
                new = rows[old.number]
                assert new["params"] == pytest.approx(old.params)
                if old.state == TrialState.COMPLETE:  # recorded before the kill: kept as it was
                    assert new["values"] == pytest.approx(old.values)
            with sessions() as s:
                kinds = [e.kind for e in s.scalars(select(Event).where(Event.study_id == study_id))]
            assert kinds.count("trial_complete") == BUDGET  # none recorded twice
            assert kinds.count("trial_retried") == len(running_at_kill)
            assert kinds.count("study_completed") == 1

            # the CMA-ES generation continued: never back below where it was at the kill
            # (trial 0 is the space's start, which CMA-ES did not sample)
            assert not (rows[0].get("metrics") or {}).get("optimizer"), rows[0]
            gens = [_generation(t) for t in rows[1:]]
            assert gens == sorted(gens), gens
            assert all(g >= gen_before for g in gens[numbers_before - 1:]), (gen_before, gens)
            assert gens[-1] > gen_before >= 1, (gen_before, gens)

            # Optuna's own record: every trial told exactly once, nothing left running
            ostudy = optuna.load_study(study_name=optuna_name, storage=optuna_storage(db_url))
            otrials = {t.number: t for t in ostudy.get_trials(deepcopy=False)}
            states = [t.state for t in otrials.values()]
            assert optuna.trial.TrialState.RUNNING not in states
            complete = sorted(n for n, t in otrials.items() if t.state == optuna.trial.TrialState.COMPLETE)
            assert len(complete) == BUDGET
            with sessions() as s:
                point_ids = {t.number: int(t.point_id) for t in s.scalars(
                    select(Trial).where(Trial.study_id == study_id))}
            assert sorted(point_ids.values()) == complete
            for t in rows:
                ot = otrials[point_ids[t["number"]]]
                assert ot.params == pytest.approx(t["params"]) and ot.values == pytest.approx(t["values"])
                if t["number"]:
                    assert ot.system_attrs.get("cma:generation") == _generation(t)
            # any other Optuna trial was asked but never recorded by us (the crash fell between the
            # two): told as a failure, which no CMA-ES generation counts
            others = {t.state for n, t in otrials.items() if n not in complete}
            assert others <= {optuna.trial.TrialState.FAIL}, others
        finally:
            engine.dispose()
    finally:
        for server in servers:
            server.stop()
        http.close()
