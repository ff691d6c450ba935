"""The score cache across studies (service/score_cache.py, service/weight_digests.py).

The key is stable and names content, not places; it changes with the weights, the task files, the
evaluator spec and the recipe. Entries are stored once (race-safe on SQLite and PostgreSQL). A second
identical study is served from the cache: the same values, and no trial or baseline reaches a worker.
Tiny Llama family, the ``noop`` evaluator, trials run in this process.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators.validation import packaged_task_dir
from service.db import (
    Baseline,
    Event,
    ScoreCacheEntry,
    StudyStatus,
    Trial,
    TrialState,
    WeightDigest,
    make_engine,
    session_factory,
    upgrade,
)
from service.db.testing import temporary_database
from service.score_cache import build_context, evaluation_parts, full_fidelity, lookup, store
from service.settings import get_settings
from service.validation import ValidatedStudy, validate_study
from service.weight_digests import file_sha256
from tests.test_controller import add_study, db, study_row
from tests.test_plugins_end_to_end import InProcessController

__all__ = ["db"]  # a fixture
from workers.trial import RungScore, TrialCost, TrialResult

NOOP = {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean", "limit": 8}]}


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


@pytest.fixture
def sessions(db):
    return db[1]


@pytest.fixture
def settings(tmp_path, model_root):
    return get_settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'evomerge.db'}",
                        model_roots=[model_root, tmp_path], max_workers=2, lease_seconds=60)


def copy_family(llama, into: Path) -> Path:
    """The base and experts copied into ``into`` (a folder of the same models at another place)."""
    base, _ = llama
    shutil.copytree(base.parent, into)
    return into.resolve()


def study_spec(folder: Path, *, evaluation: dict | None = None, **changes: Any) -> dict[str, Any]:
    data = {
        "name": "score cache test",
        "sources": [str(folder / "llama-expert0"), str(folder / "llama-expert1")],
        "base_model": str(folder / "llama-base"),
        "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
        "evaluation": evaluation or NOOP,
        "optimizer": {"name": "random"},
        "budget": {"max_trials": 4},
        "parallelism": 2,
        "seed": 0,
    }
    data.update(changes)
    return data


def recipe(folder: Path, weight: float = 0.5) -> dict[str, Any]:
    return {"merge_method": "task_arithmetic", "base_model": str(folder / "llama-base"),
            "models": [{"model": str(folder / f"llama-expert{i}"), "parameters": {"weight": weight}}
                       for i in range(2)]}


def key(sessions, settings, validated: ValidatedStudy, rec: dict[str, Any]) -> str:
    keyed = build_context(sessions, settings, validated, {}).key(rec)
    assert keyed is not None
    return keyed[0]


def with_evaluation(validated: ValidatedStudy, **changes: Any) -> ValidatedStudy:
    return validated.model_copy(update={"evaluation": validated.evaluation.model_copy(update=changes)})


def with_objective(validated: ValidatedStudy, **changes: Any) -> ValidatedStudy:
    objectives = [o.model_copy(update=changes) for o in validated.evaluation.objectives]
    return with_evaluation(validated, objectives=objectives)


def rewrite(path: Path, offset_from_end: int = 1) -> None:
    """Flip one byte of a file in place, and make sure its mtime moves (a coarse clock would not)."""
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))
    if path.stat().st_mtime_ns == before.st_mtime_ns:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))


# ---- the key -----------------------------------------------------------------------------------------
def test_the_key_is_stable_and_changes_with_the_recipe_and_evaluation(llama, sessions, settings, tmp_path):
    folder = copy_family(llama, tmp_path / "family")
    v = validate_study(study_spec(folder), settings)
    first = key(sessions, settings, v, recipe(folder))
    assert key(sessions, settings, v, recipe(folder)) == first  # the digests now come from the table
    assert key(sessions, settings, validate_study(study_spec(folder), settings), recipe(folder)) == first
    variants = {
        "recipe": (v, recipe(folder, 0.6)),
        "option": (with_evaluation(v, options={"delay_s": 0.5}), recipe(folder)),
        "seed": (with_evaluation(v, seed=7), recipe(folder)),
        "limit": (with_objective(v, limit=9), recipe(folder)),
        "few-shot": (with_objective(v, num_fewshot=2), recipe(folder)),
        "split": (with_objective(v, split="validation"), recipe(folder)),
        "task": (with_objective(v, task="another"), recipe(folder)),
        "weight": (with_objective(v, weight=2.0), recipe(folder)),
        "dtype": (v.model_copy(update={"worker_spec": {**v.worker_spec, "dtype": "bfloat16"}}),
                  recipe(folder)),
    }
    keys = {name: key(sessions, settings, val, rec) for name, (val, rec) in variants.items()}
    assert first not in keys.values()
    assert len(set(keys.values())) == len(keys), keys
    # what only changes how fast it is scored does not change the key
    assert key(sessions, settings, with_evaluation(v, batch_size=3), recipe(folder)) == first


def test_the_same_models_at_two_places_have_the_same_key(llama, sessions, settings, tmp_path):
    a, b = copy_family(llama, tmp_path / "a"), copy_family(llama, tmp_path / "b")
    key_a = key(sessions, settings, validate_study(study_spec(a), settings), recipe(a))
    key_b = key(sessions, settings, validate_study(study_spec(b), settings), recipe(b))
    assert key_a == key_b
    # the parts name digests, never a path
    parts = build_context(sessions, settings, validate_study(study_spec(a), settings), {}).key(recipe(a))[1]
    assert str(a) not in str(parts) and all(m.startswith("sha256:") for m in parts["models"])


def test_the_key_changes_when_a_weight_file_changes(llama, sessions, settings, tmp_path):
    folder = copy_family(llama, tmp_path / "family")
    v = validate_study(study_spec(folder), settings)
    before = key(sessions, settings, v, recipe(folder))
    weights = sorted((folder / "llama-expert1").glob("*.safetensors"))[0]
    rewrite(weights)  # one byte of a tensor
    changed = key(sessions, settings, v, recipe(folder))
    assert changed != before
    with sessions() as s:  # the file's old digest was replaced, not kept beside the new one
        assert s.scalar(select(func.count()).select_from(WeightDigest)
                        .where(WeightDigest.path == str(weights.resolve()))) == 1
    rewrite(weights)  # back to the same bytes: the same key again
    assert key(sessions, settings, v, recipe(folder)) == before
    # a different tensor in a new file of the model (e.g. a second shard)
    shutil.copy(weights, weights.with_name("extra.safetensors"))
    assert key(sessions, settings, v, recipe(folder)) not in (before, changed)


def test_a_file_is_hashed_once_until_it_changes(sessions, tmp_path, monkeypatch):
    import service.weight_digests as wd

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x" * 1000)
    calls = []
    real_hash = wd.hash_file
    monkeypatch.setattr(wd, "hash_file", lambda p: calls.append(p) or real_hash(p))
    first = file_sha256(sessions, f)
    assert file_sha256(sessions, f) == first and len(calls) == 1
    rewrite(f)
    assert file_sha256(sessions, f) != first and len(calls) == 2


def test_the_examples_are_keyed_by_the_task_files(sessions, tmp_path):
    zoo = packaged_task_dir("evomerge:zoo")
    copy = tmp_path / "tasks"
    shutil.copytree(zoo, copy, ignore=shutil.ignore_patterns("__pycache__"))

    def parts(task_dirs: list[str], task: str = "zoo_xl_add") -> dict[str, str]:
        from evaluators.base import EvaluationSpec

        ev = EvaluationSpec(evaluator="lm_eval", objectives=[{"task": task, "metric": "acc", "limit": 16}],
                            options={"task_dirs": task_dirs})
        return evaluation_parts(sessions, type("V", (), {"evaluation": ev})())

    packaged = parts(["evomerge:zoo"])
    assert parts([str(copy)]) == packaged  # the packaged folder and a copy of it: the same content
    (copy / "__pycache__").mkdir()
    (copy / "__pycache__" / "zoo_data.cpython-311.pyc").write_bytes(b"compiled")  # lm-eval's import
    assert parts([str(copy)]) == packaged
    assert parts([str(copy)], task="zoo_en_add")["evaluation"] != packaged["evaluation"]  # another task
    rewrite(copy / "xl_add.jsonl", offset_from_end=3)  # a changed data file
    changed = parts([str(copy)])
    assert changed["examples"] != packaged["examples"] and changed["evaluation"] == packaged["evaluation"]
    (copy / "xl_add.jsonl").unlink()
    (copy / "zoo_xl_add.yaml").write_text((zoo / "zoo_xl_add.yaml").read_text() + "\n# edited\n")
    assert parts([str(copy)])["examples"] not in (packaged["examples"], changed["examples"])


def test_the_cache_is_off_when_the_setting_says_so(llama, sessions, settings, tmp_path):
    folder = copy_family(llama, tmp_path / "family")
    v = validate_study(study_spec(folder), settings)
    off = build_context(sessions, settings.model_copy(update={"score_cache": False}), v, {})
    assert off.reason is not None and off.key(recipe(folder)) is None
    assert get_settings(score_cache="false").score_cache is False


# ---- the table: SQLite and PostgreSQL ------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def any_db(request, tmp_path):
    with temporary_database(request.param, tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        yield session_factory(engine)
        engine.dispose()


def result(state: str = "complete", **kw: Any) -> TrialResult:
    data: dict[str, Any] = {"values": [0.25], "scores": {"t/m": 0.25}, "metrics": {"t": {"m": 0.25}},
                            "cost": TrialCost(examples=16, tokens=400, worker_seconds=1.5)}
    return TrialResult(trial_id=1, state=state, **{**data, **kw})


def test_lookup_and_store(any_db):
    sessions = any_db
    with sessions.begin() as s:
        assert lookup(s, "a" * 64) is None
        store(s, "a" * 64, {"recipe": "r"}, result())
    for hits in (1, 2):
        with sessions.begin() as s:
            entry = lookup(s, "a" * 64)
            assert entry is not None and entry.hits == hits and entry.last_used_at is not None
            assert (entry.values, entry.scores, entry.metrics) == ([0.25], {"t/m": 0.25}, {"t": {"m": 0.25}})
            assert (entry.examples, entry.tokens, entry.worker_seconds) == (16, 400, 1.5)
    with pytest.raises(ValueError, match="only complete"):
        with sessions.begin() as s:
            store(s, "b" * 64, {}, result("failed"))


def test_two_stores_of_the_same_key_do_not_raise(any_db):
    """Sequentially, and while another transaction holds an uncommitted insert of the same key."""
    sessions = any_db
    with sessions.begin() as s:
        store(s, "c" * 64, {}, result())
    with sessions.begin() as s:
        store(s, "c" * 64, {}, result(values=[0.9]))  # the first one stays
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with sessions.begin() as s:
                store(s, "d" * 64, {}, result(values=[0.5]))
        except BaseException as err:  # reported below
            errors.append(err)

    with sessions.begin() as s:
        store(s, "d" * 64, {}, result())
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)  # the second insert waits for this transaction
    thread.join(30)
    assert not thread.is_alive() and not errors
    with sessions() as s:
        rows = s.scalars(select(ScoreCacheEntry).where(ScoreCacheEntry.key.in_(["c" * 64, "d" * 64]))).all()
        assert sorted((r.key[0], r.values) for r in rows) == [("c", [0.25]), ("d", [0.25])]


def test_only_full_fidelity_results_are_stored():
    spec = type("Spec", (), {"fidelity": None, "evaluation": None})()
    assert full_fidelity(result(), spec)
    assert not full_fidelity(result("failed"), spec)
    rungs = [RungScore(rung=0, examples=4, values=[0.1], scores={}),
             RungScore(rung=1, examples=16, values=[0.2], scores={})]
    assert not full_fidelity(result("pruned", rungs=rungs[:1]), spec)
    assert full_fidelity(result(rungs=rungs), spec)  # raced to the last rung: the limit
    from evaluators.base import EvaluationSpec

    def raced_to(top: int) -> Any:
        evaluation = EvaluationSpec(evaluator="noop", objectives=NOOP["objectives"])  # limit 8
        fidelity = type("F", (), {"max_examples": top})()
        return type("Spec", (), {"fidelity": fidelity, "evaluation": evaluation})()

    assert not full_fidelity(result(rungs=rungs), raced_to(4))  # its last rung stopped short of the limit
    assert full_fidelity(result(rungs=rungs), raced_to(8))


# ---- through the controller ----------------------------------------------------------------------------
class CountingController(InProcessController):
    """The controller with in-process pools that count what reaches a worker."""

    submitted: list[int]

    def _pool(self, rt):
        pool = self.pools.get(rt.pool_key)
        if pool is None:
            pool = super()._pool(rt)
            counted = self.submitted
            original = pool.submit

            def submit(trial_id: int, recipe: Any, **kw: Any) -> None:
                counted.append(trial_id)
                if kw.get("race") is None:  # not a racing study: the plain call
                    kw.pop("race", None)
                original(trial_id, recipe, **kw)

            pool.submit = submit  # type: ignore[method-assign]
        return pool


def run(sessions, settings, data: dict[str, Any]) -> tuple[str, list[int]]:
    """Run one study to completion; (its id, the ids submitted to workers)."""
    sid = add_study(sessions, data)
    controller = CountingController(settings, sessions)
    controller.submitted = []
    try:
        deadline = time.monotonic() + 120
        while study_row(sessions, sid).status != StudyStatus.COMPLETED:
            assert time.monotonic() < deadline, "the study did not complete"
            if not controller.step():
                time.sleep(0.02)
    finally:
        controller.stop()
    return sid, controller.submitted


def rows(sessions, model, sid: str) -> list[Any]:
    with sessions() as s:
        order = model.number if model is Trial else model.id
        return list(s.scalars(select(model).where(model.study_id == sid).order_by(order)))


def test_a_second_identical_study_is_scored_by_the_cache(llama, sessions, settings):
    base, _ = llama
    data = study_spec(base.parent.resolve())
    first, sent_first = run(sessions, settings, data)
    second, sent_second = run(sessions, settings, data)

    trials_1, trials_2 = rows(sessions, Trial, first), rows(sessions, Trial, second)
    baselines_1, baselines_2 = rows(sessions, Baseline, first), rows(sessions, Baseline, second)
    assert len(trials_1) == len(trials_2) == 4 and len(baselines_1) == len(baselines_2) >= 3
    scored_1 = [r for r in trials_1 + baselines_1 if not r.cached]  # a repeat within the study is a hit too
    assert len(sent_first) == len(scored_1) >= len(trials_1)  # each candidate reached a worker once
    assert sent_second == []  # none did
    for a, b in zip(trials_1, trials_2, strict=True):
        assert b.state == TrialState.COMPLETE and b.cached
        assert (b.values, b.scores, b.fitness) == (a.values, a.scores, a.fitness)
        assert (b.examples, b.tokens, b.worker_seconds) == (a.examples, a.tokens, a.worker_seconds)
        assert b.worker is None and b.timings is None  # no worker touched it
    for a, b in zip(baselines_1, baselines_2, strict=True):
        assert b.name == a.name and b.state == TrialState.COMPLETE and b.cached and b.values == a.values
    study_1, study_2 = study_row(sessions, first), study_row(sessions, second)
    assert (study_2.best_value, study_2.best_trial_number) == (study_1.best_value, study_1.best_trial_number)
    assert study_2.trials_done == 4
    with sessions() as s:
        events = s.scalars(select(Event).where(Event.study_id == second,
                                               Event.kind.in_(["trial_complete", "baseline_scored"]))).all()
        assert len(events) == len(trials_2) + len(baselines_2) and all(e.data["cached"] for e in events)
        entries = s.scalars(select(ScoreCacheEntry)).all()
        assert len(entries) == len(scored_1)
        hits_1 = len(trials_1) + len(baselines_1) - len(scored_1)
        assert sum(e.hits for e in entries) == hits_1 + len(trials_2) + len(baselines_2)

    # with the cache turned off, every candidate is scored again
    third, sent_third = run(sessions, settings.model_copy(update={"score_cache": False}), data)
    assert len(sent_third) == len(trials_1) + len(baselines_1)
    assert not any(t.cached for t in rows(sessions, Trial, third) + rows(sessions, Baseline, third))
