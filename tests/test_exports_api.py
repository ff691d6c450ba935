"""Export and download over REST: asking, states, the archive (checksum, ranges, resume),
single files, retention, auth (401/403/404/409), and the CLI's resuming download.

The export folder here is written by the test (the API only reads a complete folder and
its manifest); tests/test_export.py covers how a worker writes one, and
tests/test_export_e2e.py the whole path through the controller."""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.db import Artifact, ArtifactState, TrialState, create_token, utcnow
from service.exports import MANIFEST, evict
from tests import api_fixtures as fx

api, db_url, llama = fx.api, fx.db_url, fx.llama  # fixtures
write_export = fx.write_export


def submit(client, llama, headers=None, **changes) -> str:
    r = client.post("/studies", json=fx.spec_data(llama, **changes), headers=headers or {})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def finish_export(ctl, export_id: int, folder: Path, manifest: dict) -> None:
    """What the controller's export runner records when a worker is done."""
    with ctl.sessions.begin() as s:
        row = s.get(Artifact, export_id)
        row.state, row.path, row.export_key = ArtifactState.READY, str(folder), manifest["key"]
        row.sha256, row.size_bytes, row.progress = manifest["archive_sha256"], manifest["archive_size"], 1.0
        row.finished_at = utcnow()


FILES = {"model.safetensors": os.urandom(700_001), "config.json": b'{"model_type": "llama"}',
         "README.md": b"# card\n", "nested/tokenizer.json": b"{}"}


@pytest.fixture
def ready(api, llama, tmp_path):
    """A study with a complete trial and a ready export of it: (client, study id, export id, manifest)."""
    sid = submit(api, llama)
    api.ctl.add_trial(sid, 0, 0.5)
    api.ctl.add_trial(sid, 1, 0.8)
    with api.ctl.sessions.begin() as s:
        from service.db import Trial

        for t in s.query(Trial).filter_by(study_id=sid):
            t.recipe = {"merge_method": "linear"}
    r = api.post(f"/studies/{sid}/exports", json={})
    assert r.status_code == 202, r.text
    export = r.json()
    assert export["state"] == "pending" and export["trial_number"] == 1  # the best by default
    folder, manifest = write_export(tmp_path / "data" / "exports", "k" * 64, FILES)
    finish_export(api.ctl, export["id"], folder, manifest)
    return api, sid, export["id"], manifest


def test_asking_for_an_export(api, llama):
    sid = submit(api, llama)
    r = api.post(f"/studies/{sid}/exports", json={})
    assert r.status_code == 409 and "no complete trial" in r.json()["detail"]
    api.ctl.add_trial(sid, 0, 0.4)
    api.ctl.add_trial(sid, 1, None, TrialState.FAILED)
    with api.ctl.sessions.begin() as s:
        from service.db import Trial

        s.query(Trial).filter_by(study_id=sid, number=0).one().recipe = {"merge_method": "linear"}
    assert api.post(f"/studies/{sid}/exports", json={"trial": 7}).status_code == 404
    r = api.post(f"/studies/{sid}/exports", json={"trial": 1})
    assert r.status_code == 409 and "failed" in r.json()["detail"]
    assert api.post(f"/studies/{sid}/exports", json={"trial": -1}).status_code == 422
    assert api.post(f"/studies/{sid}/exports", json={"bogus": 1}).status_code == 422
    first = api.post(f"/studies/{sid}/exports")  # no body: the best
    assert first.status_code == 202 and first.json()["state"] == "pending"
    again = api.post(f"/studies/{sid}/exports", json={"trial": 0})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]  # not asked twice
    eid = first.json()["id"]
    assert api.get(f"/studies/{sid}/exports/{eid}").json()["progress"] == 0.0
    assert [e["id"] for e in api.get(f"/studies/{sid}/exports").json()] == [eid]
    r = api.get(f"/studies/{sid}/exports/{eid}/archive")
    assert r.status_code == 409 and "pending" in r.json()["detail"]
    assert api.get(f"/studies/{sid}/exports/999").status_code == 404
    assert api.get("/studies/nope/exports").status_code == 404
    assert api.post("/studies/nope/exports").status_code == 404
    with api.ctl.sessions() as s:
        from service.db import Event

        kinds = [e.kind for e in s.query(Event).filter_by(study_id=sid)]
    assert kinds.count("export_requested") == 1


