"""Many live-stream subscribers of one study: does each receive every event, and what does the API
process spend on them?

    .venv/bin/python bench/sse_fanout.py                                # 500 subscribers, 60 s
    .venv/bin/python bench/sse_fanout.py --subscribers 100 --seconds 10 --rate 20
    .venv/bin/python bench/sse_fanout.py --postgres     # a throw-away schema of the test PostgreSQL

``evomerge serve --no-controller`` on 127.0.0.1 (its own process; SQLite in a temporary
folder unless ``--database-url`` or ``--postgres``) and one study over tiny random Llama
models, submitted over REST. A writer (this process, in a thread) stands in for the
controller: ``--rate`` trials per second, each a trial row, the study's counters and a
``trial_complete`` event, as the recorder writes them. ``--subscribers`` raw-socket clients
(asyncio, one connection each, from event 0) follow ``GET /studies/{id}/events`` for
``--seconds``. Reported: the time for all to connect, the events written, how many
subscribers received every stored event of the study in id order (compared with the
database at the end), and the API process's CPU seconds over the window (``psutil``): its
share of one core. :func:`sse_load` is reusable against any running server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.api_load import free_port, serve_command, start, stop, study_spec  # noqa: E402


async def _subscribe(host: str, port: int, path: str, ids: list[int], headers: str) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n{headers}\r\n"
    writer.write(request.encode())
    await writer.drain()
    try:
        while line := await reader.readline():
            if line.startswith(b"id: "):
                ids.append(int(line[4:]))
    finally:
        writer.close()


async def sse_load(url: str, study_id: str, subscribers: int, seconds: float,
                   token: str | None = None, after: int | None = None) -> dict[str, Any]:
    """``subscribers`` streams of the study (from its first event, or those after ``after``), held
    ``seconds``; each one's received event ids, and the time until every one had its first event."""
    host, port = url.removeprefix("http://").split(":")
    headers = f"Authorization: Bearer {token}\r\n" if token else ""
    received: list[list[int]] = [[] for _ in range(subscribers)]
    began = time.monotonic()
    path = f"/studies/{study_id}/events" + (f"?after={after}" if after is not None else "")
    tasks = [asyncio.create_task(_subscribe(host, int(port), path, ids, headers)) for ids in received]
    while not all(received) and time.monotonic() - began < seconds:
        await asyncio.sleep(0.05)
    connected = time.monotonic() - began
    await asyncio.sleep(max(0.0, seconds - connected))
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"subscribers": subscribers, "connect_s": connected, "received": received}


def _writer(db_url: str, study_id: str, rate: float, stop_at: float) -> int:
    """Trials as the controller's recorder writes them, ``rate`` per second until ``stop_at``."""
    from service.db import Event, Study, Trial, TrialState, make_engine, session_factory

    engine = make_engine(db_url)
    sessions = session_factory(engine)
    number = 0
    while time.monotonic() < stop_at:
        with sessions.begin() as s:
            s.add(Trial(study_id=study_id, number=number, fitness=number / 1e4, state=TrialState.COMPLETE,
                        params={"x": number}, scores={"t/m": number / 1e4}, values=[number / 1e4]))
            study = s.get(Study, study_id)
            study.trials_done = (study.trials_done or 0) + 1
            study.best_value, study.best_trial_number = number / 1e4, number
            s.add(Event(study_id=study_id, kind="trial_complete", data={"number": number}))
        number += 1
        time.sleep(1 / rate)
    engine.dispose()
    return number


def _stored_ids(db_url: str, study_id: str) -> list[int]:
    from sqlalchemy import select

    from service.db import Event, make_engine, session_factory

    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        ids = list(s.scalars(select(Event.id).where(Event.study_id == study_id).order_by(Event.id)))
    engine.dispose()
    return ids


def run(subscribers: int, seconds: float, rate: float, database_url: str | None) -> dict[str, Any]:
    import httpx
    import psutil

    from service.db import StudyStatus, make_engine, session_factory
    from service.db.models import Study
    from workers.synthetic import make_family

    with tempfile.TemporaryDirectory(prefix="sse-fanout-") as tmp:
        folder = Path(tmp)
        family = make_family("llama", folder / "models", 2)
        db_url = database_url or f"sqlite:///{folder / 'evomerge.db'}"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "EVOMERGE_DATA_DIR": str(folder), "EVOMERGE_DATABASE_URL": db_url,
               "EVOMERGE_MODEL_ROOTS": str(folder / "models")}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        proc = start([*serve_command(), "--port", str(port), "--log-level", "warning", "--no-controller"],
                     env, folder / "serve.log")
        try:
            with httpx.Client(base_url=url, timeout=30) as http:
                deadline = time.monotonic() + 120
                while True:
                    try:
                        if http.get("/health").status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"the server did not start; see {folder / 'serve.log'}")
                    time.sleep(0.2)
                spec = study_spec(*family, optimizer="random", trials=100_000, parallelism=1,
                                  name="sse fan-out")
                created = http.post("/studies", json=spec)
                assert created.status_code == 201, created.text
                sid = created.json()["id"]
            engine = make_engine(db_url)
            with session_factory(engine).begin() as s:
                s.get(Study, sid).status = StudyStatus.RUNNING
            engine.dispose()
            api = psutil.Process(proc.pid)
            cpu0, t0 = sum(api.cpu_times()[:2]), time.monotonic()
            written: list[int] = []
            writer = threading.Thread(target=lambda: written.append(
                _writer(db_url, sid, rate, time.monotonic() + seconds - 2)))  # the last 2 s: delivery
            writer.start()
            load = asyncio.run(sse_load(url, sid, subscribers, seconds))
            writer.join()
            cpu1, t1 = sum(api.cpu_times()[:2]), time.monotonic()
            stored = _stored_ids(db_url, sid)
        finally:
            stop(proc)
    complete = sum(1 for ids in load["received"] if ids == stored)
    return {"subscribers": subscribers, "seconds": t1 - t0, "connect_s": load["connect_s"],
            "trials_written": written[0] if written else 0, "events_stored": len(stored),
            "complete": complete, "api_cpu_s": cpu1 - cpu0, "api_cores": (cpu1 - cpu0) / (t1 - t0),
            "database": db_url.split(":", 1)[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=20.0, help="trials (events) written per second")
    parser.add_argument("--database-url", default=None, help="default: SQLite in a temporary folder")
    parser.add_argument("--postgres", action="store_true",
                        help="a throw-away schema of the PostgreSQL at 127.0.0.1:5432 (service.db.testing)")
    args = parser.parse_args(argv)
    if args.postgres:
        from service.db.testing import postgres_schema, postgres_url

        with postgres_schema(postgres_url()) as url:
            result = run(args.subscribers, args.seconds, args.rate, url)
    else:
        result = run(args.subscribers, args.seconds, args.rate, args.database_url)
    print(f"{result['subscribers']} subscribers of one study for {result['seconds']:.1f} s "
          f"({result['database']}): all connected and served in {result['connect_s']:.2f} s; "
          f"{result['trials_written']} trials written, {result['events_stored']} events stored; "
          f"{result['complete']} of {result['subscribers']} subscribers received every event in order; "
          f"API process CPU {result['api_cpu_s']:.1f} s = {100 * result['api_cores']:.0f} % of one core")
    return result


if __name__ == "__main__":
    main()
