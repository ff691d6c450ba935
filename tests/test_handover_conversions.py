"""Typed handovers: how often a trial's ``Recipe`` and a pool's ``WorkerSpec`` are converted.

The space's ``decode`` makes a :class:`Recipe`; the controller dumps it once (the trial row's
JSON) and hands the object to its pool, and Ray pickles it to the actor, which builds it as it
is. A pool's :class:`WorkerSpec` is validated once, and its actors get the object. The counts
are taken with wrappers around the conversion methods while the real controller runs a study;
the pool here runs its trials in this process, with a pickle round trip standing in for Ray's.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search_spaces.recipe import Recipe
from service.app import create_app
from service.controller import Controller
from service.db import Study, StudyStatus, Trial, TrialState, make_engine, session_factory
from service.runtime import StudyRuntime
from tests.api_fixtures import make_settings
from tests.test_plugins_end_to_end import InProcessPool
from workers.trial import TrialResult, WorkerSpec

NOOP = {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}]}
TRIALS = 4


class Conversions:
    """Counts calls of the conversion methods: ``total`` always, ``trial`` only inside
    :meth:`window` (the work the controller and a worker do for one search trial)."""

    def __init__(self) -> None:
        self.total: Counter[str] = Counter()
        self.trial: Counter[str] = Counter()
        self._depth = 0

    def hit(self, name: str) -> None:
        self.total[name] += 1
        if self._depth:
            self.trial[name] += 1

    @contextmanager
    def window(self, on: bool = True) -> Iterator[None]:
        self._depth += on
        try:
            yield
        finally:
            self._depth -= on

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for cls in (Recipe, WorkerSpec):
            self._wrap_classmethod(monkeypatch, cls, "model_validate")
            self._wrap_method(monkeypatch, cls, "model_dump")
        self._wrap_classmethod(monkeypatch, Recipe, "from_dict")

    def _wrap_classmethod(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        original: Callable[..., Any] = getattr(cls, name).__func__
        label = f"{cls.__name__}.{name}"

        def wrapper(klass: type, *args: Any, **kwargs: Any) -> Any:
            self.hit(label)
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, name, classmethod(wrapper))

    def _wrap_method(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        original: Callable[..., Any] = getattr(cls, name)
        label = f"{cls.__name__}.{name}"

        def wrapper(obj: Any, *args: Any, **kwargs: Any) -> Any:
            if type(obj) is cls:
                self.hit(label)
            return original(obj, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)


class PickledPool(InProcessPool):
    """The in-process pool of tests/test_plugins_end_to_end.py, counting conversions on the
    "actor" side; ``arrived`` records the type each recipe had there."""

    def __init__(self, spec: WorkerSpec, n: int, conversions: Conversions) -> None:
        super().__init__(spec, n)
        self.conversions = conversions
        self.arrived: list[type] = []

    def _run(self, trial_id: int, data: bytes, race: Any = None) -> TrialResult:
        with self.conversions.window(trial_id >= 0):
            recipe = pickle.loads(data)
            if trial_id >= 0:
                self.arrived.append(type(recipe))
            return pickle.loads(pickle.dumps(self.runner.run(trial_id, recipe, race=race)))


class CountingController(Controller):
    """The controller, unchanged but for its pools (in process) and the counting windows."""

    conversions: Conversions
    spaces: list[Any]  # the space of each trial started
    made_pools: list[PickledPool]

    def _pool(self, rt: StudyRuntime) -> PickledPool:
        pool = self.pools.get(rt.pool_key)
        if pool is None:
            pool = PickledPool(self._worker_spec(rt), rt.parallelism, self.conversions)
            self.pools[rt.pool_key] = pool
            self.made_pools.append(pool)
        return pool

    def _start_trial(self, rt: StudyRuntime, pool: Any) -> bool:
        self.spaces.append(rt.space)
        with self.conversions.window():
            return super()._start_trial(rt, pool)

    def _record(self, result: TrialResult) -> None:
        with self.conversions.window(result.trial_id >= 0):
            super()._record(result)


def run_counted(spec: dict[str, Any], tmp_path: Path, model_root: Path,
                monkeypatch: pytest.MonkeyPatch) -> tuple[Conversions, CountingController, list[Trial]]:
    """Submit ``spec`` over REST, then count conversions while the controller runs it to the end."""
    url = f"sqlite:///{tmp_path / 'evomerge.db'}"
    settings = make_settings(url, tmp_path, model_root, max_workers=2)
    with TestClient(create_app(settings, start_controller=False)) as client:
        r = client.post("/studies", json=spec)
        assert r.status_code == 201, r.text
        study_id = r.json()["id"]
    conversions = Conversions()
    conversions.install(monkeypatch)  # after submission: validation at the API is not a handover
    engine = make_engine(url)
    sessions = session_factory(engine)
    controller = CountingController(settings, sessions)
    controller.conversions, controller.spaces, controller.made_pools = conversions, [], []
    try:
        deadline = time.monotonic() + 120
        while True:
            with sessions() as s:
                if s.get(Study, study_id).status == StudyStatus.COMPLETED:
                    break
            assert time.monotonic() < deadline, "the study did not complete"
            controller.step()
    finally:
        controller.stop()
    with sessions() as s:
        trials = list(s.scalars(select(Trial).where(Trial.study_id == study_id).order_by(Trial.number)))
    engine.dispose()
    return conversions, controller, trials


def study_spec(llama: tuple[Path, list[Path]], space: dict[str, Any]) -> dict[str, Any]:
    base, (e0, e1) = llama
    return {"name": "handover counts", "sources": [str(e0), str(e1)], "base_model": str(base),
            "space": space, "evaluation": NOOP, "optimizer": {"name": "random"},
            "budget": {"max_trials": TRIALS}, "parallelism": 2, "seed": 0}


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


SPACES = {
    "parameter": {"kind": "parameter", "method": "ties", "embedding_genes": False},
    "stacking": {"kind": "stacking", "repeats": 2, "scales": {"search": True, "low": 0.5, "high": 1.5}},
}


@pytest.mark.parametrize("kind", list(SPACES))
def test_a_trial_dumps_its_recipe_once_and_validates_nothing(kind, llama, tmp_path, model_root, monkeypatch):
    spec = study_spec(llama, SPACES[kind])
    if kind == "stacking":
        spec.pop("base_model")
    conversions, controller, trials = run_counted(spec, tmp_path, model_root, monkeypatch)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * TRIALS, [t.failure_reason for t in trials]

    # per trial: the one dump is the trial row's JSON; the worker gets the object (before: the
    # controller dumped it for the pool and the worker validated it again, 4 legs with study refs)
    assert conversions.trial["Recipe.model_dump"] == TRIALS
    assert conversions.trial["Recipe.model_validate"] == 0
    assert conversions.trial["Recipe.from_dict"] == 0
    (pool,) = controller.made_pools
    assert pool.arrived == [Recipe] * TRIALS  # validated objects on the actor side

    # per pool: validated once, never dumped (before: once in the controller, then a dump and a
    # validation per actor)
    assert conversions.total["WorkerSpec.model_validate"] == 1
    assert conversions.total["WorkerSpec.model_dump"] == 0
    assert isinstance(pool.runner.spec, WorkerSpec)

    # the stored JSON is what it was: the decoded recipe's dump, byte for byte
    space = controller.spaces[0]
    for t in trials:
        assert json.dumps(t.recipe) == json.dumps(space.decode(t.params).model_dump(mode="json"))


def test_resolving_study_refs_keeps_the_object(monkeypatch):
    """A recipe that names another study's model is resolved as the object (no dict round trip);
    a baseline's JSON is resolved to JSON, as before."""
    conversions = Conversions()
    conversions.install(monkeypatch)
    placeholder = "study:ps-1/best"
    rt = SimpleNamespace(paths={placeholder: "/models/ps-1"})
    recipe = Recipe(merge_method="linear", models=[{"model": placeholder, "parameters": {"weight": 1.0}},
                                                   {"model": "b", "parameters": {"weight": 0.5}}])
    with conversions.window():
        resolved = StudyRuntime.resolve(rt, recipe)  # type: ignore[arg-type]
    assert isinstance(resolved, Recipe) and resolved.referenced_models() == ["/models/ps-1", "b"]
    assert not conversions.trial
    as_json = StudyRuntime.resolve(rt, recipe.model_dump(mode="json"))  # type: ignore[arg-type]
    assert as_json == resolved.model_dump(mode="json")