def test_multi_objective_export_needs_a_trial(api, llama):
    sid = submit(api, llama, multi_objective=True, optimizer={"name": "nsga2", "population_size": 4},
                 evaluation={"evaluator": "noop", "objectives": [{"task": "a", "metric": "m"},
                                                                 {"task": "b", "metric": "m"}]})
    api.ctl.add_trial(sid, 0, None, values=[0.1, 0.2])
    r = api.post(f"/studies/{sid}/exports", json={})
    assert r.status_code == 409 and f"/studies/{sid}/front" in r.json()["detail"]


def test_full_download_matches_its_checksum_and_unpacks(ready):
    client, sid, eid, manifest = ready
    info = client.get(f"/studies/{sid}/exports/{eid}").json()
    assert info["state"] == "ready" and info["sha256"] == manifest["archive_sha256"]
    assert sorted(f["name"] for f in info["files"]) == sorted(FILES)
    r = client.get(info["archive_url"])
    assert r.status_code == 200
    assert int(r.headers["content-length"]) == len(r.content) == manifest["archive_size"]
    assert r.headers["etag"] == f'"{manifest["archive_sha256"]}"'
    assert r.headers["accept-ranges"] == "bytes"
    assert hashlib.sha256(r.content).hexdigest() == manifest["archive_sha256"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        got = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == FILES  # the manifest itself is not in the archive
    head = client.head(info["archive_url"])
    assert head.status_code == 200 and int(head.headers["content-length"]) == manifest["archive_size"]
    assert client.get(info["archive_url"]).content == r.content  # byte-identical every time


def test_a_range_resumed_download_equals_the_full_one(ready):
    client, sid, eid, manifest = ready
    url = f"/studies/{sid}/exports/{eid}/archive"
    full = client.get(url).content
    etag = f'"{manifest["archive_sha256"]}"'
    cut = 300_007
    first = client.get(url, headers={"Range": f"bytes=0-{cut - 1}"})
    assert first.status_code == 206 and first.content == full[:cut]
    assert first.headers["content-range"] == f"bytes 0-{cut - 1}/{len(full)}"
    rest = client.get(url, headers={"Range": f"bytes={cut}-", "If-Range": etag})
    assert rest.status_code == 206 and int(rest.headers["content-length"]) == len(full) - cut
    assert first.content + rest.content == full
    suffix = client.get(url, headers={"Range": "bytes=-100"})
    assert suffix.status_code == 206 and suffix.content == full[-100:]
    stale = client.get(url, headers={"Range": f"bytes={cut}-", "If-Range": '"0000"'})
    assert stale.status_code == 200 and stale.content == full  # another archive: everything again
    r = client.get(url, headers={"Range": f"bytes={len(full)}-"})
    assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(full)}"


