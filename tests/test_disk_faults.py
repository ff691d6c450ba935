"""Fault drills for the disk (issue 13, items 12 and 13).

- A full disk: the data directory on an 8 MB tmpfs, filled with a file mid-study. The stall is
  visible (``/health`` 503 with the reason, the study's ``status_reason``), a write the API
  cannot do answers 507, never 500; once the file is deleted the study continues by itself,
  ends with exactly its budget, a ``study_stalled`` event tells what happened, and Optuna's
  trials agree with ours (no RUNNING Optuna trial whose row is complete).
- A data directory that cannot be written (a read-only mount, a file where the directory
  should be): ``evomerge serve``, ``controller`` and ``demo`` exit with one line that names
  the path, why, and the setting to change.

Mounting needs root (we are root on the development and CI machines); without it the tmpfs
drills skip, saying why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from service.db import Event, Trial, TrialState, make_engine, optuna_storage, session_factory
from tests.api_fixtures import LiveServer
from tests.test_controller import spec

REPO = Path(__file__).resolve().parents[1]
BUDGET = 14
DELAY_S = 0.3


@contextlib.contextmanager
def tmpfs(where: Path, size: str, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (skips the test when mounting is impossible)."""
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc}): this drill needs root and mount(8)")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): "
                    "this drill needs root (or CAP_SYS_ADMIN)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(folder: Path) -> Path:
    """A file that takes every free page of ``folder``'s filesystem."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for chunk in (1 << 16, 1 << 12):
            with contextlib.suppress(OSError):
                while True:
                    fh.write(b"\0" * chunk)
    return filler


def _spec(llama: tuple[Path, list[Path]]) -> dict[str, Any]:
    return spec(llama, trials=BUDGET, delay=DELAY_S, name="disk full")


def _wait(what: str, check: Any, timeout: float, tail: Any = None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {tail() if tail else ''}"
        time.sleep(0.1)


def test_a_full_disk_stalls_visibly_and_the_study_recovers(family, model_root, tmp_path, ray_local):
    import optuna

    from service.app import create_app
    from service.settings import get_settings

    llama = family("llama")
    # 8 MB: with the score cache and the cost columns the study's SQLite database and its WAL no
    # longer fit in 2 MB even once the filler is gone (writes then never work again)
    with tmpfs(tmp_path / "disk", "8m") as disk:
        data = disk / "data"
        url = f"sqlite:///{data / 'evomerge.db'}"
        # min_free_bytes=0: the API relies on the write that fails (not on the free-space check)
        settings = get_settings(data_dir=data, database_url=url, model_roots=[str(model_root)], max_workers=2,
                                lease_seconds=60, min_free_bytes=0)
        app = create_app(settings, poll_seconds=0.1)
        server = LiveServer(app)
        server.start()
        http = httpx.Client(base_url=server.url, timeout=60)
        filler: Path | None = None
        try:
            assert http.get("/health").status_code == 200
            r = http.post("/studies", json=_spec(llama))
            assert r.status_code == 201, r.text
            sid = r.json()["id"]

            def study() -> dict[str, Any]:
                return http.get(f"/studies/{sid}").json()

            _wait("three trials", lambda: study()["trials_done"] >= 3, 90, study)
            r = http.post("/studies", json={**_spec(llama), "name": "to delete"})
            assert r.status_code == 201, r.text
            other = r.json()["id"]
            assert http.post(f"/studies/{other}/cancel").status_code == 200
            filler = fill(disk)

            # the stall is visible: the study says why, /health is degraded, writes answer 507
            reason = _wait("the study's status reason", lambda: study()["status_reason"], 30, study)
            assert "full" in reason and "free space" in reason, reason
            stalled = study()
            assert stalled["status"] == "running" and stalled["trials_done"] < BUDGET, stalled
            time.sleep(2.0)  # still full: no progress, and the stall does not come and go
            assert study()["status_reason"] and study()["trials_done"] == stalled["trials_done"]
            health = http.get("/health")
            assert health.status_code == 503, health.text
            problems = " | ".join(health.json()["problems"])
            assert "stalled" in problems and "full" in problems, problems
            assert "No space left" in problems, problems  # the data directory's write probe
            r = http.post("/studies", json=_spec(llama))
            assert r.status_code == 507, (r.status_code, r.text)
            assert "full" in r.json()["detail"] and r.headers.get("Retry-After")
            r = http.delete(f"/studies/{other}")  # a write that fails: 507, not 500
            assert r.status_code == 507, (r.status_code, r.text)
            assert "disk" in r.json()["detail"] and "full" in r.json()["detail"], r.text
            listed = {s["id"]: s for s in http.get("/studies").json()["items"]}
            assert listed[sid]["status_reason"] == study()["status_reason"]
            assert listed[other]["status_reason"] is None  # cancelled: nothing to wait for

            # space comes back: the study continues by itself and ends with exactly its budget
            filler.unlink()
            filler = None
            final = _wait("the study to complete",
                          lambda: (s := study())["status"] not in ("queued", "running") and s, 90, study)
            assert final["status"] == "completed", final
            assert final["trials_done"] == BUDGET and final["trials_failed"] == 0, final
            assert final["status_reason"] is None
            assert http.get("/health").status_code == 200
            assert http.delete(f"/studies/{other}").status_code == 204
            trials = http.get(f"/studies/{sid}/trials", params={"limit": 500}).json()["items"]
        finally:
            http.close()
            server.stop()
            if filler is not None:
                filler.unlink()

        assert [t["number"] for t in trials] == list(range(BUDGET))
        assert all(t["state"] == "complete" for t in trials), [(t["number"], t["state"]) for t in trials]
        engine = make_engine(url)
        try:
            with session_factory(engine)() as s:
                kinds = [e.kind for e in s.scalars(select(Event).where(Event.study_id == sid))]
                stalled_events = [e.data for e in s.scalars(select(Event).where(
                    Event.study_id == sid, Event.kind == "study_stalled"))]
                rows = list(s.scalars(select(Trial).where(Trial.study_id == sid)))
                optuna_name = f"evomerge-{sid}"
            assert stalled_events and "full" in stalled_events[0]["reason"], stalled_events
            assert stalled_events[0]["seconds"] > 0
            assert kinds.count("trial_complete") == BUDGET and kinds.count("study_completed") == 1
            # Optuna's record agrees with ours: every complete row is a COMPLETE Optuna trial with
            # the same values, nothing is left RUNNING, any other trial was asked and never recorded
            ostudy = optuna.load_study(study_name=optuna_name, storage=optuna_storage(url))
            otrials = {t.number: t for t in ostudy.get_trials(deepcopy=False)}
            running = [n for n, t in otrials.items() if t.state == optuna.trial.TrialState.RUNNING]
            assert not running, running
            for row in rows:
                assert row.state == TrialState.COMPLETE
                ot = otrials[int(row.point_id)]
                assert ot.state == optuna.trial.TrialState.COMPLETE, (row.number, ot.state)
                assert ot.values == pytest.approx(row.values)
            recorded = {int(r.point_id) for r in rows}
            others = {t.state for n, t in otrials.items() if n not in recorded}
            assert others <= {optuna.trial.TrialState.FAIL}, others
        finally:
            engine.dispose()


def test_too_little_free_space_is_refused_before_any_work(tmp_path, model_root, family):
    """EVOMERGE_MIN_FREE_BYTES: below it, /health is degraded and nothing new is accepted (507)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import get_settings

    settings = get_settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'e.db'}",
                            model_roots=[str(model_root)], min_free_bytes=2**60)
    with TestClient(create_app(settings, start_controller=False)) as client:
        r = client.get("/health")
        assert r.status_code == 503 and "EVOMERGE_MIN_FREE_BYTES" in r.json()["detail"], r.text
        assert r.json()["status"] == "degraded" and r.json()["version"]
        r = client.post("/studies", json=_spec(family("llama")))
        assert r.status_code == 507 and "EVOMERGE_MIN_FREE_BYTES" in r.json()["detail"], r.text


