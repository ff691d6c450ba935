"""Cost accounting (issue 17, part 3): tokens counted in forward passes, each trial's and
baseline's cost on its row, the study's cost recounted from the rows (spent, saved by the score
cache, saved by pruning), budgets in examples and worker-seconds, the API and the model card."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluators import EvaluationSpec, ObjectiveSpec, registry
from service.cost import StudyCost, cost_budget_spent, full_examples, recount
from service.db import Baseline, Study, Trial, TrialState, make_engine, session_factory, upgrade
from service.db.testing import temporary_database
from service.spec import StudySpec, StudyValidationError
from tests.api_fixtures import make_settings
from tests.test_controller import (
    add_study,
    db,
    run_to_completion,
    settings,
    spec,
    study_row,
    trials,
)

__all__ = ["db", "settings"]  # fixtures

TEXTS = ["12p35q47", "3p4q7", "99p1q100", "50p50q100", "7p0q7", "21p21q42"]


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


@pytest.fixture(scope="module")
def lm_eval_setup(tmp_path_factory):
    from tests.test_eval_lm_eval import setup

    return setup.__wrapped__(tmp_path_factory)




def loglik_evaluation(limit: int = 4) -> dict:
    return {"evaluator": "loglik", "batch_size": 3,
            "objectives": [{"task": "sums", "metric": "loglik_per_token", "limit": limit}],
            "options": {"texts": {"sums": TEXTS}}}


# ---- tokens ------------------------------------------------------------------------------------
def test_a_forward_counts_its_non_padding_tokens_and_each_cached_step_its_new_ones(llama):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from evaluators.runtime.timing import ForwardTimer, forward_tokens

    model = AutoModelForCausalLM.from_pretrained(llama[0]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with ForwardTimer(model) as timer, torch.inference_mode():
        model(input_ids=ids, attention_mask=mask)
    assert (timer.tokens, timer.calls) == (8, 1)  # the padding is not counted
    with ForwardTimer(model) as timer, torch.inference_mode():
        model(ids)  # no mask (lm-eval's log-likelihood calls): every position
    assert timer.tokens == 10
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # as evaluators.runtime.fast_lm
    with ForwardTimer(model) as timer, torch.inference_mode():  # greedy decoding with a KV cache
        extra = {cache_arg: DynamicCache(config=model.config), "use_cache": True}
        out = model(input_ids=ids, attention_mask=mask, **extra)
        for _ in range(3):
            mask = torch.cat([mask, mask.new_ones((2, 1))], dim=-1)
            out = model(input_ids=out.logits[:, -1:].argmax(-1), attention_mask=mask, **extra)
    assert (timer.tokens, timer.calls) == (8 + 3 * 2, 4)
    assert timer.tokens == 14  # read twice: the same
    assert forward_tokens((), {}) == 0


def test_the_loglik_evaluator_reports_the_tokens_it_scored(llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama[0])
    tokenizer = AutoTokenizer.from_pretrained(llama[0])
    spec = registry.validate_spec(EvaluationSpec.model_validate(loglik_evaluation(limit=len(TEXTS))))
    result = registry.create(spec).evaluate(model, tokenizer)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in TEXTS]
    assert result.tokens == sum(n for n in lengths if n >= 2)
    assert result.n_examples == {"sums": sum(1 for n in lengths if n >= 2)}


def test_lm_eval_counts_the_same_tokens_through_model_generate_and_the_fast_decoder(lm_eval_setup):
    """Generation with a KV cache counts each step's new tokens: the fast greedy decoder feeds the
    model exactly what model.generate does, so both count alike."""
    from tests.test_eval_lm_eval import _spec

    setup = lm_eval_setup
    fast = registry.create(_spec(setup["tasks"])).evaluate(setup["model"], setup["tokenizer"])
    plain = registry.create(_spec(setup["tasks"]).model_copy(
        update={"options": {"task_dirs": [str(setup["tasks"])], "fast_generate": False}}))
    slow = plain.evaluate(setup["model"], setup["tokenizer"])
    assert slow.metrics == fast.metrics
    assert fast.tokens == slow.tokens > sum(fast.n_examples.values())


# ---- the study's cost, from rows made by hand ----------------------------------------------------
def test_full_examples_per_candidate_from_the_spec():
    def evaluation(*objectives: dict) -> EvaluationSpec:
        return EvaluationSpec(evaluator="noop", objectives=[ObjectiveSpec(**o) for o in objectives])

    assert full_examples(evaluation({"task": "a", "metric": "m", "limit": 40},
                                    {"task": "b", "metric": "m", "limit": 60},
                                    {"task": "b", "metric": "n", "limit": 60})) == 100  # b once
    assert full_examples(evaluation({"task": "a", "metric": "m", "limit": 0.5})) is None
    assert full_examples(evaluation({"task": "a", "metric": "m"})) is None


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_spent_and_saved_by_the_cache_and_by_pruning_are_recounted_from_the_rows(backend, tmp_path):
    def trial(n: int, state: TrialState, examples: int | None, tokens: int | None, seconds: float | None,
              cached: bool = False) -> Trial:
        return Trial(study_id="c0ffee000001", number=n, state=state, examples=examples, tokens=tokens,
                     worker_seconds=seconds, cached=cached)

    with temporary_database(backend, tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        sessions = session_factory(engine)
        with sessions.begin() as s:
            s.add(Study(id="c0ffee000001", name="by hand", spec={"name": "by hand"}))
            s.flush()
            s.add_all([
                trial(0, TrialState.COMPLETE, 10, 100, 2.0), trial(1, TrialState.COMPLETE, 10, 100, 2.0),
                trial(2, TrialState.PRUNED, 2, 20, 0.5), trial(3, TrialState.PRUNED, 5, 50, 1.0),
                trial(4, TrialState.COMPLETE, 10, 100, 2.0, cached=True),
                trial(5, TrialState.FAILED, 0, 0, 0.3),
                trial(6, TrialState.RUNNING, None, None, None),
                trial(7, TrialState.CANCELLED, None, None, None),
                Baseline(study_id="c0ffee000001", name="a", kind="source", state=TrialState.COMPLETE,
                         examples=10, tokens=100, worker_seconds=1.5),
                Baseline(study_id="c0ffee000001", name="b", kind="source", state=TrialState.COMPLETE,
                         examples=10, tokens=100, worker_seconds=1.5, cached=True),
                Baseline(study_id="c0ffee000001", name="c", kind="uniform", state=TrialState.PENDING),
            ])
        with sessions() as s:
            cost = recount(s, "c0ffee000001", full=10)
            unknown = recount(s, "c0ffee000001", full=None)  # the largest a complete trial scored
            capped = recount(s, "c0ffee000001", full=50)  # the dataset had fewer than `limit`
        engine.dispose()
    assert cost.spent.model_dump() == {"examples": 27, "tokens": 270, "worker_seconds": pytest.approx(5.8),
                                       "trials": 5}
    assert cost.saved_by_cache.model_dump() == {"examples": 20, "tokens": 200, "worker_seconds": 3.5,
                                                "trials": 1, "baselines": 1}
    # (10 - 2) + (10 - 5) examples; 0.5 s × (10/2 - 1) + 1.0 s × (10/5 - 1)
    assert cost.saved_by_pruning.model_dump() == {"examples": 13, "worker_seconds": pytest.approx(3.0),
                                                  "trials": 2}
    assert cost.baselines.model_dump() == {"examples": 10, "tokens": 100, "worker_seconds": 1.5, "trials": 1}
    assert cost.full_examples == 10
    assert unknown == cost and capped == cost
    assert StudyCost.model_validate(cost.model_dump(mode="json")) == cost  # what Study.cost holds


def test_a_cost_budget_counts_the_running_trials_at_the_mean_cost_so_far():
    from service.spec.study import Budget

    budget = Budget(max_examples=100)
    cost = StudyCost.model_validate({"spent": {"examples": 60, "trials": 6}})
    assert not cost_budget_spent(budget, cost, running=0)
    assert not cost_budget_spent(budget, cost, running=3)  # 60 + 3 × 10 = 90
    assert cost_budget_spent(budget, cost, running=4)  # 60 + 4 × 10 = 100
    seconds = Budget(max_worker_seconds=10)
    over = StudyCost.model_validate({"spent": {"worker_seconds": 10.5, "trials": 3}})
    assert cost_budget_spent(seconds, over, running=0)
    assert not cost_budget_spent(seconds, StudyCost(), running=8)  # nothing known yet: start them


def test_the_budget_takes_examples_and_worker_seconds_with_bounds(llama):
    from tests.api_fixtures import spec_data

    ok = StudySpec.from_data(spec_data(llama, budget={"max_worker_seconds": 3600}))
    assert ok.budget.max_worker_seconds == 3600 and ok.budget.max_trials is None
    assert StudySpec.from_data(spec_data(llama, budget={"max_examples": 5000})).budget.max_examples == 5000
    for budget, where, words in [
        ({"max_examples": 0}, ["budget", "max_examples"], "max_examples 0 is outside 1"),
        ({"max_worker_seconds": -1.0}, ["budget", "max_worker_seconds"], "-1.0 is outside (0, "),
        ({"max_worker_seconds": 1e12}, ["budget", "max_worker_seconds"], "64 workers for 30 days"),
        ({}, ["budget"], "max_worker_seconds or max_examples"),
    ]:
        with pytest.raises(StudyValidationError) as info:
            StudySpec.from_data(spec_data(llama, budget=budget))
        problems = [p for p in info.value.problems if p.loc == where]
        assert problems and words in problems[0].msg, info.value.problems


def test_the_model_card_has_the_cost_of_the_search():
    from workers.export_card import cost_section

    cost = StudyCost.model_validate({
        "spent": {"examples": 12000, "tokens": 3_400_000, "worker_seconds": 5400.0, "trials": 120},
        "saved_by_cache": {"examples": 300, "tokens": 90_000, "worker_seconds": 40.0, "trials": 3},
        "saved_by_pruning": {"examples": 20000, "worker_seconds": 9000.0, "trials": 80},
        "full_examples": 100}).model_dump(mode="json")
    text = cost_section(cost)
    assert "| spent by the trials | 120 trials | 12,000 | 3,400,000 | 90.0 min |" in text
    assert "| saved by pruning (estimated time) | 80 trials pruned | 20,000 | — | 2.50 h |" in text
    assert "| saved by the score cache | 3 hits | 300 | 90,000 | 40.0 s |" in text
    assert "scored on 100 examples" in text
    assert "no cost" in cost_section(None)


# ---- a real study ------------------------------------------------------------------------------
def test_a_study_records_each_trials_cost_and_its_recount_is_the_sum_of_the_rows(llama, db, settings,
                                                                                 ray_local, tmp_path,
                                                                                 model_root):
    from service.app import create_app

    url, sessions = db
    sid = add_study(sessions, spec(llama, trials=4, evaluation=loglik_evaluation(limit=4)))
    run_to_completion(settings, sessions, sid)
    rows = trials(sessions, sid)
    assert len(rows) == 4 and all(t.state == TrialState.COMPLETE for t in rows)
    assert all(t.examples == 4 and t.tokens > 4 and t.worker_seconds > 0 and not t.cached for t in rows)
    with sessions() as s:
        bases = list(s.scalars(select(Baseline).where(Baseline.study_id == sid)))
    assert bases and all(b.examples == 4 and b.tokens > 4 and b.worker_seconds > 0 for b in bases)
    cost = StudyCost.model_validate(study_row(sessions, sid).cost)
    assert cost.spent.trials == 4 and cost.full_examples == 4
    assert cost.spent.examples == sum(t.examples for t in rows) == 16
    assert cost.spent.tokens == sum(t.tokens for t in rows)
    assert cost.spent.worker_seconds == pytest.approx(sum(t.worker_seconds for t in rows))
    assert cost.baselines.trials == len(bases)
    assert cost.baselines.tokens == sum(b.tokens for b in bases)
    assert cost.saved_by_cache.trials == 0 and cost.saved_by_pruning.trials == 0
    # the API shows it: the study's cost, each trial's and each baseline's
    app = create_app(make_settings(url, tmp_path, model_root), start_controller=False)
    with TestClient(app) as client:
        study = client.get(f"/studies/{sid}").json()
        assert StudyCost.model_validate(study["cost"]) == cost
        page = client.get(f"/studies/{sid}/trials", params={"sort": "number"}).json()
        assert [(t["examples"], t["tokens"], t["cached"], t["rung"]) for t in page["items"]] == [
            (t.examples, t.tokens, False, None) for t in rows]
        assert page["items"][0]["worker_seconds"] == pytest.approx(rows[0].worker_seconds)
        shown = client.get(f"/studies/{sid}/baselines").json()
        assert sorted(b["tokens"] for b in shown) == sorted(b.tokens for b in bases)


@pytest.mark.parametrize("budget", [{"max_examples": 20}, {"max_worker_seconds": 1.5}])
def test_a_budget_in_examples_or_worker_seconds_stops_the_study(llama, db, settings, ray_local, budget):
    _, sessions = db
    # loglik: 4 examples a trial; noop with a delay: about 0.25 worker-seconds a trial
    evaluation = (loglik_evaluation(limit=4) if "max_examples" in budget else
                  {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}],
                   "options": {"delay_s": 0.25}})
    sid = add_study(sessions, spec(llama, trials=0, budget=budget, evaluation=evaluation))
    run_to_completion(settings, sessions, sid)
    rows = trials(sessions, sid)
    cost = StudyCost.model_validate(study_row(sessions, sid).cost)
    assert all(t.state == TrialState.COMPLETE for t in rows)
    if "max_examples" in budget:
        assert 20 <= cost.spent.examples <= 20 + 4  # the running trial it had to let finish, at most
        assert len(rows) == cost.spent.examples // 4
    else:
        per_trial = cost.spent.worker_seconds / len(rows)
        assert 1.5 <= cost.spent.worker_seconds <= 1.5 + 2 * per_trial
        assert 3 <= len(rows) <= 8