def test_single_files_and_names_outside_the_export(ready):
    client, sid, eid, _ = ready
    base = f"/studies/{sid}/exports/{eid}/files"
    r = client.get(f"{base}/model.safetensors")
    assert r.status_code == 200 and r.content == FILES["model.safetensors"]
    assert r.headers["etag"] == f'"{hashlib.sha256(FILES["model.safetensors"]).hexdigest()}"'
    part = client.get(f"{base}/model.safetensors", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == FILES["model.safetensors"][10:20]
    assert client.get(f"{base}/nested/tokenizer.json").content == b"{}"
    for bad in ("../../../etc/passwd", "%2e%2e/%2e%2e/evomerge.db", MANIFEST, "nope.bin"):
        assert client.get(f"{base}/{bad}").status_code == 404, bad


def test_a_missing_or_changed_folder_is_never_served(ready):
    client, sid, eid, _ = ready
    with client.ctl.sessions() as s:
        folder = Path(s.get(Artifact, eid).path)
    (folder / "README.md").write_bytes(b"# a different card, longer than before\n")
    assert client.get(f"/studies/{sid}/exports/{eid}/archive").status_code == 409
    (folder / MANIFEST).unlink()  # no manifest: not a complete export
    assert client.get(f"/studies/{sid}/exports/{eid}/archive").status_code == 409


def test_retention_evicts_lru_but_never_the_best_nor_a_download(api, llama, tmp_path):
    from service.db import Study
    from service.settings import get_settings

    sid = submit(api, llama)
    root = tmp_path / "data" / "exports"
    ids = []
    with api.ctl.sessions.begin() as s:
        now = utcnow()
        for n in range(4):
            folder, manifest = write_export(root, f"{n:064d}", {"w.bin": os.urandom(1000)})
            row = Artifact(study_id=sid, trial_number=n, kind="export", path=str(folder),
                           state=ArtifactState.READY, sha256=manifest["archive_sha256"],
                           size_bytes=manifest["archive_size"], export_key=manifest["key"],
                           last_accessed_at=now - timedelta(hours=10 - n))
            s.add(row)
            s.flush()
            ids.append(row.id)
        s.get(Study, sid).best_trial_number = 0  # the oldest is the best: kept
        s.get(Artifact, ids[1]).download_lease_until = now + timedelta(minutes=1)  # being downloaded
    size = api.get(f"/studies/{sid}/exports").json()[0]["size_bytes"]
    settings = get_settings(data_dir=tmp_path / "data", export_budget_bytes=2 * size)
    with api.ctl.sessions.begin() as s:
        evicted = evict(s, settings)
    assert evicted == [ids[2], ids[3]][:len(evicted)] and ids[2] in evicted
    states = {e["id"]: e["state"] for e in api.get(f"/studies/{sid}/exports").json()}
    assert states[ids[0]] == "ready" and states[ids[1]] == "ready" and states[ids[2]] == "evicted"
    assert not (root / f"{2:064d}").exists() and (root / f"{0:064d}").exists()
    gone = api.get(f"/studies/{sid}/exports/{ids[2]}/archive")
    assert gone.status_code == 409 and "POST the export again" in gone.json()["detail"]
    with api.ctl.sessions.begin() as s:
        assert evict(s, get_settings(data_dir=tmp_path / "data")) == []  # no budget: nothing evicted


@pytest.fixture
def authed(db_url, tmp_path, model_root, llama):
    app = create_app(fx.make_settings(db_url, tmp_path, model_root, auth=True), start_controller=False)
    ctl = fx.FakeController(db_url)
    with TestClient(app) as client:
        with ctl.sessions.begin() as s:
            scopes = {"all": None, "viewer": "read", "writer": "read,write"}
            client.tokens = {n: create_token(s, n, sc) for n, sc in scopes.items()}  # type: ignore[attr-defined]
        client.ctl = ctl  # type: ignore[attr-defined]
        yield client
    ctl.close()


def test_export_auth_401_403(authed, llama, tmp_path):
    bearer = {n: {"Authorization": f"Bearer {t}"} for n, t in authed.tokens.items()}
    sid = submit(authed, llama, headers=bearer["writer"])
    assert submit(authed, llama, headers=bearer["all"])
    r = authed.post("/studies", json=fx.spec_data(llama), headers=bearer["viewer"])
    assert r.status_code == 403 and "'write' scope" in r.json()["detail"]
    assert authed.post(f"/studies/{sid}/pause", headers=bearer["viewer"]).status_code == 403
    assert authed.get(f"/studies/{sid}", headers=bearer["viewer"]).status_code == 200
    authed.ctl.add_trial(sid, 0, 0.5)
    with authed.ctl.sessions.begin() as s:
        from service.db import Trial

        s.query(Trial).filter_by(study_id=sid).one().recipe = {"merge_method": "linear"}
    for who in ("viewer", "writer"):  # no 'download' scope
        r = authed.post(f"/studies/{sid}/exports", headers=bearer[who])
        assert r.status_code == 403 and "'download' scope" in r.json()["detail"], who
    assert authed.post(f"/studies/{sid}/exports").status_code == 401
    eid = authed.post(f"/studies/{sid}/exports", headers=bearer["all"]).json()["id"]
    folder, manifest = write_export(tmp_path / "data" / "exports", "a" * 64, FILES)
    finish_export(authed.ctl, eid, folder, manifest)
    url = f"/studies/{sid}/exports/{eid}"
    assert authed.get(url, headers=bearer["viewer"]).json()["state"] == "ready"  # reading is allowed
    for path in (f"{url}/archive", f"{url}/files/README.md"):
        assert authed.get(path).status_code == 401
        assert authed.get(path, headers={"Authorization": "Bearer em_wrong"}).status_code == 401
        assert authed.get(path, headers=bearer["viewer"]).status_code == 403
        assert authed.get(path, headers=bearer["all"]).status_code == 200
    assert authed.get(f"/studies/{sid}/exports/999/archive", headers=bearer["all"]).status_code == 404
    assert authed.get("/studies/nope/exports/1/archive", headers=bearer["all"]).status_code == 404


def test_token_scopes_are_validated():
    from service.db.tokens import TokenError, parse_scopes

    assert parse_scopes(None) == "read,write,download"
    assert parse_scopes("download, read") == "read,download"
    for bad in ("", "admin", "read,admin"):
        with pytest.raises(TokenError, match="choose from read, write, download"):
            parse_scopes(bad)
