"""Ray workers: trials built and scored on actors, a dead actor replaced and its trial
retried, a bad candidate failing only its own trial, and no barrier between trials."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from evaluators.base import EvaluationSpec, ObjectiveSpec
from search_spaces.recipe import Recipe
from workers.pool import WorkerPool
from workers.trial import TrialRunner, WorkerSpec


def noop_spec(base, experts, delay=0.0, jitter=0.0) -> WorkerSpec:
    return WorkerSpec(
        sources=[str(e) for e in experts], base_model=str(base),
        evaluation=EvaluationSpec(
            evaluator="noop", objectives=[ObjectiveSpec(task="fingerprint", metric="mean")],
            options={"delay_s": delay, "jitter": jitter},
        ),
    )


def ta_recipe(base, experts, w: float) -> dict:
    return Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": w}} for e in experts],
    }).model_dump(mode="json")


def test_trial_runner_without_ray(family):
    base, experts = family("llama")
    runner = TrialRunner(noop_spec(base, experts))
    ok = runner.run(1, ta_recipe(base, experts, 0.5))
    assert ok.state == "complete" and len(ok.values) == 1
    assert ok.timings.build_s > 0 and ok.peak_memory_bytes > 0 and ok.worker
    other = runner.run(2, ta_recipe(base, experts, 0.9))
    assert other.values != ok.values  # a different candidate was scored
    bad = ta_recipe(base, experts, 0.5)
    bad["merge_method"] = "ties"
    bad["models"][0]["parameters"]["density"] = 7.0
    failed = runner.run(3, bad)
    assert failed.state == "failed" and "density" in failed.error and "maximum" in failed.error
    assert runner.run(4, ta_recipe(base, experts, 0.5)).values == ok.values


def test_pool_runs_trials_and_survives_a_bad_candidate(family, ray_local):
    base, experts = family("llama")
    pool = WorkerPool(noop_spec(base, experts), n=2)
    try:
        pool.submit(1, ta_recipe(base, experts, 0.3))
        bad = ta_recipe(base, experts, 0.3)
        bad["models"][0]["model"] = "/nonexistent/model"
        pool.submit(2, bad)
        results = []
        while len(results) < 2:
            results += pool.wait()
        by_id = {r.trial_id: r for r in results}
        assert by_id[1].state == "complete"
        assert by_id[2].state == "failed" and "outside this study's sources" in by_id[2].error
        assert pool.idle() == 2
        pool.submit(3, ta_recipe(base, experts, 0.6))
        (again,) = pool.wait()
        assert again.state == "complete"
        mem = pool.memory()[0]
        # sources held in their own dtype, one candidate, no task vectors kept
        assert mem["sources_host"] > 0 and mem["candidate"] > 0 and mem["task_vectors"] == 0
    finally:
        pool.shutdown()


def test_killed_actor_is_replaced_and_its_trial_retried(family, ray_local):
    base, experts = family("llama")
    pool = WorkerPool(noop_spec(base, experts, delay=3.0), n=1)
    try:
        (pid,) = pool.pids()
        pool.submit(7, ta_recipe(base, experts, 0.4))
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        results = []
        while not results:
            results = pool.wait()
        (result,) = results
        assert result.trial_id == 7 and result.state == "complete" and result.attempts == 2
        assert pool.replaced == 1 and pool.pids()[0] != pid
        # the run continues on the new actor
        pool.submit(8, ta_recipe(base, experts, 0.5))
        assert pool.wait()[0].state == "complete"
    finally:
        pool.shutdown()


def test_trial_that_kills_its_worker_twice_is_failed_with_the_reason(family, ray_local):
    base, experts = family("llama")
    notices = []
    pool = WorkerPool(noop_spec(base, experts, delay=3.0), n=1, on_retry=notices.append)
    killed: list[int] = []

    def kill_each_new_actor_mid_trial() -> None:  # twice: the first run and its retry
        deadline = time.time() + 120
        while len(killed) < 2 and time.time() < deadline:
            try:
                pid = pool.pids()[0]
            except Exception:  # the actor was just killed: its replacement is starting
                continue
            if pid in killed:
                time.sleep(0.1)
                continue
            time.sleep(0.5)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    try:
        pool.submit(9, ta_recipe(base, experts, 0.4))
        killer = threading.Thread(target=kill_each_new_actor_mid_trial, daemon=True)
        killer.start()
        results = []
        while not results:
            results = pool.wait()
        killer.join(10)
        (result,) = results
        assert len(killed) == 2
        assert result.state == "failed" and result.attempts == 2
        assert "worker died" in result.error and "dispatched 2 time(s), the most allowed" in result.error
        assert [(n.trial_id, n.attempt, n.why) for n in notices] == [(9, 2, "worker died")]
    finally:
        pool.shutdown()


def _keep_busy(pool: WorkerPool, recipes: list[dict]) -> list:
    """Submit the next recipe whenever a worker is idle, until every one has a result (the
    controller's scheduler does the same with points an optimizer proposes)."""
    results: list = []
    queue = list(enumerate(recipes, start=1))
    while len(results) < len(recipes):
        while queue and pool.idle():
            pool.submit(*queue.pop(0))
        results += pool.wait()
    return results


def test_no_worker_idles_while_points_are_available(family, ray_local):
    """Uneven evaluation costs (0.2–0.8 s) on 2 workers: every worker is busy for all but
    the dispatch latency of the span it is in use."""
    base, experts = family("llama")
    pool = WorkerPool(noop_spec(base, experts, delay=0.2, jitter=3.0), n=2)
    try:
        pool.submit(0, ta_recipe(base, experts, 0.5))  # warm both actors up
        pool.submit(-1, ta_recipe(base, experts, 0.5))
        while pool.running:
            pool.wait()
        rng = random.Random(0)
        results = _keep_busy(pool, [ta_recipe(base, experts, rng.random()) for _ in range(16)])
        assert sorted(r.trial_id for r in results) == list(range(1, 17))
        idle = []
        for worker in {r.worker for r in results}:
            mine = sorted(
                (r.timings.started_at, r.timings.finished_at) for r in results if r.worker == worker
            )
            span = mine[-1][1] - mine[0][0]
            busy = sum(end - start for start, end in mine)
            idle.append(1 - busy / span)
        print("idle fractions", [f"{x:.3f}" for x in idle])
        assert len(idle) == 2
        assert max(idle) < 0.10, idle
    finally:
        pool.shutdown()


@pytest.mark.parametrize("n", [1])
def test_worker_spec_round_trips(n, family):
    base, experts = family("llama")
    spec = noop_spec(base, experts)
    assert WorkerSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_zoo_trial_scored_by_lm_eval_on_a_ray_worker(ray_local):
    """The real path: a Ray actor builds a zoo merge in memory and lm-eval scores it;
    the score equals the same recipe merged to disk and scored on the reloaded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evaluators import registry
    from workers.merge import merge
    from workers.zoo.build import build_zoo

    zoo = build_zoo(log=None)
    base, experts = zoo.models["base"], [zoo.models["math"], zoo.models["language"]]
    evaluation = EvaluationSpec(
        evaluator="lm_eval",
        objectives=[ObjectiveSpec(task="zoo_xl_add", metric="exact_match", limit=60)],
        options={"task_dirs": ["evomerge:zoo"]},
    )
    spec = WorkerSpec(sources=[str(e) for e in experts], base_model=str(base), evaluation=evaluation)
    recipe = Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(experts[0]), "parameters": {"weight": 1.0}},
                   {"model": str(experts[1]), "parameters": {"weight": 1.5}}],
    })
    pool = WorkerPool(spec, n=1)
    try:
        pool.submit(1, recipe)
        (result,) = pool.wait()
    finally:
        pool.shutdown()
    assert result.state == "complete", result.error
    assert result.timings.forward_s > 0 and result.scores
    score = result.scores["zoo_xl_add/exact_match"]
    assert score > 0.05  # this merge already does some of the target
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        merge(recipe, f"{tmp}/m")
        model = AutoModelForCausalLM.from_pretrained(f"{tmp}/m").eval()
        evaluator = registry.create(registry.validate_spec(evaluation))
        again = evaluator.evaluate(model, AutoTokenizer.from_pretrained(f"{tmp}/m"))
    assert again.scores["zoo_xl_add/exact_match"] == score
