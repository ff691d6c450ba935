"""The optimizer contract: every registered optimizer (``search_spaces.optimizers``) goes through
the same checks. A new optimizer is checked here with no edit to this file.

- ask / tell over a small gene set for a few rounds, results in any order, failures included;
- every point has the genes' names and lies within their bounds;
- the same spec and seed give the same points;
- an unknown option, a bad option value or a bad spec field is refused naming it;
- persistence as the optimizer declares: a ``"state"`` optimizer built from its ``state()``
  proposes what the original would have; a ``"storage"`` one continues from its storage.
  (The controller's store over the database: tests/test_optimizer_store.py.)
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest
from pydantic import ValidationError

from search_spaces import optimizers
from search_spaces.optimizers import OptimizerError, create_optimizer
from search_spaces.optimizers.base import Failure, Optimizer, Point
from tests.test_optimizer_store import GENES

NAMES = optimizers.names()
ROUNDS, BATCH = 3, 4


def spec(name: str, **changes: Any) -> dict[str, Any]:
    return {"name": name, "seed": 7, "population_size": BATCH, **changes}


def score(point: Point) -> float:
    return -sum((v - 0.3) ** 2 for v in point.params.values())


def run(opt: Optimizer, rounds: int = ROUNDS) -> list[Point]:
    """``rounds`` batches of asks, each told in reverse order; the first point of a batch fails."""
    asked: list[Point] = []
    for _ in range(rounds):
        batch = opt.ask(BATCH)
        for i, point in enumerate(reversed(batch)):
            opt.tell(point.id, Failure("test") if i == len(batch) - 1 else score(point))
        asked += batch
    return asked


def within_bounds(point: Point) -> bool:
    return list(point.params) == GENES.names and all(
        GENES[n].coord_low <= v <= GENES[n].coord_high for n, v in point.params.items())


# ---- the checks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_ask_tell_rounds_stay_within_bounds(name):
    opt = create_optimizer(spec(name), GENES)
    assert isinstance(opt, Optimizer) and name in type(opt).names
    points = run(opt)
    assert len(points) == ROUNDS * BATCH and len({p.id for p in points}) == len(points)
    assert all(within_bounds(p) for p in points), [p.params for p in points if not within_bounds(p)]
    assert all(within_bounds(p) for p in opt.ask(2))
    assert isinstance(opt.progress(), dict)


@pytest.mark.parametrize("name", NAMES)
def test_a_point_is_told_once(name):
    opt = create_optimizer(spec(name), GENES)
    (point,) = opt.ask()
    opt.tell(point.id, score(point))
    with pytest.raises(OptimizerError):
        opt.tell(point.id, score(point))
    with pytest.raises(OptimizerError):
        opt.tell(point.id + 1000, 0.0)


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_points(name):
    first, second = (run(create_optimizer(spec(name), GENES)) for _ in range(2))
    assert [p.id for p in first] == [p.id for p in second]
    assert [p.params for p in first] == [pytest.approx(p.params, rel=1e-12) for p in second]


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_option_is_refused_naming_it(name):
    with pytest.raises(OptimizerError, match="no_such_option"):
        create_optimizer(spec(name, options={"no_such_option": 1}), GENES)


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_option_value_is_refused_naming_the_option(name):
    for key in sorted(optimizers.get(name).known_options):
        with pytest.raises(OptimizerError, match=f"options\\.{key}"):
            create_optimizer(spec(name, options={key: [[1.5]]}), GENES)


@pytest.mark.parametrize("name", NAMES)
def test_a_bad_spec_field_is_refused_naming_it(name):
    for field, value in [("population_size", 1), ("seed", -1), ("no_such_field", 1)]:
        with pytest.raises(ValidationError) as refused:
            create_optimizer(spec(name, **{field: value}), GENES)
        assert any(field in map(str, e["loc"]) for e in refused.value.errors()), refused.value


@pytest.mark.parametrize("name", NAMES)
def test_persistence_round_trip_as_declared(name):
    cls = optimizers.get(name)
    assert cls.persistence in ("state", "storage")
    if cls.persistence == "state":
        opt = create_optimizer(spec(name), GENES)
        run(opt)
        saved = opt.state()
        assert isinstance(saved, bytes)
        resumed = create_optimizer(spec(name), GENES, state=saved)
        continued, again = opt.ask(3), resumed.ask(3)
        assert [p.id for p in again] == [p.id for p in continued]
        assert [p.params for p in again] == [pytest.approx(p.params, rel=1e-12) for p in continued]
        with pytest.raises(OptimizerError):  # the state is not an Optuna storage's business
            create_optimizer(spec(name), GENES, storage=optuna.storages.InMemoryStorage(), study_name="s")
        return
    storage = optuna.storages.InMemoryStorage()
    opt = create_optimizer(spec(name), GENES, storage=storage, study_name="contract")
    assert opt.state() is None
    asked = run(opt)
    (pending,) = opt.ask()
    resumed = create_optimizer(spec(name), GENES, storage=storage, study_name="contract")
    assert resumed.untold() == [pending.id]  # asked and never told: found again
    resumed.tell(pending.id, score(pending))
    assert resumed.untold() == []
    later = resumed.ask(2)
    assert [p.id for p in later] == [len(asked) + 1, len(asked) + 2]  # ids go on, none reused
    assert all(within_bounds(p) for p in later)
    with pytest.raises(OptimizerError):
        create_optimizer(spec(name), GENES, state=b"not a storage")
