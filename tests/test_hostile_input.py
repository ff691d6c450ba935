"""Hostile study specs against a live server (issue 13, items 1–3, 5–7).

Each test sends what an attacker or a careless client would, over HTTP to a real
uvicorn server on 127.0.0.1, and checks the answer: a 4xx that says what to fix, no file
outside the roots opened or echoed, no code imported, no 500. The HTTP-level items
(Range headers, racing actions, body caps) are in ``test_hostile_http.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from tests import api_fixtures as fx

spec_data = fx.spec_data

SECRET = b"SECRETAB" + b"TOP-SECRET-PAYLOAD" * 4  # the first 8 bytes read as a header length would leak


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root, family):
    """A live API (SQLite, no controller: nothing here may get as far as running)."""
    tmp = tmp_path_factory.mktemp("hostile")
    settings = fx.make_settings(f"sqlite:///{tmp / 'db.sqlite'}", tmp, model_root)
    with fx.LiveServer(create_app(settings, start_controller=False)) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        client.llama = family("llama")  # type: ignore[attr-defined]
        client.database_url = settings.database_url  # type: ignore[attr-defined]
        yield client


def _studies(server) -> int:
    return server.get("/studies").json()["total"]


def _problems(r: httpx.Response) -> dict[tuple, dict[str, Any]]:
    assert r.status_code == 422, (r.status_code, r.text[:2000])
    return {tuple(p["loc"]): p for p in r.json()["detail"]}


def _submit(server, **changes: Any) -> httpx.Response:
    return server.post("/studies", json=spec_data(server.llama, **changes))


def _lm_eval(task_dirs: list[str], task: str = "zoo_xl_add") -> dict[str, Any]:
    return {"evaluator": "lm_eval", "objectives": [{"task": task, "metric": "exact_match", "limit": 4}],
            "options": {"task_dirs": task_dirs}}


def _evil_module(folder: Path, marker: Path) -> Path:
    """A Python file that leaves ``marker`` behind when imported."""
    folder.mkdir(parents=True, exist_ok=True)
    module = folder / "evil.py"
    module.write_text(f"open({str(marker)!r}, 'w').write('ran')\ndef fn(*a, **k):\n    return a\n")
    return module


# ---- 1. evomerge: names only packaged task folders -----------------------------------------------
def test_packaged_task_prefix_takes_a_name_never_a_path(server, tmp_path):
    marker = tmp_path / "marker"
    outside = tmp_path / "outside_tasks"
    _evil_module(outside, marker)
    (outside / "evil.yaml").write_text("task: evil\ncustom_dataset: !function evil.fn\n"
                                       "output_type: generate_until\n")
    before = _studies(server)
    for given in [f"evomerge:{outside}", "evomerge:../../x", "evomerge:/etc", "evomerge:zoo/../../..",
                  "evomerge:ZOO", "evomerge:"]:
        r = _submit(server, evaluation=_lm_eval([given], task="evil"))
        found = _problems(r)[("evaluation", "options", "task_dirs", 0)]
        assert found["type"] == "unknown_packaged_tasks", found
        assert "evomerge:zoo" in found["msg"] and "never a path" in found["msg"]
    assert not marker.exists(), "a task module outside the roots was imported"
    assert _studies(server) == before

    # the worker side refuses the same way (a stored spec is never trusted to have been checked)
    from evaluators.base import SpecError
    from evaluators.validation import normalize_dirs

    with pytest.raises(SpecError, match="never a path"):
        normalize_dirs([f"evomerge:{outside}"])
    assert normalize_dirs(["evomerge:zoo"])[0].endswith("tasks/zoo")


def test_a_task_folder_under_the_roots_may_not_lead_outside(server, tmp_path, model_root):
    marker = tmp_path / "marker"
    outside = tmp_path / "outside"
    module = _evil_module(outside, marker)
    (outside / "base.yaml").write_text("output_type: generate_until\n")
    cases = {
        "link": lambda d: (d / "evil.py").symlink_to(module),
        "include": lambda d: (d / "t.yaml").write_text(f"include: {outside / 'base.yaml'}\ntask: t\n"),
        "function": lambda d: (d / "t.yaml").write_text(
            # lm-eval turns the dots into slashes: ".tmp.x.evil" is the file /tmp/x/evil.py
            f"task: t\ncustom_dataset: !function {str(module.with_suffix('')).replace('/', '.')}.fn\n"),
        "data_files": lambda d: (d / "t.yaml").write_text(
            f"task: t\ndataset_path: json\ndataset_kwargs:\n  data_files: {{test: {outside / 'x.jsonl'}}}\n"),
        "nested link": lambda d: ((d / "sub").mkdir(), (d / "sub" / "up").symlink_to(outside)),
    }
    for name, make in cases.items():
        folder = model_root / "hostile-tasks" / name.replace(" ", "-")
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        make(folder)
        r = _submit(server, evaluation=_lm_eval([str(folder)], task="t"))
        found = _problems(r)[("evaluation", "options", "task_dirs", 0)]
        assert found["type"] == "path_outside_roots", (name, found)
    assert not marker.exists()


def test_a_huge_task_folder_is_refused_without_walking_it(server, model_root):
    folder = model_root / "hostile-tasks" / "huge"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(2_100):
        (folder / f"f{i}.txt").touch()
    r = _submit(server, evaluation=_lm_eval([str(folder)], task="t"))
    assert _problems(r)[("evaluation", "options", "task_dirs", 0)]["type"] == "task_dir_too_large"


# ---- 2. shard names in the index, and files that lead out of the roots -------------------------
def _sharded_copy(src: Path, dest: Path, weight_map: dict[str, str]) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    (dest / "model.safetensors").rename(dest / "model-00001-of-00001.safetensors")
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dest


def _no_leak(r: httpx.Response) -> None:
    text = r.text
    assert "SECRET" not in text
    assert str(struct.unpack("<Q", SECRET[:8])[0]) not in text


def test_index_shard_names_cannot_reach_other_files(server, tmp_path, model_root):
    _, (e0, e1) = server.llama
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(SECRET)
    os.mkfifo(outside / "fifo.safetensors")  # opening it would hang the request: proof it is not opened
    messages = {}
    for label, shard in {
        "absolute, exists": str(outside / "secret.safetensors"),
        "absolute, fifo": str(outside / "fifo.safetensors"),
        "absolute, missing": str(outside / "missing.safetensors"),
        "relative, exists": "../../" + str(outside.relative_to(outside.anchor)) + "/secret.safetensors",
        "etc": "/etc/shadow",
        "dot-dot": "../x.safetensors",
        "sub folder": "sub/model.safetensors",
    }.items():
        folder = _sharded_copy(e0, model_root / "hostile-index", {"model.embed_tokens.weight": shard})
        r = _submit(server, sources=[str(folder), str(e1)])
        found = _problems(r)[("sources", 0)]
        assert found["type"] == "path_outside_model", (label, found)
        _no_leak(r)
        messages[label] = found["msg"]
    # an outside file that exists reads the same as one that does not
    assert len(set(messages.values())) == 1, messages


def test_linked_weights_outside_the_roots_are_refused_before_they_are_opened(server, tmp_path, model_root):
    _, (e0, e1) = server.llama
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(SECRET)
    os.mkfifo(outside / "fifo.safetensors")
    messages = set()
    for target in ["secret.safetensors", "fifo.safetensors", "missing.safetensors"]:
        folder = model_root / "hostile-link"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(e0, folder)
        (folder / "model.safetensors").unlink()
        (folder / "model.safetensors").symlink_to(outside / target)
        r = _submit(server, sources=[str(folder), str(e1)])
        if target == "missing.safetensors":  # a dangling link is no weights file at all
            assert _problems(r)[("sources", 0)]["type"] in ("path_outside_roots", "model_no_weights")
            continue
        found = _problems(r)[("sources", 0)]
        assert found["type"] == "path_outside_roots", found
        _no_leak(r)
        messages.add(found["msg"])
    assert len(messages) == 1


def test_a_corrupt_header_is_described_without_its_bytes(server, model_root):
    _, (e0, e1) = server.llama
    folder = model_root / "hostile-corrupt"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(e0, folder)
    (folder / "model.safetensors").write_bytes(SECRET)
    r = _submit(server, sources=[str(folder), str(e1)])
    found = _problems(r)[("sources", 0)]
    assert "not a readable safetensors file" in found["msg"]
    _no_leak(r)


# ---- 3. every number and list has a bound ----------------------------------------------------------
@pytest.mark.parametrize("changes, loc", [
    ({"optimizer": {"name": "optuna-cmaes", "population_size": 10**9}}, ("optimizer", "population_size")),
    ({"optimizer": {"name": "cma", "population_size": 10**7}}, ("optimizer", "population_size")),
    ({"space": {"kind": "parameter", "method": "ties", "granularity": 10**9}}, ("space", "granularity")),
    ({"evaluation": {"evaluator": "noop", "objectives": [{"task": "t", "metric": "m", "limit": 10**12}]}},
     ("evaluation", "objectives", 0, "limit")),
    ({"evaluation": {"evaluator": "noop",
                     "objectives": [{"task": "t", "metric": "m", "num_fewshot": 10**9}]}},
     ("evaluation", "objectives", 0, "num_fewshot")),
    ({"evaluation": {"evaluator": "noop", "batch_size": 10**9, "objectives": [{"task": "t", "metric": "m"}]}},
     ("evaluation", "batch_size")),
    ({"seed": 2**40}, ("seed",)),
    ({"optimizer": {"name": "cma", "options": {"incpopsize": 1e6}}}, ("optimizer",)),
    ({"space": {"kind": "parameter", "method": "ties", "weight_range": [0, 1e300]}},
     ("space", "weight_range", 1)),
    ({"space": {"kind": "stacking", "repeats": 10**6}}, ("space", "repeats")),
    ({"parallelism": 10**6}, ("parallelism",)),
])
def test_numbers_beyond_their_bound_are_refused(server, changes, loc):
    r = _submit(server, **changes)
    found = _problems(r)
    assert loc in found, found
    assert found[loc]["fix"]


def test_long_lists_and_many_objectives_are_refused_at_once(server):
    many = [{"task": f"unknown_task_{i}", "metric": "exact_match"} for i in range(10_000)]
    r = _submit(server, evaluation={"evaluator": "lm_eval", "objectives": many})
    assert ("evaluation", "objectives") in _problems(r)
    r = _submit(server, evaluation={"evaluator": "lm_eval", "objectives": many[:40]})
    assert ("evaluation", "objectives") in _problems(r)
    r = _submit(server, sources=["x"] * 2000)
    assert _problems(r)[("sources",)]["type"] == "spec_shape"


def test_a_space_with_too_many_genes_is_refused_before_it_is_built(server):
    # granularity 1 with 16 module filters over the family's layers is fine; stacking slots are bounded
    r = _submit(server, space={"kind": "parameter", "method": "ties", "granularity": 1,
                               "module_filters": [f"f{i}" for i in range(17)]})
    assert ("space", "module_filters") in _problems(r)


def test_huge_integers_and_alias_bombs_are_refused(server):
    body = json.dumps(spec_data(server.llama))[:-1] + ', "seed": ' + "9" * 5000 + "}"
    r = server.post("/studies", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text[:300]
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8))
    r = server.post("/studies", content=bomb.encode(), headers={"Content-Type": "application/yaml"})
    assert _problems(r)[()]["type"] == "spec_shape"


# ---- 5. a top-level seed -------------------------------------------------------------------------------
def test_a_top_level_seed_is_stored_so_that_the_controller_accepts_it(server, tmp_path, model_root):
    from service.db import Study, make_engine, session_factory
    from service.runtime import validate_stored

    r = _submit(server, seed=7)
    assert r.status_code == 201, r.text
    data = spec_data(server.llama, optimizer={"name": "optuna-cmaes", "seed": 5})
    data.pop("seed")
    r2 = server.post("/studies", json=data)
    assert r2.status_code == 201, r2.text
    settings = fx.make_settings("sqlite:///unused", tmp_path, model_root)
    engine = make_engine(server.database_url)
    try:
        with session_factory(engine)() as s:
            for sid, seed in [(r.json()["id"], 7), (r2.json()["id"], 5)]:
                validated = validate_stored(s.get(Study, sid).spec, settings)
                assert validated.optimizer.seed == seed
    finally:
        engine.dispose()


# ---- 6. strict types, names, and every valid JSON string ------------------------------------------
@pytest.mark.parametrize("changes, loc", [
    ({"budget": {"max_trials": True}}, ("budget", "max_trials")),
    ({"budget": {"max_trials": "5"}}, ("budget", "max_trials")),
    ({"parallelism": 1.5}, ("parallelism",)),
    ({"multi_objective": 1}, ("multi_objective",)),
    ({"seed": "3"}, ("seed",)),
])
def test_numbers_and_booleans_are_strict(server, changes, loc):
    assert loc in _problems(_submit(server, **changes))


@pytest.mark.parametrize("name", ["with\x00nul", "bell\x07", "new\nline", "esc\x1b[31m"])
def test_control_characters_in_a_name_are_refused_with_a_clear_message(server, name):
    found = _problems(_submit(server, name=name))
    assert any("control character" in p["msg"] or "NUL" in p["msg"] for p in found.values()), found


def test_every_valid_json_string_is_accepted(server):
    body = json.dumps(spec_data(server.llama, name="test tube \U0001f9ea, ü, 日本"))  # \ud83e\uddea escapes
    assert "\\ud83e\\uddea" in body
    r = server.post("/studies", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "test tube \U0001f9ea, ü, 日本"
    lone = body.replace("\\ud83e\\uddea", "\\ud83e")  # half a pair is not Unicode
    assert _problems(server.post("/studies", content=lone, headers={"Content-Type": "application/json"}))


def test_a_key_given_twice_in_json_is_refused(server):
    body = json.dumps(spec_data(server.llama))[:-1] + ', "seed": 1, "seed": 2}'
    found = _problems(server.post("/studies", content=body, headers={"Content-Type": "application/json"}))
    assert "twice" in found[()]["msg"]


# ---- 7. deep nesting in the body, in a field, and in a YAML flow ------------------------------------
@pytest.mark.parametrize("depth", [40, 1_000, 100_000])
def test_deep_nesting_is_refused_with_a_4xx(server, depth):
    deep = "[" * depth + "]" * depth
    body = json.dumps(spec_data(server.llama))[:-1] + f', "extra": {deep}}}'
    r = server.post("/studies", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    field = spec_data(server.llama)
    field["evaluation"]["options"] = {"hflm_args": json.loads("[" * 40 + "]" * 40)}
    assert 400 <= server.post("/studies", json=field).status_code < 500
    yaml_flow = f"name: x\nsources: {'[' * depth}{']' * depth}\n"
    r = server.post("/studies", content=yaml_flow.encode(), headers={"Content-Type": "application/yaml"})
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])


# ---- validation never waits for lm-eval's built-in index -------------------------------------------
def test_a_spec_that_needs_the_builtin_task_index_never_waits_for_it(server):
    """lm-eval's index of its ~15,000 built-in tasks takes ~20 s to build: the API answers 503 with
    Retry-After while it is built in the background, then validates against it."""
    import time

    objectives = [{"task": f"gsm8kk{i}", "metric": "exact_match"} for i in range(32)]
    deadline = time.monotonic() + 300
    while True:
        r = _submit(server, evaluation={"evaluator": "lm_eval", "objectives": objectives})
        if r.status_code != 503:
            break
        assert "being built" in r.json()["detail"] and r.headers["Retry-After"]
        assert time.monotonic() < deadline, "the index was never built"
        time.sleep(2)
    found = _problems(r)
    assert found[("evaluation", "objectives", 0, "task")]["type"] == "unknown_task"
    assert "gsm8k" in found[("evaluation", "objectives", 0, "task")]["msg"]  # close matches are found
