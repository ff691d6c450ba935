"""The CLI as a client of a live server (uvicorn in a thread, on a free loopback port)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.cli import main
from service.db import StudyStatus, create_token
from tests import api_fixtures as fx

db_url, llama = fx.db_url, fx.llama  # fixtures


@pytest.fixture
def server(db_url, tmp_path, model_root, llama, monkeypatch):
    """A live server with auth on; yields (url, token, fake controller)."""
    for var in ("EVOMERGE_URL", "EVOMERGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    app = create_app(fx.make_settings(db_url, tmp_path, model_root, auth=True), start_controller=False,
                     poll_seconds=0.05)
    live = fx.LiveServer(app)
    url = live.start(30)
    ctl = fx.FakeController(db_url)
    with ctl.sessions.begin() as s:
        token = create_token(s, "cli")
    yield url, token, ctl
    live.stop()
    ctl.close()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_submit_list_status_and_actions(server, llama, tmp_path, capsys):
    url, token, ctl = server
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(fx.spec_data(llama, name="cli study")))
    auth = ["--url", url, "--token", token]

    code, out, err = run(capsys, "submit", str(spec), *auth)
    assert code == 0, err
    sid = out.strip()
    assert len(sid) == 12 and "queued" in err

    code, out, _ = run(capsys, "studies", *auth)
    assert code == 0 and sid in out and "cli study" in out and "0/5 trials" in out

    ctl.add_trial(sid, 0, 0.75)
    code, out, _ = run(capsys, "status", sid, *auth)
    assert code == 0 and "status  queued" in out and "trial 0: fitness 0.75" in out

    assert run(capsys, "pause", sid, *auth)[1].strip() == f"study {sid} is paused"
    assert run(capsys, "resume", sid, *auth)[1].strip() == f"study {sid} is running"
    code, _, err = run(capsys, "resume", sid, *auth)
    assert code == 1 and "HTTP 409" in err and "cannot resume" in err
    assert run(capsys, "cancel", sid, *auth)[1].strip() == f"study {sid} is cancelled"
    assert run(capsys, "delete", sid, *auth)[0] == 0
    code, _, err = run(capsys, "status", sid, *auth)
    assert code == 1 and "HTTP 404" in err


def test_a_refused_spec_prints_every_problem_with_its_fix(server, llama, tmp_path, capsys):
    url, token, _ = server
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps(fx.spec_data(llama, sources=["/etc", "no-such-model"])))
    code, _, err = run(capsys, "submit", str(spec), "--url", url, "--token", token)
    assert code == 1
    assert "refused the study spec" in err
    assert "  - sources.0: " in err and "outside the allowed roots" in err and "(fix: " in err
    assert "  - sources.1: " in err and "not found" in err
    code, _, err = run(capsys, "submit", str(tmp_path / "missing.yaml"), "--url", url, "--token", token)
    assert code == 2 and "cannot read the spec" in err


def test_submit_watch_follows_the_study_to_its_end(server, llama, tmp_path, capsys, monkeypatch):
    url, token, ctl = server
    monkeypatch.setenv("EVOMERGE_URL", url)  # the environment works as well as --url / --token
    monkeypatch.setenv("EVOMERGE_TOKEN", token)
    spec = tmp_path / "study.yaml"
    spec.write_text(yaml.safe_dump(fx.spec_data(llama, budget={"max_trials": 3, "max_seconds": 600})))

    def controller():  # waits for the submitted study, then runs it
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with ctl.sessions() as s:
                from service.db import Study

                study = s.query(Study).first()
            if study is not None:
                break
            time.sleep(0.05)
        ctl.set_status(study.id, StudyStatus.RUNNING)
        for n, fit in enumerate([0.3, 0.8, 0.5]):
            time.sleep(0.1)
            ctl.add_trial(study.id, n, fit)
        ctl.set_status(study.id, StudyStatus.COMPLETED)

    thread = threading.Thread(target=controller)
    thread.start()
    code, out, err = run(capsys, "submit", str(spec), "--watch")
    thread.join()
    assert code == 0, err
    sid, final = out.strip().splitlines()
    assert final == f"study {sid} completed: 3/3 trials, 0/600 s, best fitness 0.8 (trial 1)"
    assert "3/3" in err and "best=0.8" in err  # the progress bar


def test_tokens(server, capsys, monkeypatch):
    url, token, _ = server
    code, _, err = run(capsys, "studies", "--url", url)
    assert code == 1 and "HTTP 401" in err and "evomerge token create" in err
    code, _, err = run(capsys, "studies", "--url", url, "--token", "em_wrong")
    assert code == 1 and "not valid or was revoked" in err
    monkeypatch.setenv("EVOMERGE_TOKEN", token)
    code, out, _ = run(capsys, "studies", "--url", url)
    assert code == 0 and out.strip() == "no studies"


def test_unreachable_server(capsys):
    code, _, err = run(capsys, "studies", "--url", f"http://127.0.0.1:{fx.free_port()}")
    assert code == 1 and "cannot reach the evomerge server" in err and "evomerge serve" in err


def test_serve_refuses_auth_off_on_a_public_host(capsys, monkeypatch):
    monkeypatch.setenv("EVOMERGE_AUTH", "false")
    code, _, err = run(capsys, "serve", "--host", "0.0.0.0")
    assert code == 2 and "EVOMERGE_AUTH=true" in err


def test_a_worker_command_without_torch_says_which_extra_to_install(capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    code, _, err = run(capsys, "zoo", "build", "--out", "/nonexistent/zoo")
    assert code == 2 and "evomerge[worker]" in err and "evomerge zoo" in err
