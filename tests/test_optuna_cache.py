"""``SoleWriterStorage`` (the controller's Optuna storage): the same points and the same
rows in the database as Optuna's own storage, held writes committed by ``flush``, and a
study reopened sees what another process wrote."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from sqlalchemy import text

from search_spaces.genes import Gene, GeneSet
from search_spaces.optimizers import Failure, OptimizerSpec, create_optimizer, get
from service.db import make_engine, optuna_storage, upgrade
from service.db.optuna_cache import SoleWriterStorage
from service.db.testing import temporary_database

GENES = GeneSet(Gene(name=f"x{i}", low=-1.0, high=1.0, label=f"x{i}") for i in range(4))
CENTRE = np.linspace(-0.5, 0.5, 4)

# every column but timestamps and surrogate ids
DUMP = {
    "trials": "SELECT number, state FROM trials ORDER BY number",
    "params": "SELECT t.number, p.param_name, p.param_value, p.distribution_json FROM trial_params p "
              "JOIN trials t USING (trial_id) ORDER BY t.number, p.param_name",
    "values": "SELECT t.number, v.objective, v.value, v.value_type FROM trial_values v "
              "JOIN trials t USING (trial_id) ORDER BY t.number, v.objective",
    "system_attrs": "SELECT t.number, a.key, a.value_json FROM trial_system_attributes a "
                    "JOIN trials t USING (trial_id) ORDER BY t.number, a.key",
    "user_attrs": "SELECT t.number, a.key, a.value_json FROM trial_user_attributes a "
                  "JOIN trials t USING (trial_id) ORDER BY t.number, a.key",
    "study_system_attrs": "SELECT key, value_json FROM study_system_attributes ORDER BY key",
}


CMA_STATE = ("_g", "_mean", "_sigma", "_C", "_p_sigma", "_pc")


def dump(url: str) -> dict[str, list[tuple]]:
    engine = make_engine(url)
    with engine.connect() as conn:
        out = {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in DUMP.items()}
    engine.dispose()
    # Optuna's CMA-ES stores its pickled optimizer, which holds an np.empty() array (the
    # cmaes package's _funhist_values): compare what the optimizer is, not those bytes
    pickled: dict[int, dict[int, str]] = {}
    attrs = []
    for number, key, value in out["system_attrs"]:
        if key.startswith("cma:optimizer:"):
            pickled.setdefault(number, {})[int(key.rsplit(":", 1)[1])] = json.loads(value)
        else:
            attrs.append((number, key, value))
    for number, parts in sorted(pickled.items()):
        cma = pickle.loads(bytes.fromhex("".join(parts[i] for i in range(len(parts)))))
        state = {k: np.asarray(getattr(cma, k)).tolist() for k in CMA_STATE}
        attrs.append((number, "cma:optimizer", json.dumps(state)))
    out["system_attrs"] = sorted(attrs)
    return out


def drive(storage, name: str, n: int = 40, x0: bool = False) -> list[tuple[int, list[float]]]:
    """Asynchronous use as the controller does it: 3 points in flight, out-of-order results,
    a failure now and then; ``flush`` after each ask where the storage holds writes.
    ``x0``: the first point is enqueued (Optuna's waiting-trial path)."""
    spec = OptimizerSpec.model_validate({"name": name, "seed": 3, "directions": ["minimize"],
                                         **({"population_size": 4} if "cma" in name else {})})
    start = {g: 0.25 for g in GENES.names} if x0 else None
    opt = get(name).create(spec, GENES, start, storage=storage, study_name="s")
    flush = getattr(storage, "flush", lambda: None)
    rng = np.random.default_rng(0)
    asked, in_flight = [], []
    for _ in range(n):
        while len(in_flight) < 3:
            (p,) = opt.ask(1)
            flush()
            asked.append((p.id, [p.params[g] for g in GENES.names]))
            in_flight.append(p)
        p = in_flight.pop(int(rng.integers(len(in_flight))))
        if rng.random() < 0.1:
            opt.tell(p.id, Failure("simulated"))
        else:
            opt.tell(p.id, float(np.sum((GENES.to_array(p.params) - CENTRE) ** 2)))
    return asked


@pytest.fixture(params=["sqlite", "postgresql"])
def two_databases(request, tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "cached").mkdir()
    with temporary_database(request.param, tmp_path / "plain") as plain, \
            temporary_database(request.param, tmp_path / "cached") as cached:
        for url in (plain, cached):
            upgrade(url)
        yield plain, cached


@pytest.mark.parametrize(("name", "x0"), [("optuna-cmaes", False), ("optuna-cmaes", True), ("random", False),
                                         ("optuna-tpe", False)])
def test_same_points_and_rows_as_optunas_own_storage(two_databases, name, x0):
    plain, cached = two_databases
    expected = drive(optuna_storage(plain), name, x0=x0)
    got = drive(SoleWriterStorage(optuna_storage(cached)), name, x0=x0)
    if x0:
        assert got[0][1] == [0.25] * 4
    assert got == expected
    assert dump(cached) == dump(plain)
    # and a study continued on either storage goes on the same way
    again = drive(SoleWriterStorage(optuna_storage(cached)), name, 12)
    assert again == drive(optuna_storage(plain), name, 12)
    assert dump(cached) == dump(plain)


def test_held_writes_reach_the_database_at_flush(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    storage = SoleWriterStorage(optuna_storage(url))
    opt = create_optimizer({"name": "optuna-cmaes", "seed": 0, "population_size": 4}, GENES,
                           storage=storage, study_name="s")
    (p,) = opt.ask(1)
    # before the flush: Optuna's trial exists (RUNNING), its point not yet — a crash here is
    # "asked, never recorded", which a restart tells as a failure
    assert dump(url)["trials"] == [(0, "RUNNING")] and dump(url)["params"] == []
    trial_id = storage.get_trial_id_from_study_id_trial_number(opt.study._study_id, 0)
    assert storage.get_trial(trial_id).params == p.params
    storage.flush()
    assert sorted((r[1], r[2]) for r in dump(url)["params"]) == sorted(p.params.items())
    opt.tell(p.id, 1.0)
    assert dump(url)["values"] == [(0, 0, 1.0, "FINITE")]


def test_a_reopened_study_sees_what_another_process_wrote(tmp_path):
    url = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(url)
    spec = {"name": "random", "seed": 0}
    first = SoleWriterStorage(optuna_storage(url))
    opt = create_optimizer(spec, GENES, storage=first, study_name="s")
    opt.ask(2)
    first.flush()
    other = create_optimizer(spec, GENES, storage=url, study_name="s")  # another process
    (orphan,) = other.ask(1)
    other.tell(orphan.id, 0.5)

    reopened = create_optimizer(spec, GENES, storage=SoleWriterStorage(optuna_storage(url)), study_name="s")
    assert [(t.number, t.state.name) for t in reopened.study.get_trials()] == [
        (0, "RUNNING"), (1, "RUNNING"), (2, "COMPLETE")]
    # the first one notices the foreign trial when it creates the next one, and reads again
    (p,) = opt.ask(1)
    assert p.id == 3
    assert [t.number for t in opt.study.get_trials()] == [0, 1, 2, 3]
