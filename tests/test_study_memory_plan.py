"""A study's memory plan in the service: the spec's `worker` section, the settings, validation,
the worker spec, GET /studies/{id}, and the refusal of a study no worker can hold (SQLite only:
the plan is made before anything is stored, whatever the database)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.db import Study, make_engine, session_factory
from service.db.testing import temporary_database
from service.runtime import pool_key, validate_stored, worker_spec_data
from tests import api_fixtures as fx

llama = fx.llama  # fixture
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def db_url(tmp_path):
    with temporary_database("sqlite", tmp_path) as url:
        yield url


@pytest.fixture
def make_client(db_url, tmp_path, model_root):
    """``make_client(**settings)``: a TestClient over the app with these settings (no controller)."""
    clients: list[TestClient] = []

    def make(**overrides) -> TestClient:
        settings = fx.make_settings(db_url, tmp_path, model_root, **overrides)
        client = TestClient(create_app(settings, start_controller=False))
        client.__enter__()
        client.settings = settings  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def stored_studies(db_url: str) -> list[Study]:
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as s:
            return list(s.query(Study).all())
    finally:
        engine.dispose()


def test_a_study_has_a_memory_plan_and_its_worker_spec_carries_it(make_client, llama, db_url):
    client = make_client()
    r = client.post("/studies", json=fx.spec_data(llama))
    assert r.status_code == 201, r.text
    study = client.get(f"/studies/{r.json()['id']}").json()
    plan = study["memory_plan"]
    assert plan["tier"] == "resident" and plan["device"] == "cpu"  # the tiny models fit this machine
    assert plan["candidate_dtype"] == "float32"  # auto: the zoo's own dtype
    assert set(plan["breakdown"]) == {"sources", "candidate", "workspace", "staging", "evaluation",
                                      "task_vector_cache", "magnitude_histograms"}
    assert plan["breakdown"]["sources"] > 0 and plan["device_bytes"] >= plan["breakdown"]["sources"]
    assert not plan["tiers"]["streamed"]["fits"]  # never streamed on a CPU worker
    assert plan["limits"]["device"] == "cpu" and plan["limits"]["host_bytes"] > 0
    assert r.json()["memory_plan"] == plan  # the answer to POST is the study too

    (row,) = stored_studies(db_url)
    worker = row.spec["worker_spec"]
    # the worker plans again with its own resources: it gets the spec's choices, not the API's tier
    assert (worker["dtype"], worker["tier"], worker["cache_task_vectors"]) == ("auto", "auto", False)
    assert worker["method"] == "ties" and worker["memory_plan"] == plan
    validated = validate_stored(row.spec, client.settings)  # type: ignore[attr-defined]
    data = worker_spec_data(validated, client.settings)  # type: ignore[attr-defined]
    assert data["tier"] == "auto" and data["memory_plan"]["tier"] == "resident"
    from workers.trial import WorkerSpec, worker_plan

    assert worker_plan(WorkerSpec.model_validate(data)).tier == "resident"
    # the pool key leaves the plan's report out (its numbers may differ between validations)
    assert pool_key(data) == pool_key({**data, "memory_plan": {"other": "numbers"}})
    assert pool_key(data) != pool_key({**data, "tier": "mapped"})


def test_the_worker_section_is_honoured(make_client, llama):
    client = make_client()
    spec = fx.spec_data(llama, worker={"dtype": "bfloat16", "tier": "mapped", "cache_task_vectors": True})
    r = client.post("/studies", json=spec)
    assert r.status_code == 201, r.text
    plan = r.json()["memory_plan"]
    assert plan["tier"] == "mapped" and plan["candidate_dtype"] == "bfloat16"
    assert plan["page_cache_bytes"] == plan["breakdown"]["sources"]
    assert not plan["cache_task_vectors"]  # the cache needs the resident tier
    assert any("needs the resident tier" in n for n in plan["notes"])
    assert r.json()["spec"]["worker"] == spec["worker"]


def test_the_task_vector_cache_when_there_is_room(make_client, llama):
    r = make_client().post("/studies", json=fx.spec_data(llama, worker={"cache_task_vectors": True}))
    assert r.status_code == 201, r.text
    plan = r.json()["memory_plan"]
    assert plan["cache_task_vectors"] and plan["breakdown"]["task_vector_cache"] > 0


def test_a_study_no_worker_can_hold_is_refused_before_anything_is_stored(make_client, llama, db_url,
                                                                          monkeypatch):
    monkeypatch.setenv("EVOMERGE_WORKER_HOST_MEMORY", "1MB")
    client = make_client()
    assert client.settings.worker_host_memory == 10**6  # type: ignore[attr-defined]
    r = client.post("/studies", json=fx.spec_data(llama))
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["loc"] == ["worker"] and problem["type"] == "does_not_fit"
    assert problem["msg"].startswith("no memory tier fits a CPU worker with 1.0 MB of memory: "
                                     "resident needs ")
    assert "1.0 MB available" in problem["msg"] and "mapped needs" in problem["msg"]
    assert "EVOMERGE_WORKER_HOST_MEMORY" in problem["fix"] and "worker.dtype: bfloat16" in problem["fix"]
    assert client.get("/studies").json()["total"] == 0 and stored_studies(db_url) == []


def test_a_forced_streamed_tier_on_a_cpu_worker_is_refused(make_client, llama):
    r = make_client().post("/studies", json=fx.spec_data(llama, worker={"tier": "streamed"}))
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert problem["type"] == "does_not_fit" and "GPU workers" in problem["msg"]
    assert "worker.tier: resident" in problem["fix"]


def test_gpu_workers_are_planned_with_the_memory_the_settings_give(make_client, llama):
    unknown = make_client(worker_num_gpus=1).post("/studies", json=fx.spec_data(llama)).json()["memory_plan"]
    assert unknown["tier"] == "resident" and unknown["limits"]["device_bytes"] is None
    assert any("EVOMERGE_WORKER_DEVICE_MEMORY" in n for n in unknown["notes"])
    tiers = unknown["tiers"]
    between = (tiers["resident"]["device_bytes"] + tiers["streamed"]["device_bytes"]) // 2
    client = make_client(worker_num_gpus=1, worker_device_memory=between, worker_host_memory="64GB")
    r = client.post("/studies", json=fx.spec_data(llama))
    assert r.status_code == 201, r.text
    plan = r.json()["memory_plan"]
    assert plan["tier"] == "streamed" and plan["device"] == "cuda" and plan["breakdown"]["staging"] > 0
    # pinned on the host, beside the magnitude histograms of a trimming method
    assert plan["host_bytes"] == plan["breakdown"]["sources"] + plan["breakdown"]["magnitude_histograms"]
    assert plan["limits"] == {"device": "cuda", "device_bytes": between, "host_bytes": 64 * 10**9}


@pytest.mark.parametrize("worker, loc", [
    ({"tier": "swap"}, ["worker", "tier"]),
    ({"dtype": "int8"}, ["worker", "dtype"]),
    ({"cache_task_vectors": "yes"}, ["worker", "cache_task_vectors"]),
    ({"tiers": "auto"}, ["worker", "tiers"]),
    ("resident", ["worker"]),
])
def test_bad_worker_fields_are_refused(make_client, llama, db_url, worker, loc):
    r = make_client().post("/studies", json=fx.spec_data(llama, worker=worker))
    assert r.status_code == 422, r.text
    assert [p["loc"] for p in r.json()["detail"]] == [loc]
    assert stored_studies(db_url) == []


@pytest.mark.parametrize("value, expected", [
    ("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("123", 123), ("", None)])
def test_memory_settings_take_sizes(monkeypatch, value, expected):
    from service.settings import get_settings

    monkeypatch.setenv("EVOMERGE_WORKER_DEVICE_MEMORY", value)
    assert get_settings().worker_device_memory == expected


def test_a_memory_setting_that_is_no_size_is_refused(monkeypatch):
    from service.settings import get_settings

    monkeypatch.setenv("EVOMERGE_WORKER_HOST_MEMORY", "plenty")
    with pytest.raises(ValidationError, match="not a memory size"):
        get_settings()


def test_the_worker_settings_limits(tmp_path):
    from service.settings import get_settings

    gpu = get_settings(data_dir=tmp_path, worker_num_gpus=1, worker_device_memory="80GB").worker_limits()
    assert gpu.device == "cuda" and gpu.device_bytes == 80 * 10**9 and gpu.host_bytes
    cluster = get_settings(data_dir=tmp_path, ray_address="head:6379").worker_limits()
    assert cluster.device == "cpu" and cluster.host_bytes is None  # the workers run elsewhere


def test_planning_imports_no_torch():
    code = ("import sys, service.validation, service.settings, service.runtime;"
            "print(','.join(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