# ---- item 13: a data directory that cannot be written -----------------------------------------------
def _evomerge(*args: str, data_dir: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "evomerge"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EVOMERGE_", "RAY_ADDRESS"))}
    env.update(EVOMERGE_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1")
    return subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


COMMANDS = [("serve", "--port", "1"), ("controller",), ("demo", "--trials", "2")]


def _assert_one_clear_line(done: subprocess.CompletedProcess[str], path: Path, why: str) -> None:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    assert done.returncode != 0, lines
    assert len(lines) == 1, "\n".join(lines)
    assert str(path) in lines[0] and "EVOMERGE_DATA_DIR" in lines[0] and why in lines[0], lines[0]
    assert "Traceback" not in lines[0]


def test_a_data_dir_in_place_of_a_file_is_one_clear_line(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the data directory should be")
    for command in COMMANDS:
        for data_dir in (blocker, blocker / "data"):
            _assert_one_clear_line(_evomerge(*command, data_dir=data_dir), data_dir, "Not a directory")


def test_a_read_only_data_dir_is_one_clear_line(tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        for command in COMMANDS:
            for data_dir in (ro, ro / "data"):
                done = _evomerge(*command, data_dir=data_dir)
                _assert_one_clear_line(done, data_dir, "Read-only file system")


# ---- the controller's side, without Ray: a batch is held whole; the stall is visible ----------------
def _disk_full() -> Exception:
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))


def test_a_write_fault_holds_the_whole_batch_and_stalls_the_controller_visibly(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from service.controller import Controller
    from service.db import Study, StudyStatus, upgrade
    from service.settings import get_settings

    url = f"sqlite:///{tmp_path / 'e.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        s.add(Study(id="s1", name="s1", spec={}, status=StudyStatus.RUNNING))
    controller = Controller(get_settings(data_dir=tmp_path, database_url=url), sessions)
    try:
        rt = SimpleNamespace(study_id="s1", in_flight={11: 0, 12: 1, 13: 2}, heldout=None)
        controller.runtimes["s1"] = rt  # type: ignore[assignment]
        controller._owner.update({11: "s1", 12: "s1", 13: "s1"})
        batch = [SimpleNamespace(trial_id=i) for i in (11, 12, 13)]
        controller.pools["k"] = SimpleNamespace(busy=lambda: True, wait=lambda timeout: list(batch))
        recorded: list[int] = []
        full = [True]

        def record(self: Controller, result: Any) -> None:  # pops first, then writes: like _record
            study_id = self._owner.pop(result.trial_id)
            self.runtimes[study_id].in_flight.pop(result.trial_id)
            if full[0]:
                raise _disk_full()
            recorded.append(result.trial_id)

        monkeypatch.setattr(Controller, "_record", record)
        monkeypatch.setattr(Controller, "step", lambda self: (self._collect(), self._raise_held_fault()))
        assert controller.iterate() is False  # the write failed: stalled, nothing lost
        assert controller.fault is not None and "full" in controller.fault.reason
        assert [r.trial_id for r in controller._held] == [11, 12, 13]
        assert rt.in_flight == {11: 0, 12: 1, 13: 2} and set(controller._owner) == {11, 12, 13}
        assert "stalled since" in (controller.status_reason("s1") or "")

        full[0] = False  # space is back: the stall ends with a study_stalled event
        assert controller._clear_fault() and controller.fault is None
        with sessions() as s:
            stalled = list(s.scalars(select(Event).where(Event.kind == "study_stalled")))
        assert [e.study_id for e in stalled] == ["s1"] and "full" in stalled[0].data["reason"]
        assert "s1" in controller._needs_repair and "recovering" in (controller.status_reason("s1") or "")
        controller._replay_held()  # recorded in order, before anything else
        assert recorded == [11, 12, 13] and not controller._held and not rt.in_flight
        controller._repair()  # nothing in flight: dropped, to be re-opened (and reconciled)
        assert "s1" not in controller.runtimes and not controller._needs_repair
        assert controller.status_reason("s1") is None
    finally:
        controller.pools.clear()
        controller.runtimes.clear()
        controller.stop()
        engine.dispose()
