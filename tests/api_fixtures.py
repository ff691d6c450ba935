"""Shared by the API tests: settings over a throw-away database, a valid spec, a simulated controller."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from sqlalchemy import update

from service.db import Event, Study, StudyStatus, Trial, TrialState, make_engine, session_factory
from service.spec import DEMO_EXAMPLE


def spec_data(llama: tuple[Path, list[Path]], **changes: Any) -> dict[str, Any]:
    """The demo study over the tiny Llama family, scored by the noop evaluator (no lm-eval)."""
    base, (e0, e1) = llama
    data = copy.deepcopy(DEMO_EXAMPLE)
    data.pop("heldout", None)
    data.update(sources=[str(e0), str(e1)], base_model=str(base),
                evaluation={"evaluator": "noop", "objectives": [{"task": "t", "metric": "m"}]},
                budget={"max_trials": 5})
    data.update(changes)
    return data


class FakeController:
    """Writes what the controller would (statuses, trials, events) straight into the database."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.sessions = session_factory(self.engine)

    def set_status(self, study_id: str, status: StudyStatus, **values: Any) -> None:
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.id == study_id).values(status=status, **values))
            s.add(Event(study_id=study_id, kind=f"study_{status.value}", data={"status": status.value}))

    def add_trial(self, study_id: str, number: int, fitness: float | None,
                  state: TrialState = TrialState.COMPLETE, values: list[float] | None = None) -> None:
        with self.sessions.begin() as s:
            s.add(Trial(study_id=study_id, number=number, fitness=fitness, state=state,
                        params={"x": number}, scores={"t/m": fitness}, values=values or [fitness]))
            study = s.get(Study, study_id)
            assert study is not None
            if state == TrialState.COMPLETE:
                study.trials_done += 1
                if fitness is not None and (study.best_value is None or fitness > study.best_value):
                    study.best_value, study.best_trial_number = fitness, number
            s.add(Event(study_id=study_id, kind="trial_complete",
                        data={"number": number, "fitness": fitness}))

    def close(self) -> None:
        self.engine.dispose()


def write_export(root: Path, key: str, files: dict[str, bytes]) -> tuple[Path, dict]:
    """A complete export folder as a worker leaves it: files, then the manifest."""
    from search_spaces.archive_format import plan_archive
    from service.exports import MANIFEST

    folder = root / key
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    plan = plan_archive(folder, key, exclude={MANIFEST})
    manifest = {"key": key, "archive_prefix": key, "archive_sha256": plan.sha256(),
                "archive_size": plan.size,
                "files": [{"name": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                          for n, d in sorted(files.items())]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder, manifest



def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """``create_app(settings)`` served by uvicorn in a thread on a free loopback port:
    ``with LiveServer(app) as url: ...`` (or ``start()`` / ``stop()``)."""

    def __init__(self, app: Any) -> None:
        import threading

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 60.0) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- fixtures (import them into a test module to use them) ------------------------------------
import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from service.db.testing import temporary_database  # noqa: E402


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    with temporary_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def llama(family):
    return family("llama")


def make_settings(db_url: str, tmp_path: Path, model_root: Path, **overrides: Any):
    from service.settings import get_settings

    return get_settings(database_url=db_url, data_dir=tmp_path / "data",
                        model_roots=[str(model_root)], **overrides)


@pytest.fixture
def api(db_url, tmp_path, model_root, llama):
    """A TestClient over the app (auth off, no controller) and a fake controller on its database."""
    from service.app import create_app

    app = create_app(make_settings(db_url, tmp_path, model_root), start_controller=False, poll_seconds=0.05)
    ctl = FakeController(db_url)
    with TestClient(app) as client:
        client.ctl = ctl  # type: ignore[attr-defined]
        yield client
    ctl.close()
