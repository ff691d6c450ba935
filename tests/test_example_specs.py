"""Every example study spec in docs/, the README and service/spec.py runs to completion.

Each example is submitted over REST to a real server with its controller and Ray workers,
with what this machine lacks put in place and nothing else changed:

- the models it names are created under a model root, by the names it uses (tiny random
  Llamas: a base and experts; as many layers as its layer ranges need);
- a task only lm-eval's hub index has (gsm8k) and a task folder it names (tasks/sums) are
  written as small local tasks of the same names;
- a reference to another study ({study: ps-7}) names the study this test ran first;
- the budget is 2 trials, every limit 4 examples, one worker.

A spec that the docs show but the service refuses, or that fails when its controller
starts it (the top-level ``seed`` of the multi-objective example did), fails here.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.app import create_app
from service.settings import get_settings
from service.spec import DEMO_EXAMPLE, MULTI_OBJECTIVE_EXAMPLE

ROOT = Path(__file__).resolve().parents[1]

STUDY_KEYS = {"name", "sources", "space", "evaluation", "budget"}
HUB_ONLY_TASKS = {"gsm8k"}  # lm-eval tasks whose data only the hub has


def example_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, spec) of every complete study spec the project shows its users."""
    found = [("service/spec.py DEMO_EXAMPLE", DEMO_EXAMPLE),
             ("service/spec.py MULTI_OBJECTIVE_EXAMPLE", MULTI_OBJECTIVE_EXAMPLE)]
    for doc in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for i, block in enumerate(re.finditer(r"```(?:yaml|json)\n(.*?)```", text, re.S)):
            try:
                data = yaml.safe_load(block.group(1))
            except yaml.YAMLError:
                continue  # task YAML with !function tags: not a study
            if isinstance(data, dict) and STUDY_KEYS <= set(data):
                found.append((f"{doc.relative_to(ROOT)} block {i}", data))
    return found


EXAMPLES = example_specs()


def test_the_docs_show_study_specs():
    where = [w for w, _ in EXAMPLES]
    assert len(EXAMPLES) >= 8, where
    assert any("study-spec.md" in w for w in where) and any("quickstart.md" in w for w in where)


class World:
    """Model folders and task folders under one root, made on demand by the names a spec uses."""

    def __init__(self, root: Path) -> None:
        from workers.synthetic import make_family

        self.root = root
        self.families: dict[int, tuple[Path, list[Path]]] = {}
        self._make_family = make_family

    def family(self, layers: int) -> tuple[Path, list[Path]]:
        if layers not in self.families:
            self.families[layers] = self._make_family("llama", self.root / f"_family-{layers}", 3,
                                                      layers=layers, hidden=16, heads=2)
        return self.families[layers]

    def model(self, name: str, role: int | None, layers: int) -> str:
        """``name`` under the root: the family's base (role None) or expert ``role``."""
        folder = self.root / name
        if not folder.exists():
            base, experts = self.family(layers)
            folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(base if role is None else experts[role % len(experts)], folder)
        return name

    def task_folder(self, name: str, tasks: list[str]) -> str:
        from evaluators.testing import addition_rows, write_generate_task

        folder = self.root / name
        for task in tasks:
            if not (folder / f"{task}.yaml").exists():
                write_generate_task(folder, task, addition_rows(8, seed=len(task)),
                                    train_rows=addition_rows(8, seed=99))
        return name


def adapt(spec: dict[str, Any], world: World, studies: dict[str, str]) -> dict[str, Any]:
    """The example as this machine can run it (see the module docstring)."""
    spec = copy.deepcopy(spec)
    space = spec["space"]
    ranges = [r for r in space.get("layer_ranges") or [] if r]
    layers = max([2, *(end for _, end in ranges)])
    for i, source in enumerate(spec["sources"]):
        if isinstance(source, dict):
            source["study"] = studies["parameter"]
        else:
            spec["sources"][i] = world.model(source, i, layers)
    if isinstance(spec.get("base_model"), str):
        is_source = spec["base_model"] in spec["sources"]
        spec["base_model"] = world.model(spec["base_model"], None if not is_source else 0, layers)
    evaluation = spec["evaluation"]
    options = evaluation.setdefault("options", {})
    dirs = options.setdefault("task_dirs", [])
    for objective in evaluation["objectives"]:
        objective["limit"] = 4
    local = [d for d in dirs if not d.startswith("evomerge:")]
    tasks = [o["task"] for o in evaluation["objectives"]]
    heldout = spec.get("heldout") or {}
    tasks += list((heldout.get("tasks") or {}).values())
    for folder in local:
        world.task_folder(folder, tasks)
    hub_only = [t for t in tasks if t in HUB_ONLY_TASKS]
    if hub_only:
        dirs.append(world.task_folder("_hub_stand_ins", hub_only))
    if heldout:
        heldout["top_k"] = 1
        if "limit" in heldout:
            heldout["limit"] = 4
    spec["budget"] = {"max_trials": 2}
    spec["parallelism"] = 1
    return spec


@pytest.mark.slow
def test_every_example_spec_runs_to_completion(tmp_path, ray_local):
    world = World(tmp_path / "models")
    settings = get_settings(data_dir=tmp_path / "data", database_url=f"sqlite:///{tmp_path / 'ex.db'}",
                            model_roots=[str(world.root)], max_workers=2, lease_seconds=120)
    studies: dict[str, str] = {}
    # the examples that build on another study's model (PS then DFS) go second, naming one of the first
    first = [e for e in EXAMPLES if not any(isinstance(s, dict) for s in e[1]["sources"])]
    second = [e for e in EXAMPLES if e not in first]
    outcomes: dict[str, tuple[Any, ...]] = {}
    with TestClient(create_app(settings)) as client:
        for batch in (first, second):
            submitted = {}
            for where, example in batch:  # all at once: the controller runs them side by side
                spec = adapt(example, world, studies)
                r = client.post("/studies", json=spec)
                assert r.status_code == 201, (where, r.text)
                submitted[where] = (r.json()["id"], spec["space"]["kind"])
            for where, (study_id, kind) in submitted.items():
                study = _wait(client, study_id)
                outcomes[where] = (study["status"], study["trials_done"], study["trials_failed"],
                                   study["error"])
                if study["status"] == "completed" and kind == "parameter":
                    studies.setdefault("parameter", study_id)
    bad = {w: o for w, o in outcomes.items() if o[:3] != ("completed", 2, 0)}
    assert not bad, bad
    assert len(outcomes) == len(EXAMPLES)


def _wait(client: TestClient, study_id: str, timeout: float = 600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        study = client.get(f"/studies/{study_id}").json()
        if study["status"] in ("completed", "failed", "cancelled"):
            return study
        assert time.monotonic() < deadline, study
        time.sleep(0.3)
