"""The REST API, on SQLite and PostgreSQL: every endpoint, every refusal, auth on and off."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.db import StudyStatus, TrialState, create_token, make_engine, revoke_token, session_factory
from tests import api_fixtures as fx

api, db_url, llama = fx.api, fx.db_url, fx.llama  # fixtures
make_settings, spec_data = fx.make_settings, fx.spec_data


def submit(api, llama, **changes) -> dict:
    r = api.post("/studies", json=spec_data(llama, **changes))
    assert r.status_code == 201, r.text
    return r.json()


# ---- health and submit -----------------------------------------------------------------------
def test_health(api):
    r = api.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["auth"] is False


def test_submit_json_stores_a_queued_study_with_an_event(api, llama):
    study = submit(api, llama)
    assert study["status"] == "queued" and study["owner"] == "local"
    assert study["max_trials"] == 5 and study["trials_done"] == 0
    assert study["spec"]["name"] == spec_data(llama)["name"]
    with api.ctl.sessions() as s:
        from service.db import Event, Study

        row = s.get(Study, study["id"])
        assert row.optuna_study_name == f"evomerge-{study['id']}"
        # the validated study, for the controller
        assert "space_spec" in row.spec and "worker_spec" in row.spec
        assert [e.kind for e in s.query(Event).filter_by(study_id=study["id"])] == ["study_submitted"]


@pytest.mark.parametrize("content_type", ["application/yaml", "text/yaml"])
def test_submit_yaml(api, llama, content_type):
    body = yaml.safe_dump(spec_data(llama, name="from yaml"))
    r = api.post("/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "from yaml"


def problems(r) -> dict:
    assert r.status_code == 422, r.text
    return {tuple(p["loc"]): p for p in r.json()["detail"]}


def test_submit_refusals_name_the_field_and_the_fix(api, llama, tmp_path):
    r = api.post("/studies", json=spec_data(llama, granularty=2, budget={}))
    found = problems(r)
    assert ("granularty",) in found and found[("granularty",)]["type"] == "extra_forbidden"
    assert ("budget",) in found and all(p["fix"] for p in found.values())

    r = api.post("/studies", json=spec_data(llama, sources=["/etc", str(llama[1][1])]))
    assert problems(r)[("sources", 0)]["type"] == "path_outside_roots"

    link = llama[0].parent / "escape"  # a symlink inside the root that leads out of it
    outside = tmp_path / "outside"
    outside.mkdir()
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    try:
        r = api.post("/studies", json=spec_data(llama, sources=[str(link), str(llama[1][1])]))
        assert problems(r)[("sources", 0)]["type"] == "path_outside_roots"
    finally:
        link.unlink()

    r = api.post("/studies", json=spec_data(llama, trust_remote_code=True))
    assert problems(r)[("trust_remote_code",)]["type"] == "trust_remote_code_refused"


def test_submit_syntax_and_shape_refusals(api):
    r = api.post("/studies", content=b"name: [unclosed", headers={"Content-Type": "application/yaml"})
    assert problems(r)[()]["type"] == "spec_syntax"
    r = api.post("/studies", content=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert problems(r)[()]["type"] == "spec_not_a_mapping"
    r = api.post("/studies", content=b"", headers={"Content-Type": "application/json"})
    assert problems(r)[()]["type"] == "spec_empty"


def test_submit_unsupported_media_type(api, llama):
    r = api.post("/studies", content=json.dumps(spec_data(llama)), headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/yaml" in r.json()["detail"]


def test_body_size_limit(db_url, tmp_path, model_root, llama):
    app = create_app(make_settings(db_url, tmp_path, model_root, max_body_bytes=200), start_controller=False)
    with TestClient(app) as client:
        r = client.post("/studies", json=spec_data(llama))
        assert r.status_code == 413 and "EVOMERGE_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b"x" * 100

        r = client.post("/studies", content=chunks(), headers={"Content-Type": "application/yaml"})
        assert r.status_code == 413


def test_trust_remote_code_allowed_when_the_administrator_enables_it(db_url, tmp_path, model_root, llama):
    app = create_app(make_settings(db_url, tmp_path, model_root, trust_remote_code=True),
                     start_controller=False)
    with TestClient(app) as client:
        r = client.post("/studies", json=spec_data(llama, trust_remote_code=True))
        assert r.status_code == 201, r.text


# ---- reading -------------------------------------------------------------------------------------
def test_list_filter_and_paginate(api, llama):
    ids = [submit(api, llama, name=f"study {i}")["id"] for i in range(3)]
    api.ctl.set_status(ids[0], StudyStatus.RUNNING)
    page = api.get("/studies").json()
    assert page["total"] == 3 and len(page["items"]) == 3
    assert [s["id"] for s in page["items"]] == ids[::-1]  # newest first
    page = api.get("/studies", params={"limit": 2, "offset": 2}).json()
    assert page == {**page, "total": 3, "limit": 2, "offset": 2}
    assert [s["id"] for s in page["items"]] == [ids[0]]
    assert [s["id"] for s in api.get("/studies", params={"status": "running"}).json()["items"]] == [ids[0]]
    assert api.get("/studies", params={"name": "study 1"}).json()["total"] == 1
    assert api.get("/studies", params={"name": "100%"}).json()["total"] == 0
    assert api.get("/studies", params={"owner": "local"}).json()["total"] == 3
    assert api.get("/studies", params={"owner": "bob"}).json()["total"] == 0
    assert api.get("/studies", params={"status": "bogus"}).status_code == 422
    assert api.get("/studies", params={"limit": 0}).status_code == 422


def test_get_study_and_404(api, llama):
    study = submit(api, llama)
    assert api.get(f"/studies/{study['id']}").json()["id"] == study["id"]
    r = api.get("/studies/nope")
    assert r.status_code == 404 and "GET /studies" in r.json()["detail"]


def test_trials_sort_paginate_and_best(api, llama):
    sid = submit(api, llama)["id"]
    assert api.get(f"/studies/{sid}/best").status_code == 404  # no complete trial yet
    for n, fit in enumerate([0.2, 0.9, None, 0.5]):
        api.ctl.add_trial(sid, n, fit, TrialState.COMPLETE if fit is not None else TrialState.FAILED)
    page = api.get(f"/studies/{sid}/trials").json()
    assert page["total"] == 4 and [t["number"] for t in page["items"]] == [0, 1, 2, 3]
    by_fitness = api.get(f"/studies/{sid}/trials", params={"sort": "-fitness"}).json()["items"]
    assert [t["number"] for t in by_fitness] == [1, 3, 0, 2]  # nulls last
    asc = api.get(f"/studies/{sid}/trials", params={"sort": "fitness", "limit": 1, "offset": 1}).json()
    assert [t["number"] for t in asc["items"]] == [3]
    desc = api.get(f"/studies/{sid}/trials", params={"sort": "-number"}).json()["items"]
    assert [t["number"] for t in desc] == [3, 2, 1, 0]
    failed = api.get(f"/studies/{sid}/trials", params={"state": "failed"}).json()
    assert failed["total"] == 1 and failed["items"][0]["number"] == 2
    assert api.get(f"/studies/{sid}/trials", params={"sort": "bogus"}).status_code == 422
    trial = api.get(f"/studies/{sid}/trials/1").json()
    assert trial["fitness"] == 0.9 and trial["state"] == "complete" and trial["scores"] == {"t/m": 0.9}
    assert api.get(f"/studies/{sid}/trials/99").status_code == 404
    assert api.get("/studies/nope/trials").status_code == 404
    assert api.get("/studies/nope/trials/0").status_code == 404
    assert api.get(f"/studies/{sid}/best").json()["number"] == 1
    assert api.get("/studies/nope/best").status_code == 404
    assert api.get(f"/studies/{sid}").json()["best_value"] == 0.9


def test_pareto_front_of_a_multi_objective_study(api, llama):
    mo = submit(api, llama, multi_objective=True, optimizer={"name": "nsga2", "population_size": 4},
                evaluation={"evaluator": "noop", "objectives": [{"task": "a", "metric": "m"},
                                                                {"task": "b", "metric": "m"}]})
    sid = mo["id"]
    assert mo["multi_objective"] is True
    assert api.get(f"/studies/{sid}/front").json() == []
    points = {0: [0.1, 0.9], 1: [0.5, 0.5], 2: [0.4, 0.4], 3: [0.9, 0.1], 4: [0.5, 0.5]}
    for n, values in points.items():
        api.ctl.add_trial(sid, n, None, values=values)
    api.ctl.add_trial(sid, 5, None, TrialState.FAILED, values=[9.0, 9.0])  # failed: never on the front
    front = api.get(f"/studies/{sid}/front").json()
    assert [t["number"] for t in front] == [0, 1, 3, 4]  # 2 is dominated by 1; equal 1 and 4 both stay
    best = api.get(f"/studies/{sid}/best")
    assert best.status_code == 409 and f"/studies/{sid}/front" in best.json()["detail"]
    single = submit(api, llama)["id"]
    assert api.get(f"/studies/{single}").json()["multi_objective"] is False
    for n, fit in enumerate([0.3, 0.7, 0.7]):
        api.ctl.add_trial(single, n, fit)
    assert [t["number"] for t in api.get(f"/studies/{single}/front").json()] == [1, 2]
    assert api.get("/studies/nope/front").status_code == 404


def test_pareto_front_function():
    from service.pareto import dominates, pareto_front

    assert dominates([1, 1], [1, 0]) and not dominates([1, 0], [1, 0]) and not dominates([1, 0], [0, 1])
    assert pareto_front([]) == []
    assert pareto_front([(7, [1.0, 2.0, 3.0])]) == [7]
    assert pareto_front([(0, [1, 2, 3]), (1, [1, 2, 4]), (2, [0, 5, 0])]) == [1, 2]


# ---- changing ------------------------------------------------------------------------------------
def test_pause_resume_cancel_transitions(api, llama):
    sid = submit(api, llama)["id"]
    assert api.post(f"/studies/{sid}/resume").status_code == 409  # queued: nothing to resume
    assert api.post(f"/studies/{sid}/pause").json()["status"] == "paused"
    r = api.post(f"/studies/{sid}/pause")
    assert r.status_code == 409 and "paused" in r.json()["detail"]
    assert api.post(f"/studies/{sid}/resume").json()["status"] == "running"
    assert api.post(f"/studies/{sid}/pause").json()["status"] == "paused"
    assert api.post(f"/studies/{sid}/cancel").json()["status"] == "cancelled"
    for action in ("pause", "resume", "cancel"):
        assert api.post(f"/studies/{sid}/{action}").status_code == 409
        assert api.post(f"/studies/nope/{action}").status_code == 404
    events = [line.split(":", 1)[1].strip() for line in _sse_lines(api, sid) if line.startswith("event:")]
    assert [k for k in events if k.startswith("study_")] == [
        "study_submitted", "study_paused", "study_resumed", "study_paused", "study_cancel_requested"]


def test_resume_a_completed_study_is_refused(api, llama):
    sid = submit(api, llama)["id"]
    api.ctl.set_status(sid, StudyStatus.COMPLETED)
    r = api.post(f"/studies/{sid}/resume")
    assert r.status_code == 409 and "completed" in r.json()["detail"]


def test_delete(api, llama):
    sid = submit(api, llama)["id"]
    api.ctl.add_trial(sid, 0, 0.5)
    api.ctl.set_status(sid, StudyStatus.RUNNING)
    r = api.delete(f"/studies/{sid}")
    assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
    api.post(f"/studies/{sid}/cancel")
    assert api.delete(f"/studies/{sid}").status_code == 204
    assert api.get(f"/studies/{sid}").status_code == 404
    assert api.delete(f"/studies/{sid}").status_code == 404
    from sqlalchemy import func, select

    from service.db import Event, Trial

    with api.ctl.sessions() as s:  # trials and events went with it
        assert s.scalar(select(func.count()).select_from(Trial).where(Trial.study_id == sid)) == 0
        assert s.scalar(select(func.count()).select_from(Event).where(Event.study_id == sid)) == 0


# ---- the event stream ----------------------------------------------------------------------------
def _sse_lines(client, sid, **params) -> list[str]:
    with client.stream("GET", f"/studies/{sid}/events", params=params) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def test_events_stream_live_until_the_study_ends(api, llama):
    sid = submit(api, llama)["id"]

    def controller():
        time.sleep(0.3)
        api.ctl.set_status(sid, StudyStatus.RUNNING)
        api.ctl.add_trial(sid, 0, 0.4)
        time.sleep(0.2)
        api.ctl.set_status(sid, StudyStatus.COMPLETED)

    thread = threading.Thread(target=controller)
    thread.start()
    lines = _sse_lines(api, sid)
    thread.join()
    kinds = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    assert [k for k in kinds if k not in ("progress",)] == [
        "study_submitted", "study_running", "trial_complete", "study_completed", "end"]
    ids = [int(line.split(":", 1)[1]) for line in lines if line.startswith("id:")]
    assert ids == sorted(ids) and len(ids) == 4
    progress = [json.loads(line[5:]) for line in lines
                if line.startswith("data:") and '"trials_done"' in line]
    assert progress[-1]["status"] == "completed" and progress[-1]["trials_done"] == 1
    assert progress[-1]["best_value"] == 0.4 and progress[-1]["max_trials"] == 5

    # resuming: only the events after the given id
    later = _sse_lines(api, sid, after=ids[1])
    assert [int(line[3:]) for line in later if line.startswith("id:")] == ids[2:]
    with api.stream("GET", f"/studies/{sid}/events", headers={"Last-Event-ID": str(ids[2])}) as r:
        assert [int(line[3:]) for line in r.iter_lines() if line.startswith("id:")] == ids[3:]


def test_events_404_and_deleted_study_ends_the_stream(api, llama):
    assert api.get("/studies/nope/events").status_code == 404
    sid = submit(api, llama)["id"]
    assert api.post(f"/studies/{sid}/cancel").status_code == 200  # only a final study can be deleted
    deleted = threading.Event()

    def busy_then_delete():  # new events keep the (final) study's stream open until the delete
        from service.db import Event

        for _ in range(10):
            with api.ctl.sessions.begin() as s:
                s.add(Event(study_id=sid, kind="note", data={}))
            time.sleep(0.03)
        assert api.delete(f"/studies/{sid}").status_code == 204
        deleted.set()

    threading.Thread(target=busy_then_delete).start()
    lines = _sse_lines(api, sid)
    assert deleted.wait(10)
    assert "event: end" in lines and '"deleted"' in lines[-1]


# ---- auth --------------------------------------------------------------------------------------
@pytest.fixture
def authed(db_url, tmp_path, model_root, llama):
    app = create_app(make_settings(db_url, tmp_path, model_root, auth=True), start_controller=False,
                     poll_seconds=0.05)
    with TestClient(app) as client:
        engine = make_engine(db_url)
        with session_factory(engine).begin() as s:
            tokens = {name: create_token(s, name) for name in ("alice", "bob")}
        client.tokens = tokens  # type: ignore[attr-defined]
        client.engine = engine  # type: ignore[attr-defined]
        yield client
        engine.dispose()


def test_auth_required_everywhere_but_health(authed, llama):
    assert authed.get("/health").status_code == 200
    calls = [("POST", "/studies"), ("GET", "/studies"), ("GET", "/studies/x"), ("GET", "/studies/x/trials"),
             ("GET", "/studies/x/trials/0"), ("GET", "/studies/x/best"), ("GET", "/studies/x/front"),
             ("POST", "/studies/x/pause"),
             ("POST", "/studies/x/resume"), ("POST", "/studies/x/cancel"), ("DELETE", "/studies/x"),
             ("GET", "/studies/x/events")]
    for method, path in calls:
        for headers in ({}, {"Authorization": "Bearer em_wrong"}, {"Authorization": "Basic YTpi"}):
            r = authed.request(method, path, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
            assert "evomerge token create" in r.json()["detail"]


def test_tokens_identify_owners_and_revoked_tokens_are_refused(authed, llama):
    alice = {"Authorization": f"Bearer {authed.tokens['alice']}"}
    bob = {"Authorization": f"Bearer {authed.tokens['bob']}"}
    r = authed.post("/studies", json=spec_data(llama), headers=alice)
    assert r.status_code == 201 and r.json()["owner"] == "alice"
    sid = r.json()["id"]
    # every token sees (and may change) every study; the owner is recorded
    assert authed.get(f"/studies/{sid}", headers=bob).status_code == 200
    assert authed.get("/studies", params={"owner": "alice"}, headers=bob).json()["total"] == 1
    assert authed.post(f"/studies/{sid}/pause", headers=bob).status_code == 200
    with session_factory(authed.engine).begin() as s:
        revoke_token(s, "bob")
    r = authed.get("/studies", headers=bob)
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    assert authed.get("/studies", headers=alice).status_code == 200


def test_auth_off_on_a_public_host_is_refused():
    from service.settings import SettingsError, get_settings

    with pytest.raises(SettingsError, match="EVOMERGE_AUTH=true"):
        get_settings(host="0.0.0.0", auth=False).check()
    get_settings(host="0.0.0.0", auth=True).check()


def test_start_up_without_a_controller_fails_loudly(db_url, tmp_path, model_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "service.controller", None)  # import fails
    app = create_app(make_settings(db_url, tmp_path, model_root))
    with pytest.raises(RuntimeError, match="controller cannot be imported"), TestClient(app):
        pass


def test_the_api_process_imports_no_heavy_modules():
    import subprocess

    code = ("import sys, service.app, service.api.client, service.cli;"
            "print(','.join(m for m in ('torch', 'ray', 'lm_eval', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_503_before_start_up(tmp_path, model_root):
    app = create_app(make_settings(f"sqlite:///{tmp_path / 'x.db'}", tmp_path, model_root),
                     start_controller=False)
    client = TestClient(app)  # not entered: the start-up hook has not run
    r = client.get("/health")
    assert r.status_code == 503 and "starting up" in r.json()["detail"]


def test_events_written_just_after_the_final_status_still_arrive(api, llama):
    sid = submit(api, llama)["id"]

    def cancel_then_controller():
        time.sleep(0.3)
        api.post(f"/studies/{sid}/cancel")
        time.sleep(0.05)  # the controller notices the cancel on its next iteration
        api.ctl.set_status(sid, StudyStatus.CANCELLED)  # writes its `study_cancelled`

    thread = threading.Thread(target=cancel_then_controller)
    thread.start()
    lines = _sse_lines(api, sid)
    thread.join()
    kinds = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    assert [k for k in kinds if k != "progress"] == [
        "study_submitted", "study_cancel_requested", "study_cancelled", "end"]


def test_nul_in_query_or_path_is_a_422_not_a_500(tmp_path, model_root):
    """PostgreSQL refuses NUL in text: such input is refused before it reaches SQL
    (found by the schemathesis run)."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import get_settings

    settings = get_settings(database_url=f"sqlite:///{tmp_path / 'n.db'}", data_dir=tmp_path / "d",
                            model_roots=[str(model_root)])
    with TestClient(create_app(settings, start_controller=False)) as client:
        assert client.get("/studies", params={"owner": "\x00x"}).status_code == 422
        assert client.get("/studies", params={"name": "a\x00"}).status_code == 422
        assert client.get("/studies/ab%00cd").status_code == 422
