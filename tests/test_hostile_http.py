"""Hostile HTTP against a live server (uvicorn on 127.0.0.1 in a thread, no controller): deep
JSON, oversized bodies, numbers with thousands of digits in headers, racing state changes.
Every answer must be a 4xx that says what is wrong — never a 500 (issue 13, items 3, 7, 8, 9)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from service.app import create_app
from service.db import Artifact, ArtifactState, StudyStatus, Trial, TrialState, session_factory
from service.db.testing import temporary_database
from service.db.types import utcnow
from tests.api_fixtures import FakeController, LiveServer, make_settings, spec_data, write_export

HUGE = "9" * 5000  # more digits than Python's int() converts (4300)


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request, tmp_path_factory, model_root):
    """A live server (no controller) and a fake controller on its database."""
    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    with temporary_database(request.param, tmp) as url:
        yield from _serve(url, tmp, model_root)


def _serve(url: str, tmp: Path, model_root: Path):
    app = create_app(make_settings(url, tmp, model_root), start_controller=False, poll_seconds=0.05)

    @app.get("/test-only/recursion", include_in_schema=False)
    def recursion() -> None:  # what a parser that recurses too deep raises
        raise RecursionError("maximum recursion depth exceeded")

    server = LiveServer(app)
    server.start()
    ctl = FakeController(url)
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http, ctl, tmp
    ctl.close()
    server.stop()


def _study(live, llama, status: StudyStatus | None = None) -> str:
    http, ctl, _ = live
    r = http.post("/studies", json=spec_data(llama))
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    if status is not None:
        ctl.set_status(sid, status)
    return sid


def _nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# ---- item 7: deep nesting in a JSON body ------------------------------------------------------------
@pytest.mark.parametrize("depth", [100, 990, 1000, 5000])
def test_deep_json_bodies_are_refused_with_the_nesting_limit(live, llama, depth):
    http, _, _ = live
    sid = _study(live, llama, StudyStatus.COMPLETED)
    bodies = {
        "/studies": [_nested(depth), b'{"name": ' + _nested(depth) + b"}"],
        f"/studies/{sid}/exports": [_nested(depth), b'{"trial": ' + _nested(depth) + b"}",
                                    b'{"trial": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"],
    }
    for path, payloads in bodies.items():
        for body in payloads:
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, depth, r.status_code, r.text[:300])
            detail = r.json()["detail"]
            assert "nests" in detail and "64 levels" in detail, detail
            assert len(r.content) < 1000  # the body is never echoed back


def test_brackets_inside_strings_do_not_count_and_a_recursion_error_is_a_400(live):
    http, _, _ = live
    r = http.post("/studies", json={"name": "[" * 5000})  # deep-looking but flat: not a nesting refusal
    assert r.status_code < 500 and "nests" not in r.text, r.text
    r = http.get("/test-only/recursion")
    assert r.status_code == 400 and "levels of nesting" in r.json()["detail"]


# ---- item 3: every body has a cap ---------------------------------------------------------------------
def test_an_export_request_body_is_capped(live, llama):
    http, _, _ = live
    sid = _study(live, llama, StudyStatus.COMPLETED)
    big = b"[" + b"1," * 5_000_000 + b"1]"  # 10 MB
    started = time.monotonic()
    r = http.post(f"/studies/{sid}/exports", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    assert "at most 65536 bytes" in r.json()["detail"]
    assert time.monotonic() - started < 5

    def chunks():  # no Content-Length: the cap holds while reading
        for _ in range(100):
            yield b" " * 100_000

    r = http.post(f"/studies/{sid}/exports", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text[:300]
    r = http.post("/studies", content=b" " * 2_000_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "EVOMERGE_MAX_BODY_BYTES" in r.json()["detail"]
    # a small body still works
    r = http.post(f"/studies/{sid}/exports", json={"trial": 0})
    assert r.status_code == 404 and "no trial 0" in r.json()["detail"]


def test_odd_json_values_are_a_422_that_echoes_nothing(live, llama):
    """What FastAPI's own 422 would echo back and JSON cannot carry (an infinite float, a lone
    surrogate) made it a 500; the 422 now says where and what, never the input."""
    http, _, _ = live
    sid = _study(live, llama, StudyStatus.COMPLETED)
    for body in (b'{"trial": 1e999999}', b'{"\\ud83e": 1}', b'{"trial": "\\ud83e"}',
                 b'{"trial": ' + b"9" * 5000 + b"}", b'{"trial": [' + b"1," * 10_000 + b"1]}"):
        r = http.post(f"/studies/{sid}/exports", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 422), (body[:40], r.status_code, r.text[:300])
        detail = r.json()["detail"]  # 400: FastAPI could not parse it (5000 digits)
        assert r.status_code == 400 or all(set(e) == {"loc", "msg", "type"} for e in detail), detail
        assert len(r.content) < 2000


# ---- item 8: numbers with thousands of digits in headers ----------------------------------------------
@pytest.fixture(scope="module")
def ready_export(live, llama):
    """A completed study with a ready export of one file (study id, export id, file name, size)."""
    _, ctl, tmp = live
    sid = _study(live, llama, StudyStatus.COMPLETED)
    ctl.add_trial(sid, 0, 0.5)
    data = b"0123456789" * 10
    folder, manifest = write_export(tmp / "exports", "f" * 64, {"model.safetensors": data})
    with session_factory(ctl.engine).begin() as s:
        row = Artifact(study_id=sid, trial_number=0, kind="export", path=str(folder),
                       state=ArtifactState.READY, sha256=manifest["archive_sha256"],
                       size_bytes=manifest["archive_size"], export_key=manifest["key"])
        s.add(row)
        s.flush()
        export_id = row.id
    return sid, export_id, "model.safetensors", len(data), manifest["archive_size"]


def test_ranges_with_thousands_of_digits(live, ready_export):
    http, _, _ = live
    sid, export_id, name, file_size, archive_size = ready_export
    for path, size in ((f"/studies/{sid}/exports/{export_id}/archive", archive_size),
                       (f"/studies/{sid}/exports/{export_id}/files/{name}", file_size)):
        r = http.get(path, headers={"Range": f"bytes={HUGE}-"})  # starts past any end
        assert r.status_code == 416, (path, r.status_code, r.text[:200])
        assert r.headers["Content-Range"] == f"bytes */{size}"
        r = http.get(path, headers={"Range": f"bytes=0-{HUGE}"})  # runs to the end
        assert r.status_code == 206 and len(r.content) == size
        r = http.get(path, headers={"Range": f"bytes=-{HUGE}"})  # a suffix longer than the file
        assert r.status_code == 206 and len(r.content) == size
        r = http.get(path, headers={"Range": f"bytes=1-{HUGE}"})
        assert r.status_code == 206 and len(r.content) == size - 1
        r = http.head(path, headers={"Range": f"bytes={HUGE}-{HUGE}"})
        assert r.status_code == 416


def test_last_event_id_with_thousands_of_digits_is_ignored(live, llama):
    http, _, _ = live
    sid = _study(live, llama, StudyStatus.COMPLETED)  # final: the stream ends by itself
    for value in (HUGE, "1" * 19, "12x", "-5"):
        with http.stream("GET", f"/studies/{sid}/events", headers={"Last-Event-ID": value}) as r:
            assert r.status_code == 200, value
            lines = [line for line in r.iter_lines() if line]
        ids = [line for line in lines if line.startswith("id:")]
        assert ids and "event: study_submitted" in lines, (value, lines)  # from the start
    # non-ASCII digits (what str.isdigit accepts and int() may not)
    with http.stream("GET", f"/studies/{sid}/events", headers=[(b"Last-Event-ID", "\u00b2".encode())]) as r:
        assert r.status_code == 200
    r = http.get(f"/studies/{sid}/events", params={"after": HUGE})
    assert r.status_code == 422


# ---- item 9: racing state changes; delete waits for in-flight work -----------------------------------
def test_racing_cancel_delete_pause_resume_never_500(live, llama):
    http, _, _ = live
    sids = [_study(live, llama, StudyStatus.RUNNING) for _ in range(12)]
    codes: dict[str, set[int]] = {}
    lock = threading.Lock()

    def hit(sid: str, action: str, barrier: threading.Barrier) -> None:
        with httpx.Client(base_url=str(http.base_url), timeout=60) as own:
            barrier.wait()
            for _ in range(3):
                path = f"/studies/{sid}"
                r = own.delete(path) if action == "delete" else own.post(f"{path}/{action}")
                with lock:
                    codes.setdefault(action, set()).add(r.status_code)
                assert r.status_code < 500, (action, r.status_code, r.text)
                assert r.status_code in (200, 204, 404, 409), (action, r.status_code, r.text)
                assert isinstance(r.json()["detail"] if r.status_code >= 400 else 0, (str, int))

    actions = ["cancel", "delete", "pause", "resume", "pause", "delete"]
    with ThreadPoolExecutor(len(actions)) as pool:
        for sid in sids:
            barrier = threading.Barrier(len(actions))
            futures = [pool.submit(hit, sid, a, barrier) for a in actions]
            for f in futures:
                f.result()
    assert 204 in codes["delete"] and 200 in codes["cancel"], codes


def test_delete_only_a_final_study_and_only_once_its_trials_stopped(live, llama, monkeypatch):
    from service.api import studies

    monkeypatch.setattr(studies, "DELETE_WAIT_S", 1.0)
    http, ctl, _ = live
    for status in (None, StudyStatus.RUNNING, StudyStatus.PAUSED):  # None: queued
        sid = _study(live, llama, status)
        r = http.delete(f"/studies/{sid}")
        assert r.status_code == 409 and "cancel it first" in r.json()["detail"], r.text

    # cancelled, but a trial is still on a worker (the controller has not stopped it yet)
    sid = _study(live, llama, StudyStatus.CANCELLED)
    with ctl.sessions.begin() as s:
        s.add(Trial(study_id=sid, number=0, state=TrialState.RUNNING, params={},
                    lease_expires_at=utcnow() + timedelta(seconds=600)))
    started = time.monotonic()
    r = http.delete(f"/studies/{sid}")
    assert r.status_code == 409 and r.headers.get("Retry-After"), r.text
    assert "running on workers" in r.json()["detail"] and time.monotonic() - started >= 0.9
    assert http.get(f"/studies/{sid}").status_code == 200

    # the controller stops the trial while the delete waits: the delete then goes through
    def controller_cancels_the_trial() -> None:
        time.sleep(0.3)
        with ctl.sessions.begin() as s:
            s.execute(update(Trial).where(Trial.study_id == sid).values(state=TrialState.CANCELLED))

    threading.Thread(target=controller_cancels_the_trial).start()
    r = http.delete(f"/studies/{sid}")
    assert r.status_code == 204, r.text
    assert http.get(f"/studies/{sid}").status_code == 404

    # a trial whose lease expired (its controller is gone) does not hold the delete
    sid = _study(live, llama, StudyStatus.FAILED)
    with ctl.sessions.begin() as s:
        s.add(Trial(study_id=sid, number=0, state=TrialState.RUNNING, params={},
                    lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert http.delete(f"/studies/{sid}").status_code == 204


def test_the_schema_documents_the_new_answers(live):
    http, _, _ = live
    schema = http.get("/openapi.json").json()
    delete = schema["paths"]["/studies/{study_id}"]["delete"]["responses"]
    assert "Retry-After" in delete["409"].get("headers", {})
    post = schema["paths"]["/studies"]["post"]["responses"]
    assert {"400", "413", "507"} <= set(post)
