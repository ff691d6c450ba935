"""The lean reads (issue 19): ETag / 304 on a study and its trial pages, keyset paging, and the
compact trials list; on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import update

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from service.api.etags import BodyCache, matches
from service.db import Event, Trial, TrialState
from tests import api_fixtures as fx

api, db_url, llama = fx.api, fx.db_url, fx.llama  # fixtures


def submit(api, llama) -> str:
    r = api.post("/studies", json=fx.spec_data(llama))
    assert r.status_code == 201, r.text
    return r.json()["id"]


def revalidate(api, path: str, params: dict | None = None) -> tuple[str, int]:
    """GET ``path`` twice, the second time with the first's ETag: (the ETag, the second's status)."""
    first = api.get(path, params=params)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert etag.startswith('W/"') and "no-cache" in first.headers["cache-control"]
    again = api.get(path, params=params, headers={"If-None-Match": etag})
    if again.status_code == 304:
        assert again.content == b"" and again.headers["etag"] == etag
    return etag, again.status_code


# ---- ETag / 304 ----------------------------------------------------------------------------------
def test_a_study_answers_304_while_unchanged_and_a_new_etag_once_it_changes(api, llama):
    sid = submit(api, llama)
    path = f"/studies/{sid}"
    etag, status = revalidate(api, path)
    assert status == 304
    assert api.get(path, headers={"If-None-Match": f'"x", {etag}'}).status_code == 304  # one of a list
    assert api.get(path, headers={"If-None-Match": "*"}).status_code == 304
    assert api.get(path, headers={"If-None-Match": '"other"'}).status_code == 200

    api.ctl.add_trial(sid, 0, 0.5)  # trials_done and best_value change
    changed = api.get(path, headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["trials_done"] == 1 and changed.json()["best_value"] == 0.5
    assert api.post(f"/studies/{sid}/pause").status_code == 200
    paused = api.get(path, headers={"If-None-Match": changed.headers["etag"]})
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert api.get("/studies/nope", headers={"If-None-Match": "*"}).status_code == 404


def test_a_trial_page_answers_304_until_a_trial_is_added_or_changes(api, llama):
    sid = submit(api, llama)
    path = f"/studies/{sid}/trials"
    empty, status = revalidate(api, path)
    assert status == 304
    api.ctl.add_trial(sid, 0, 0.5)
    one, status = revalidate(api, path)
    assert one != empty and status == 304

    # a trial added as the scheduler adds one (running, no event, the study row untouched)
    with api.ctl.sessions.begin() as s:
        s.add(Trial(study_id=sid, number=1, state=TrialState.RUNNING, params={"x": 1}, attempts=1))
    two = api.get(path, headers={"If-None-Match": one})
    assert two.status_code == 200 and [t["state"] for t in two.json()["items"]] == ["complete", "running"]

    # that trial finishes as the recorder records it: its row and its event in one transaction
    with api.ctl.sessions.begin() as s:
        s.execute(update(Trial).where(Trial.study_id == sid, Trial.number == 1)
                  .values(state=TrialState.FAILED, failure_reason="boom"))
        s.add(Event(study_id=sid, kind="trial_failed", data={"number": 1, "error": "boom"}))
    three = api.get(path, headers={"If-None-Match": two.headers["etag"]})
    assert three.status_code == 200 and three.json()["items"][1]["failure_reason"] == "boom"
    # another page of the same study has its own ETag
    other = api.get(path, params={"limit": 1})
    assert other.headers["etag"] != three.headers["etag"] and len(other.json()["items"]) == 1
    stale = api.get(path, params={"limit": 1}, headers={"If-None-Match": three.headers["etag"]})
    assert stale.status_code == 200


def test_if_none_match_comparison_is_weak():
    assert matches('W/"abc"', 'W/"abc"') and matches('"abc"', 'W/"abc"')
    assert matches(' "x" ,W/"abc"', 'W/"abc"')
    assert not matches(None, 'W/"abc"') and not matches("", 'W/"abc"') and not matches('"ab"', 'W/"abc"')


def test_the_body_cache_keeps_at_most_its_bytes_least_recent_out():
    cache = BodyCache(max_bytes=80)
    cache.put("a", b"a" * 10)
    cache.put("big", b"x" * 11)  # over an eighth of the budget: not kept
    assert cache.get("big") is None
    for key in "bcdefgh":
        cache.put(key, key.encode() * 10)
    assert cache.get("a") is not None  # touched: now the most recent
    cache.put("i", b"i" * 10)
    assert cache.get("b") is None and cache.get("a") == b"a" * 10 and len(cache) == 8


# ---- keyset paging -------------------------------------------------------------------------------
@pytest.mark.parametrize("sort", ["number", "-number"])
def test_keyset_pages_return_every_trial_once_in_order(api, llama, sort):
    sid = submit(api, llama)
    for n in range(23):
        api.ctl.add_trial(sid, n, n / 100, TrialState.COMPLETE if n % 5 else TrialState.FAILED)
    seen, params, pages = [], {"sort": sort, "limit": 5}, 0
    while True:
        page = api.get(f"/studies/{sid}/trials", params=params).json()
        assert page["total"] == 23 and page["offset"] == 0 and len(page["items"]) <= 5
        seen += [t["number"] for t in page["items"]]
        pages += 1
        if page["next_after"] is None:
            break
        assert page["next_after"] == seen[-1]
        params["after"] = page["next_after"]
    assert seen == sorted(range(23), reverse=sort == "-number") and pages == 5
    failed = api.get(f"/studies/{sid}/trials", params={"sort": sort, "state": "failed", "limit": 2,
                                                       "after": 10}).json()
    assert [t["number"] for t in failed["items"]] == ([15, 20] if sort == "number" else [5, 0])
    assert failed["total"] == 5
    # the offset form still works, and tells the cursor of the next page
    offset = api.get(f"/studies/{sid}/trials", params={"sort": sort, "limit": 5, "offset": 5}).json()
    assert [t["number"] for t in offset["items"]] == seen[5:10] and offset["next_after"] == seen[9]


def test_paging_refusals_say_what_to_send(api, llama):
    sid = submit(api, llama)
    path = f"/studies/{sid}/trials"

    def refused(params: dict) -> dict:
        r = api.get(path, params=params)
        assert r.status_code == 422, r.text
        (problem,) = r.json()["detail"]
        return problem

    too_many = refused({"limit": 501})
    assert too_many["loc"] == ["query", "limit"] and "500" in too_many["msg"]
    assert refused({"limit": 0})["loc"] == ["query", "limit"]
    by_fitness = refused({"sort": "-fitness", "after": 3})
    assert by_fitness["loc"] == ["query", "after"] and "sort=number" in by_fitness["msg"]
    assert "one of them" in refused({"after": 3, "offset": 5})["msg"]
    bogus = refused({"include": "recipe,bogus"})
    assert bogus["loc"] == ["query", "include"] and "'bogus'" in bogus["msg"] and "params" in bogus["msg"]
    assert refused({"after": -1})["loc"] == ["query", "after"]


# ---- the compact list ----------------------------------------------------------------------------
def test_the_list_is_compact_unless_it_is_asked_for_recipes_and_params(api, llama):
    sid = submit(api, llama)
    recipe = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": [0.25, 1e-05]}}]}
    with api.ctl.sessions.begin() as s:
        s.add(Trial(study_id=sid, number=0, state=TrialState.COMPLETE, params={"x0": 0.3}, recipe=recipe,
                    scores={"t/m": 0.5, "note": "é ✓"}, metrics={"optimizer": {"generation": 2}},
                    values=[0.5], fitness=0.5, attempts=1, timings={"eval_s": 1.5}, worker="w-0",
                    examples=4, tokens=77, worker_seconds=0.25, rung=1))
        s.add(Trial(study_id=sid, number=1, state=TrialState.RUNNING))  # every JSON column NULL
    full = [api.get(f"/studies/{sid}/trials/{n}").json() for n in (0, 1)]
    compact = api.get(f"/studies/{sid}/trials").json()["items"]
    assert all("recipe" not in t and "params" not in t for t in compact)
    assert compact == [{k: v for k, v in t.items() if k not in ("recipe", "params")} for t in full]
    with_recipe = api.get(f"/studies/{sid}/trials", params={"include": "recipe"}).json()["items"]
    assert [t["recipe"] for t in with_recipe] == [recipe, None] and "params" not in with_recipe[0]
    everything = api.get(f"/studies/{sid}/trials", params={"include": "params, recipe"}).json()["items"]
    assert everything == full  # the same content as the one-trial route, field for field


def test_a_stored_nan_reads_as_null(api, llama, db_url):
    if not db_url.startswith("sqlite"):
        pytest.skip("PostgreSQL's json refuses NaN: only SQLite can hold it")
    sid = submit(api, llama)
    with api.ctl.sessions.begin() as s:
        s.add(Trial(study_id=sid, number=0, state=TrialState.COMPLETE, scores={"t/m": float("nan")},
                    values=[float("inf")], metrics={"m": "NaN is a word here"}))
    (item,) = api.get(f"/studies/{sid}/trials").json()["items"]
    assert item["scores"] == {"t/m": None} and item["values"] == [None]
    assert item["metrics"] == {"m": "NaN is a word here"}


def test_the_client_reads_every_trial_by_cursor(db_url, tmp_path, model_root, llama):
    from service.api.client import Client
    from service.app import create_app

    app = create_app(fx.make_settings(db_url, tmp_path, model_root), start_controller=False)
    ctl = fx.FakeController(db_url)
    try:
        with fx.LiveServer(app) as url, Client(url) as client:
            sid = client.submit(json.dumps(fx.spec_data(llama)).encode(), "application/json")["id"]
            for n in range(7):
                ctl.add_trial(sid, n, n / 10)
            assert [t["number"] for t in client.trials(sid, page_size=3)] == list(range(7))
            (first, *_) = client.trials(sid, include="recipe", page_size=2)
            assert "recipe" in first and "params" not in first
    finally:
        ctl.close()
