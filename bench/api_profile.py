"""CPU per request of the two reads a dashboard repeats: ``GET /studies/{id}`` and a trials page.

    .venv/bin/python bench/api_profile.py                      # 300 trials, SQLite
    .venv/bin/python bench/api_profile.py --trials 1000 --profile 25
    .venv/bin/python bench/api_profile.py --db postgresql      # 127.0.0.1:5432, db `test`

A study is submitted over REST (tiny random Llama models in a temporary folder, the
``noop`` evaluator) and ``--trials`` trial rows are written as the controller writes them:
the optimizer's point, the recipe the space decodes it into, scores, metrics, timings and
cost. Each path is then asked ``--requests`` times straight through the ASGI app (no HTTP
client, no sockets: what is measured is the app, its framework and the database), and the
process CPU time per request is printed: with every body built, with the body cache
(an unchanged study), and for ``If-None-Match`` (a 304). ``--profile N``
prints the N costliest functions (cProfile, cumulative) of each path, with the sync endpoints
run on the event loop's thread (so that cProfile sees them).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def call(app: Any, path: str,
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One GET through the ASGI app: (status, headers, body)."""
    raw_path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(),
             "query_string": query.encode(),
             "root_path": "", "server": ("127.0.0.1", 8765), "client": ("127.0.0.1", 5555),
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]}
    sent: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]
            sent["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            sent["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return sent["status"], sent["headers"], sent["body"]


def fill_trials(db_url: str, study_id: str, n: int) -> None:
    """``n`` complete trials, as the controller records them (recipes decoded by the real space)."""
    from sqlalchemy import update

    from search_spaces.registry import build_space
    from service.cost import recount
    from service.db import Study, Trial, TrialState, make_engine, session_factory
    from service.db.types import utcnow
    from service.stored_study import StoredStudy

    engine = make_engine(db_url)
    sessions = session_factory(engine)
    rng = random.Random(0)
    with sessions.begin() as s:
        stored = StoredStudy.from_row(s.get(Study, study_id))
        space = build_space(stored.space_spec)
        center = space.center()
        best = (None, -1.0)
        for number in range(n):
            params = {k: v + rng.uniform(-0.1, 0.1) for k, v in center.items()}
            fit = rng.random()
            best = max(best, (number, fit), key=lambda b: b[1])
            now = utcnow()
            s.add(Trial(study_id=study_id, number=number, point_id=str(number), params=params,
                        recipe=space.decode(params).model_dump(mode="json"), state=TrialState.COMPLETE,
                        scores={"fingerprint/mean": fit}, values=[fit], fitness=fit, attempts=1,
                        metrics={"optimizer": {"generation": number // 8}, "fingerprint": {"mean": fit}},
                        timings={"build_s": 0.01, "eval_s": 0.02, "started_at": 1.7e9, "finished_at": 1.7e9,
                                 "peak_memory_bytes": 123456},
                        worker="worker-0", examples=4, tokens=1000, worker_seconds=0.03,
                        started_at=now, finished_at=now))
        s.flush()
        cost = recount(s, study_id, None).model_dump(mode="json")
        s.execute(update(Study).where(Study.id == study_id).values(
            trials_done=n, best_trial_number=best[0], best_value=best[1], cost=cost, elapsed_seconds=12.5))
    engine.dispose()


async def measure(app: Any, path: str, requests: int,
                  headers: dict[str, str] | None = None) -> tuple[float, int]:
    """CPU milliseconds per request (process time, after a warm-up), and the body's size."""
    for _ in range(min(20, requests)):
        status, _, body = await call(app, path, headers)
    start = time.process_time()
    for _ in range(requests):
        status, _, body = await call(app, path, headers)
    assert status in (200, 304), (status, body[:300])
    return 1e3 * (time.process_time() - start) / requests, len(body)


async def profile(app: Any, path: str, requests: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(requests):
        await call(app, path)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def inline_threadpool() -> None:
    """Run FastAPI's sync endpoints and dependencies on the event loop's thread (cProfile sees one
    thread only): for ``--profile`` runs, whose figures then leave out the hand-off to a thread."""
    import fastapi.dependencies.utils
    import fastapi.routing

    async def inline(func: Any, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    fastapi.routing.run_in_threadpool = inline  # type: ignore[assignment]
    fastapi.dependencies.utils.run_in_threadpool = inline  # type: ignore[assignment]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    args = parser.parse_args()

    if args.profile:
        inline_threadpool()
    from service.app import create_app
    from service.db.testing import temporary_database
    from service.settings import get_settings
    from workers.synthetic import make_family

    with tempfile.TemporaryDirectory() as tmp_name, temporary_database(args.db, Path(tmp_name)) as db_url:
        tmp = Path(tmp_name)
        base, experts = make_family("llama", tmp / "models")
        settings = get_settings(database_url=db_url, data_dir=tmp / "data", model_roots=[str(tmp / "models")])
        app = create_app(settings, start_controller=False)
        spec = {"name": "profile", "sources": [str(p) for p in experts], "base_model": str(base),
                "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 1},
                "evaluation": {"evaluator": "noop",
                               "objectives": [{"task": "fingerprint", "metric": "mean"}]},
                "budget": {"max_trials": max(args.trials, 1)}}

        asyncio.run(run(app, spec, db_url, args))


async def run(app: Any, spec: dict[str, Any], db_url: str, args: argparse.Namespace) -> None:
    from httpx import ASGITransport, AsyncClient

    async with app.router.lifespan_context(app):
        async with AsyncClient(transport=ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            r = await client.post("/studies", content=json.dumps(spec),
                                  headers={"Content-Type": "application/json"})
            assert r.status_code == 201, r.text
            sid = str(r.json()["id"])
        fill_trials(db_url, sid, args.trials)
        paths = {"GET /studies/{id}": f"/studies/{sid}",
                 "GET /studies/{id}/trials": f"/studies/{sid}/trials",
                 "GET /studies/{id}/trials?limit=500": f"/studies/{sid}/trials?limit=500",
                 "GET …/trials?limit=500&include=recipe,params":
                     f"/studies/{sid}/trials?limit=500&include=recipe,params"}
        print(f"{args.trials} trials, {args.db}, {args.requests} requests per path "
              f"(CPU ms per request, process time)")
        state = app.state.evomerge
        print(f"{'':47s} built  {'bytes':>8s}   cached      304")
        for name, path in paths.items():
            kept = getattr(state, "bodies", None)
            if kept is not None:  # every body built: a cache that keeps nothing
                state.bodies = type(kept)(max_bytes=0)
            ms, size = await measure(app, path, args.requests)
            line = f"  {name:44s} {ms:6.2f} ms {size:8d}"
            if kept is not None:
                state.bodies = kept
                cached, _ = await measure(app, path, args.requests)
                etag = (await call(app, path))[1]["etag"]
                ms304, _ = await measure(app, path, args.requests, {"If-None-Match": etag})
                line += f"   {cached:5.2f} ms  {ms304:5.2f} ms"
            print(line)
        if args.profile:
            for name, path in paths.items():
                print(f"\n==== {name}\n" + await profile(app, path, args.requests, args.profile))

if __name__ == "__main__":
    main()
