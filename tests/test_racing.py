"""Multi-fidelity racing: nested, seeded rungs; the rung decision; a worker's race."""

from __future__ import annotations

import copy

import pytest

from evaluators import EvaluationSpec, ObjectiveSpec, registry
from evaluators.subsets import rung_ranks, select_indices
from service.spec.fidelity import FidelitySpec
from workers.racing import RaceTicket, promotable, ticket

SEED = 1234


# ---- rung sizes and order ----------------------------------------------------------------------
def test_rung_sizes_grow_by_eta_and_end_at_full_fidelity():
    assert FidelitySpec(min_examples=10, eta=3).sizes(270) == [10, 30, 90, 270]
    # a rung less than eta below the full fidelity is dropped: it would cost nearly as much
    assert FidelitySpec(min_examples=10, eta=3).sizes(200) == [10, 30, 200]
    assert FidelitySpec(min_examples=10, eta=2, max_examples=50).sizes(200) == [10, 20, 50]
    assert FidelitySpec(min_examples=25, eta=3, max_examples=900).sizes(200) == [25, 200]
    assert FidelitySpec(min_examples=10, eta=3).sizes(90) == [10, 30, 90]
    with pytest.raises(ValueError, match="at least two rungs"):
        FidelitySpec(min_examples=50, max_examples=50)


@pytest.mark.parametrize("n_docs,limit,seed", [(100, 40, 0), (57, 57, 3), (300, 0.5, 9)])
def test_rungs_are_nested_prefixes_and_deterministic_for_a_seed(n_docs, limit, seed):
    ranks = rung_ranks(n_docs, limit, seed, "t")
    assert ranks == rung_ranks(n_docs, limit, seed, "t")  # deterministic
    assert ranks != rung_ranks(n_docs, limit, seed + 1, "t")  # seeded
    full = select_indices(n_docs, limit, seed, "t")
    assert sorted(ranks) == (full if full is not None else list(range(n_docs)))
    previous: set[int] = set()
    for n in (1, 5, 20, len(ranks)):
        rung = {doc for doc, pos in ranks.items() if pos < n}
        assert previous <= rung and len(rung) == n
        # a rung of n examples is exactly the search subset a limit of n selects
        assert sorted(rung) == (select_indices(n_docs, n, seed, "t") or list(range(n_docs)))
        previous = rung


# ---- the decision ------------------------------------------------------------------------------
def test_promotion_keeps_the_top_one_over_eta():
    assert promotable(0.1, 0, [], 3)  # the first to reach a rung goes on
    assert not promotable(0.4, 1, [0.5], 3) and promotable(0.51, 1, [0.5], 3)
    assert not promotable(0.5, 1, [0.5], 3)  # a tie ranks the newcomer last
    assert not ticket([10, 30], 3, [[0.0] * 9]).goes_on(0, 0.0)  # a plateau promotes nobody
    values = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]  # 8 recorded + 1: the top 3 go on
    t = ticket([10, 30, 90], 3, [values])
    assert t.reached == [8] and t.tops == [[0.9, 0.8, 0.7]]
    assert t.goes_on(0, 0.75) and not t.goes_on(0, 0.7) and not t.goes_on(0, 0.65)
    assert t.goes_on(1, 0.0)  # nobody at rung 1 yet
    # in a stream of candidates, about 1/eta of them go on
    import random

    rng = random.Random(0)
    recorded: list[float] = []
    promoted = 0
    for _ in range(300):
        v = rng.random()
        promoted += ticket([10, 30], 3, [recorded]).goes_on(0, v)
        recorded.append(v)
    assert 80 <= promoted <= 130


def test_a_ticket_is_bounded():
    with pytest.raises(ValueError):
        RaceTicket(sizes=[10], eta=3)
    with pytest.raises(ValueError):
        RaceTicket(sizes=[10, 30], eta=1)


# ---- rungs on lm-eval tasks --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from evaluators.testing import (
        addition_rows,
        choice_rows,
        write_choice_task,
        write_generate_task,
        write_group,
        write_loglikelihood_task,
    )
    from workers.synthetic import make_model

    root = tmp_path_factory.mktemp("racing")
    base = make_model("llama", root / "base", seed=11, hidden=64, layers=2)
    model = make_model("llama", root / "model", seed=12, base=base, noise=0.3)
    d = root / "tasks"
    rows = addition_rows(60, seed=1)
    for i, row in enumerate(rows):
        row["answer"] = "1" if i % 3 else row["answer"]
    write_generate_task(d, "rc_gen", rows)
    write_choice_task(d, "rc_mc", choice_rows(40, seed=3))
    write_choice_task(d, "rc_mc2", choice_rows(30, seed=4))
    write_group(d, "rc_grp", ["rc_mc", "rc_mc2"], "acc")
    write_loglikelihood_task(d, "rc_ll", addition_rows(30, seed=5))
    return {"model": model, "tasks": d}


