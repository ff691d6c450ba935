"""Settings: EVOMERGE_* environment, derived defaults, nothing created, safe binding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings, SettingsError, get_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("EVOMERGE_") or key == "RAY_ADDRESS":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


def test_defaults_create_nothing(tmp_path):
    s = get_settings()
    assert s.data_dir == Path("evomerge-data")
    assert s.database_url == f"sqlite:///{tmp_path / 'evomerge-data' / 'evomerge.db'}"
    assert s.model_roots == [Path("evomerge-data/models"), Path("~/.cache/evomerge/zoo").expanduser()]
    assert s.hub_allowlist == [] and not s.hub_id_allowed("gpt2")
    assert (s.ray_address, s.auth, s.trust_remote_code) == (None, False, False)
    assert (s.host, s.port) == ("127.0.0.1", 8765)
    assert (s.worker_num_cpus, s.worker_num_gpus, s.worker_threads, s.max_workers) == (1, 0, 1, 2)
    assert (s.lease_seconds, s.max_body_bytes) == (600, 1_000_000)
    assert list(tmp_path.iterdir()) == []  # no folder until ensure_dirs()
    s.check()
    s.ensure_dirs()
    assert (tmp_path / "evomerge-data" / "models").is_dir()


def test_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("EVOMERGE_DATABASE_URL", "postgresql://evomerge@db/evomerge")
    monkeypatch.setenv("EVOMERGE_AUTH", "true")
    monkeypatch.setenv("EVOMERGE_HOST", "0.0.0.0")
    monkeypatch.setenv("EVOMERGE_PORT", "9000")
    monkeypatch.setenv("EVOMERGE_WORKER_NUM_GPUS", "0.5")
    monkeypatch.setenv("EVOMERGE_MODEL_ROOTS", f"{tmp_path / 'a'}{os.pathsep}{tmp_path / 'b'}")
    monkeypatch.setenv("EVOMERGE_HUB_ALLOWLIST", "meta-llama/*, Qwen/Qwen2.5-*")
    s = get_settings()
    assert s.database_url == "postgresql://evomerge@db/evomerge"
    assert (s.auth, s.host, s.port, s.worker_num_gpus) == (True, "0.0.0.0", 9000, 0.5)
    assert s.model_roots == [tmp_path / "a", tmp_path / "b"]
    assert s.hub_allowlist == ["meta-llama/*", "Qwen/Qwen2.5-*"]
    assert s.hub_id_allowed("Qwen/Qwen2.5-0.5B") and not s.hub_id_allowed("qwen/Qwen2.5-0.5B")
    s.check()  # auth on: any host
    assert get_settings(port=1234).port == 1234  # keyword overrides win


def test_lists_as_json(monkeypatch):
    monkeypatch.setenv("EVOMERGE_MODEL_ROOTS", '["/m1", "~/m2"]')
    monkeypatch.setenv("EVOMERGE_HUB_ALLOWLIST", '["org/*"]')
    s = get_settings()
    assert s.model_roots == [Path("/m1"), Path("~/m2").expanduser()] and s.hub_allowlist == ["org/*"]


def test_ray_address(monkeypatch):
    assert get_settings().ray_address is None  # local Ray
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    assert get_settings().ray_address == "ray://head:10001"
    monkeypatch.setenv("EVOMERGE_RAY_ADDRESS", "auto")
    assert get_settings().ray_address == "auto"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.com"])
def test_auth_off_needs_a_loopback_host(host):
    with pytest.raises(SettingsError, match="EVOMERGE_AUTH=true"):
        Settings(host=host).check()
    Settings(host=host, auth=True).check()


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_hosts_are_fine_without_auth(host):
    Settings(host=host).check()


@pytest.mark.parametrize("field,value", [("worker_threads", 0), ("max_workers", 0), ("port", 70000),
                                         ("lease_seconds", 0), ("worker_num_gpus", -1)])
def test_bad_values_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        Settings(**{field: value})


def test_path_allowed(tmp_path):
    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "link").symlink_to(outside)
    s = Settings(model_roots=[root])
    assert s.path_allowed(root / "m") and s.path_allowed(root)
    assert not s.path_allowed(root / ".." / "elsewhere")
    assert not s.path_allowed(root / "link")  # a symlink out of the root is outside
    assert not s.path_allowed(tmp_path / "models-evil")
