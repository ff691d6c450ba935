"""The controller's optimizer store, for every registered optimizer: its state survives a
restart the way the optimizer declares (``Optimizer.persistence``), a resumed optimizer
proposes what the uninterrupted one would have, and a point asked but never told is found
again (storage-kept optimizers). Also: the budget warning each optimizer declares."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from search_spaces import optimizers
from search_spaces.genes import Gene, GeneSet
from search_spaces.optimizers.base import OptimizerSpec
from service.controller import OptimizerStore
from service.db import Study, make_engine, optuna_storage, session_factory, upgrade
from service.db.optuna_cache import SoleWriterStorage

GENES = GeneSet(Gene(name=f"x{i}", low=-1.0, high=1.0, label=f"x{i}") for i in range(3))


def _database(path):
    """A database with one study row, as the API leaves it: (url, sessions, engine)."""
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    with sessions.begin() as s:
        s.add(Study(id="s1", name="s1", spec={}))
    return url, sessions, engine


@pytest.fixture
def db(tmp_path):
    url, sessions, engine = _database(tmp_path / "store.db")
    yield url, sessions
    engine.dispose()


def _open(url: str, sessions, name: str) -> OptimizerStore:
    """What the controller does when it opens the study (service/controller/recovery.py)."""
    spec = OptimizerSpec(name=name, seed=3, population_size=4)
    with sessions() as s:
        state = s.get(Study, "s1").optimizer_state
    return OptimizerStore.open("s1", SimpleNamespace(optimizer=spec), GENES,
                               storage=lambda: SoleWriterStorage(optuna_storage(url)),
                               study_name="evomerge-s1", state=state)


def _run(store: OptimizerStore, sessions, told: int, untold: int) -> list[int]:
    """Ask ``told + untold`` points (each saved as the trial row's transaction would), tell the first
    ``told`` (recorded as the recorder does); returns the ids left untold."""
    points = []
    for _ in range(told + untold):
        point = store.ask()
        with sessions.begin() as s:
            store.save(s)
        points.append(point)
    for point in points[:told]:
        value = -sum(v * v for v in point.params.values())
        with sessions.begin() as s:
            store.tell_in(s, point.id, [value], None)
        store.tell_after(point.id, [value], None)
    return [p.id for p in points[told:]]


@pytest.mark.parametrize("name", optimizers.names())
def test_each_optimizer_is_kept_as_it_declares_and_resumes(tmp_path, name):
    """Two identical runs, one continued in its process, one restarted from the database."""
    (url_a, sessions_a, engine_a), (url_b, sessions_b, engine_b) = (
        _database(tmp_path / "a.db"), _database(tmp_path / "b.db"))
    try:
        store = _open(url_a, sessions_a, name)
        assert store.optimizer.persistence in ("state", "storage")
        assert store.saved_with_rows == (store.optimizer.persistence == "state")
        assert (store.storage is None) == store.saved_with_rows
        orphan = _run(store, sessions_a, told=5, untold=1)
        with sessions_a() as s:
            saved = s.get(Study, "s1").optimizer_state
        assert (saved is not None) == store.saved_with_rows
        continued = [store.ask() for _ in range(3)]

        _run(_open(url_b, sessions_b, name), sessions_b, told=5, untold=1)
        resumed = _open(url_b, sessions_b, name)  # a restart: everything from the database
        # a point asked and never recorded is found again only where the storage is apart from our rows
        assert resumed.untold() == ([] if resumed.saved_with_rows else orphan)
        for point_id in resumed.untold():
            resumed.tell(point_id, None, "asked, never recorded (controller restart)")
        assert resumed.untold() == []
        again = [resumed.ask() for _ in range(3)]
        assert [p.id for p in again] == [p.id for p in continued]  # ids go on, none reused
        if resumed.saved_with_rows:  # the state is the whole optimizer: the very same proposals
            assert [p.params for p in again] == [pytest.approx(p.params) for p in continued]
    finally:
        engine_a.dispose()
        engine_b.dispose()


def test_a_told_point_is_not_told_twice(db):
    url, sessions = db
    store = _open(url, sessions, "random")
    (point_id,) = _run(store, sessions, told=0, untold=1)
    store.tell(point_id, [1.0], None)
    store.tell(point_id, [1.0], None)  # a replay after a restart: logged, not raised
    assert store.untold() == []


@pytest.mark.parametrize("name", optimizers.names())
def test_budget_warnings_are_declared_by_the_optimizer(name):
    cls = optimizers.get(name)
    note = cls.budget_warning(5, 4)
    if cls.trials_per_gene:
        assert note is not None and cls.budget_note in note and "d = 4 genes, 5 trials" in note
        assert cls.budget_warning(cls.trials_per_gene * 4, 4) is None
    else:
        assert note is None
    assert (note is not None) == ("cma" in name)  # what validation tested by name before