def _spec(tasks, limits: dict[str, int]) -> EvaluationSpec:
    objectives = [
        ObjectiveSpec(task="rc_gen", metric="exact_match", limit=limits["rc_gen"], weight=2.0),
        ObjectiveSpec(task="rc_grp", metric="acc", limit=limits["rc_grp"]),
        ObjectiveSpec(task="rc_mc", metric="acc_norm", limit=limits["rc_grp"]),
        ObjectiveSpec(task="rc_ll", metric="perplexity", limit=limits["rc_ll"], weight=0.1),
    ]
    return registry.validate_spec(EvaluationSpec(objectives=objectives, seed=SEED, batch_size=8,
                                                 options={"task_dirs": [str(tasks)]}))


def test_each_rung_scores_what_a_study_limited_to_it_scores(tasks):
    """Rung n, reached through the smaller rungs, equals a full evaluation with limit n (per task
    at most its own limit): the rungs are the seeded prefixes, and nothing is scored twice."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tasks["model"])
    tokenizer = AutoTokenizer.from_pretrained(tasks["model"])
    limits = {"rc_gen": 40, "rc_grp": 20, "rc_ll": 25}
    racer = registry.create(_spec(tasks["tasks"], limits))
    for repeat in range(2):  # a second candidate starts afresh
        calls = []
        for k, n in enumerate([4, 12, 40]):
            got = racer.evaluate_rung(model, tokenizer, n, fresh=k == 0)
            want = registry.create(_spec(tasks["tasks"], {t: min(n, lim) for t, lim in limits.items()}))
            expected = want.evaluate(model, tokenizer)
            # batches of other shapes: float noise only (about 1e-7 of a perplexity)
            assert got.scores == pytest.approx(expected.scores, rel=1e-6, abs=1e-12), (repeat, n)
            assert got.n_examples == expected.n_examples
            calls.append(got.timings.model_calls)
        assert all(c > 0 for c in calls)
    full = registry.create(_spec(tasks["tasks"], limits)).evaluate(model, tokenizer)
    assert got.scores == pytest.approx(full.scores, rel=1e-6, abs=1e-12)


def test_a_worker_prunes_where_the_ticket_says_and_reports_partial_scores(tasks):
    from workers.trial import TrialRunner

    spec = _spec(tasks["tasks"], {"rc_gen": 40, "rc_grp": 20, "rc_ll": 25})
    runner = TrialRunner({"sources": [str(tasks["model"])], "evaluation": spec.model_dump()})
    recipe = {"merge_method": "linear",
              "models": [{"model": str(tasks["model"]), "parameters": {"weight": 1.0}}]}
    raced = runner.run(1, copy.deepcopy(recipe), race=ticket([4, 12, 40], 3, [[], []]))
    plain = runner.run(2, copy.deepcopy(recipe))
    assert raced.state == plain.state == "complete"
    assert [r.examples for r in raced.rungs] == [4, 12, 40]
    assert raced.values == pytest.approx(plain.values)
    assert raced.cost.examples == plain.cost.examples == 40 + 20 + 20 + 25  # rc_mc counted once per task
    best = raced.rungs[0].values[0] + 1.0  # a competitor far better at rung 0
    pruned = runner.run(3, copy.deepcopy(recipe), race=ticket([4, 12, 40], 3, [[best]]))
    assert pruned.state == "pruned" and len(pruned.rungs) == 1
    assert pruned.values == pruned.rungs[0].values != plain.values
    assert pruned.cost.examples < plain.cost.examples


def test_a_window_compares_with_the_latest_candidates_only():
    """As the search improves, a new candidate beats most of history: against the last
    `window` candidates of its rung it must still be in their top 1/eta."""
    from service.controller.race_board import RaceBoard

    board = RaceBoard([10, 30, 90], 3, window=6)
    for v in range(30):
        board.record([{"rung": 0, "values": [v / 100]}])
    everyone, recent = RaceBoard([10, 30, 90], 3, recorded=board.recorded), board
    assert everyone.ticket().goes_on(0, 0.25) and not recent.ticket().goes_on(0, 0.25)
    assert recent.ticket().reached == [6, 0] and recent.ticket().goes_on(0, 0.285)
