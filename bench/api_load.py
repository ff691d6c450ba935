"""The service under load: API latency while a study runs, and the controller's throughput.

    .venv/bin/python bench/api_load.py                       # everything (about 3 minutes)
    .venv/bin/python bench/api_load.py --clients 50 --seconds 20 --trials 1000
    .venv/bin/python bench/api_load.py --skip-service        # only the controller alone

Two measurements, on tiny random Llama models built in a temporary folder
(``workers.synthetic.make_family``) and a SQLite database there; figures in
docs/benchmarks.md ("Service: API latency and controller throughput").

1. **The controller alone.** The real ``Controller`` — real SQLite, the real optimizer
   (its Optuna storage in the same database), the stored spec re-validated, the real
   trial protocol (docs/controller.md) — drives a study of ``--trials`` trials (and the
   study's baselines) with the ``noop`` evaluator through a stand-in worker pool whose
   trials finish at once (``InstantPool``; ``Controller._pool`` is overridden, nothing
   else). Ray and the workers cost nothing here, so what is measured is the controller
   itself: trials per second (also over the first and the last tenth of the study: does
   a trial cost more as the study grows?), CPU milliseconds per trial, and the
   controller's overhead per trial — from a worker's result being handed over
   (``pool.wait()`` returning it) to the next ``pool.submit`` on the freed slot (mean,
   p50, p99). Once per optimizer (``optuna-cmaes``, ``random``, ``cma``), with
   ``--parallelism`` slots. The run is checked: numbers 0..N-1, every trial complete and
   counted, the best right, every Optuna trial COMPLETE.

2. **The service.** ``evomerge serve`` on 127.0.0.1 (its own local Ray,
   ``--workers`` workers) and a study (noop evaluator, optuna-cmaes) submitted over REST.
   Once it runs: ``--seconds`` without API traffic, then ``--seconds`` with
   ``--clients`` concurrent clients (asyncio + httpx, keep-alive, one connection each)
   alternating ``GET /studies/{id}`` and ``GET /studies/{id}/trials`` (the default page:
   50 trials) as fast as they are answered. Reported: p50 / p99 latency (as the client
   sees it, its own event loop included) and requests per second per endpoint; the
   study's trials per second with and without the load; and, read from the database
   afterwards, how long a worker idles between two trials (worker clocks), split into
   Ray handing the result back, the controller (result recorded → next trial dispatched,
   the trial rows' timestamps) and Ray starting the next trial. ``--service split`` runs
   the API (``evomerge serve --no-controller``) and the controller
   (``python -m service.controller``) started apart instead; ``in-process`` runs ``evomerge
   serve --controller in-process`` (the controller a thread of the API process); ``one`` is
   ``evomerge serve`` as it runs by default (the controller its supervised child process);
   ``both`` (the default) runs ``one`` then ``split``, ``all`` the three. CPU seconds of each
   process, of Ray's processes and of the client are printed: on a 2-core machine they
   compete. The subprocesses import this checkout (``PYTHONPATH``), so an older checkout
   can be measured with its own copy.

Everything runs on this machine; no network beyond loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # http_load, sse_fanout

OPTIMIZERS = ("optuna-cmaes", "random", "cma")


def study_spec(base: Path, experts: list[Path], *, optimizer: str, trials: int, parallelism: int,
               name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sources": [str(p) for p in experts],
        "base_model": str(base),
        "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
        "evaluation": {"evaluator": "noop", "objectives": [{"task": "fingerprint", "metric": "mean"}]},
        "optimizer": {"name": optimizer, **({"population_size": 8} if "cma" in optimizer else {})},
        "budget": {"max_trials": trials},
        "parallelism": parallelism,
        "seed": 0,
    }


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of xs."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def summary_ms(xs: list[float]) -> dict[str, float]:
    return {"n": len(xs), "mean_ms": 1e3 * statistics.fmean(xs) if xs else float("nan"),
            "p50_ms": 1e3 * pct(xs, 50), "p99_ms": 1e3 * pct(xs, 99)}


# ---- 1. the controller alone ------------------------------------------------------------------
class InstantPool:
    """Stands in for ``workers.pool.WorkerPool``: a submitted trial is finished by the next
    ``wait()``, with what a noop worker reports. Records, per slot, the time from a result
    being handed out to the next ``submit`` (the controller's overhead per trial)."""

    def __init__(self, n: int) -> None:
        self.slots = [None] * n
        self.running: dict[int, Any] = {}
        self.freed: deque[float] = deque()  # when each result was handed to the controller
        self.gaps: list[float] = []
        self.finished: list[float] = []  # when each result was handed out

    def idle(self) -> int:
        return len(self.slots) - len(self.running)

    def busy(self) -> bool:
        return bool(self.running)

    def submit(self, trial_id: int, recipe: Any, attempt: int = 1, timeout_s: float | None = None) -> None:
        now = time.perf_counter()
        if len(self.running) >= len(self.slots):
            raise RuntimeError("no idle worker: call idle() before submit()")
        if self.freed:
            self.gaps.append(now - self.freed.popleft())
        self.running[trial_id] = recipe

    def wait(self, timeout: float | None = None) -> list[Any]:
        from workers.trial import TrialResult, TrialTimings

        results = []
        for trial_id in self.running:
            value = random.Random(trial_id).random()
            t = time.time()
            results.append(TrialResult(
                trial_id=trial_id, state="complete", values=[value], scores={"fingerprint/mean": value},
                metrics={"fingerprint": {"mean": value}}, worker="instant",
                timings=TrialTimings(started_at=t, finished_at=t)))
        self.running.clear()
        now = time.perf_counter()
        self.freed.extend([now] * len(results))
        self.finished.extend([now] * len(results))
        return results

    def shutdown(self) -> None:
        self.running.clear()


def controller_ceiling(family: tuple[Path, list[Path]], tmp: Path, optimizer: str, trials: int,
                       parallelism: int) -> dict[str, Any]:
    """Run one study to its budget through the real Controller and an InstantPool."""
    import optuna
    from sqlalchemy import select

    from service.controller import Controller
    from service.db import Study, StudyStatus, Trial, TrialState, make_engine, session_factory, upgrade
    from service.settings import get_settings
    from service.validation import validate_study

    class InstantController(Controller):
        def _pool(self, rt: Any) -> Any:
            pool = self.pools.get(rt.pool_key)
            if pool is None:
                pool = self.pools[rt.pool_key] = InstantPool(rt.parallelism)
            return pool

    folder = tmp / f"ceiling-{optimizer}"
    folder.mkdir()
    url = f"sqlite:///{folder / 'evomerge.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = session_factory(engine)
    base, experts = family
    settings = get_settings(data_dir=folder, database_url=url, model_roots=[base.parent],
                            max_workers=parallelism, lease_seconds=600)
    spec = study_spec(base, experts, optimizer=optimizer, trials=trials, parallelism=parallelism,
                      name=f"ceiling {optimizer}")
    validated = validate_study(spec, settings)
    with sessions.begin() as s:  # what POST /studies stores
        study = Study(name=spec["name"], spec=validated.model_dump(mode="json"), status=StudyStatus.QUEUED)
        s.add(study)
        s.flush()
        study.optuna_study_name = f"evomerge-{study.id}"
        sid = study.id

    controller = InstantController(settings, sessions)
    try:
        controller.step()  # opens the study (validation, optimizer, Optuna study) and dispatches
        pool = next(iter(controller.pools.values()))
        done0 = len(pool.finished)
        wall0, cpu0 = time.perf_counter(), time.process_time()
        while sid in controller.runtimes:
            controller.step()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    finally:
        controller.stop()

    with sessions() as s:  # the study ran exactly as the protocol says
        study = s.get(Study, sid)
        rows = list(s.scalars(select(Trial).where(Trial.study_id == sid).order_by(Trial.number)))
    assert study.status == StudyStatus.COMPLETED, study.status
    assert [t.number for t in rows] == list(range(trials)), "trial numbers are not 0..N-1"
    assert all(t.state == TrialState.COMPLETE for t in rows) and study.trials_done == trials
    best = max(rows, key=lambda t: t.fitness)
    assert study.best_trial_number == best.number
    if optimizer != "cma":
        ostudy = optuna.load_study(study_name=study.optuna_study_name, storage=url)
        states = Counter(t.state for t in ostudy.get_trials(deepcopy=False))
        assert states == {optuna.trial.TrialState.COMPLETE: trials}, states
    engine.dispose()
    measured = len(pool.finished) - done0  # recorded inside the timed loop (the baselines too)
    tenth = max(2, trials // 10)  # does the cost per trial grow with the study?
    first, last = pool.finished[:tenth], pool.finished[-tenth:]
    return {"optimizer": optimizer, "trials": trials, "parallelism": parallelism,
            "trials_per_s": measured / wall, "cpu_ms_per_trial": 1e3 * cpu / measured,
            "first_tenth_per_s": (len(first) - 1) / (first[-1] - first[0]),
            "last_tenth_per_s": (len(last) - 1) / (last[-1] - last[0]),
            "overhead": summary_ms(pool.gaps)}


# ---- 2. the service ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "evomerge"
    if script.exists():
        return [str(script), "serve"]
    return [sys.executable, "-m", "service.cli", "serve"]


class CpuMeter:
    """CPU seconds of named processes, of all their descendants (Ray's) and of this process."""

    def __init__(self, pids: dict[str, int]) -> None:
        try:
            import psutil
        except ImportError:
            self.procs: dict[str, Any] = {}
            return
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}

    def read(self) -> dict[str, float]:
        out = {"client": time.process_time()}
        named = {proc.pid for proc in self.procs.values()}
        others: dict[int, Any] = {}  # every other descendant once (Ray's)
        for name, proc in self.procs.items():
            with contextlib.suppress(Exception):
                t = proc.cpu_times()
                out[name] = t.user + t.system
                others.update((c.pid, c) for c in proc.children(recursive=True) if c.pid not in named)
        ray = 0.0
        for child in others.values():
            with contextlib.suppress(Exception):
                ct = child.cpu_times()
                ray += ct.user + ct.system
        if self.procs:
            out["ray"] = ray
        return out

    @staticmethod
    def diff(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
        return {k: b[k] - a[k] for k in a if k in b}


async def api_load(url: str, study_id: str, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` keep-alive clients alternating the two GETs for ``seconds`` (bench/http_load.py:
    raw HTTP/1.1, revalidating with the ETag each last got, as a dashboard's browser does)."""
    from http_load import closed_loop

    host, port = url.removeprefix("http://").split(":")
    paths = [f"/studies/{study_id}", f"/studies/{study_id}/trials"]
    got = await closed_loop(host, int(port), paths, clients, seconds)
    wall = got["seconds"]
    out = {}
    for path, names in zip(paths, ("GET /studies/{id}", "GET /studies/{id}/trials")):
        xs = got["latencies"][path]
        sizes = got["sizes"][path]
        out[names] = {**summary_ms(xs), "requests": len(xs), "per_s": len(xs) / wall,
                      "bytes": int(statistics.median(sizes)) if sizes else 0,
                      "statuses": got["statuses"][path]}
    every = [x for xs in got["latencies"].values() for x in xs]
    return {"endpoints": out, "all": {**summary_ms(every), "per_s": len(every) / wall},
            "errors": got["errors"], "seconds": wall, "clients": clients}


def sse_phase(url: str, db_url: str, study_id: str, subscribers: int, seconds: float,
              drain: float = 30.0) -> dict[str, Any]:
    """``subscribers`` event streams of the running study held ``seconds`` (bench/sse_fanout.py),
    followed from the study's last event at the start; then the study is paused (no new events)
    and the streams get ``drain`` seconds to deliver what is on its way. Does every subscriber
    receive every event, in order?"""
    import threading

    import httpx
    from sse_fanout import _stored_ids, sse_load

    marks: dict[str, list[int]] = {}

    def pause_later() -> None:
        time.sleep(seconds)
        marks["at_pause"] = _stored_ids(db_url, study_id)
        httpx.post(f"{url}/studies/{study_id}/pause", timeout=30)

    # as a dashboard does: the study's state read, then its events followed from the last one
    after = max(_stored_ids(db_url, study_id), default=0)
    timer = threading.Thread(target=pause_later, daemon=True)
    timer.start()
    got = asyncio.run(sse_load(url, study_id, subscribers, seconds + drain, after=after))
    timer.join()
    stored = [i for i in _stored_ids(db_url, study_id) if i > after]
    complete = sum(1 for ids in got["received"] if ids == stored)
    in_order = sum(1 for ids in got["received"] if ids == stored[:len(ids)])
    missed = sorted(set(stored) - set(got["received"][0])) if got["received"] else []
    return {"missed_by_first": _describe(db_url, missed[:20]),
            "subscribers": subscribers, "seconds": seconds, "drain_s": drain, "connect_s": got["connect_s"],
            "every_event_in_order": complete, "gap_free_prefix": in_order, "events": len(stored),
            "events_at_pause": len(marks.get("at_pause", [])),
            "received_min": min((len(ids) for ids in got["received"]), default=0)}


def _describe(db_url: str, ids: list[int]) -> list[str]:
    """Stored events, as "id kind at" (what a subscriber missed)."""
    from sqlalchemy import select

    from service.db import Event, make_engine, session_factory

    engine = make_engine(db_url)
    with session_factory(engine)() as s:
        rows = s.scalars(select(Event).where(Event.id.in_(ids)).order_by(Event.id)).all() if ids else []
        out = [f"{e.id} {e.kind} {e.at:%H:%M:%S.%f}" for e in rows]
    engine.dispose()
    return out


def worker_gaps(db_url: str, study_id: str, window: tuple[float, float]) -> dict[str, Any]:
    """How long workers idled between consecutive trials finished within ``window`` (epoch s):
    Ray handing the result back (worker finished → row recorded), the controller (row
    recorded → next row dispatched), Ray starting the next trial (dispatched → worker starts)."""
    from sqlalchemy import select

    from service.db import Trial, TrialState, make_engine, session_factory

    engine = make_engine(db_url, create_dirs=False)
    with session_factory(engine)() as s:
        rows = list(s.scalars(select(Trial).where(Trial.study_id == study_id,
                                                  Trial.state == TrialState.COMPLETE).order_by(Trial.number)))
    engine.dispose()
    by_worker: dict[str, list[Trial]] = {}
    for t in rows:
        if t.worker and t.timings and t.started_at and t.finished_at:
            by_worker.setdefault(t.worker, []).append(t)
    back, controller, start, idle, busy = [], [], [], [], []
    for trials in by_worker.values():
        trials.sort(key=lambda t: t.timings["started_at"])
        for prev, nxt in itertools.pairwise(trials):
            if not window[0] <= prev.finished_at.timestamp() <= window[1]:
                continue
            back.append(prev.finished_at.timestamp() - prev.timings["finished_at"])
            controller.append(nxt.started_at.timestamp() - prev.finished_at.timestamp())
            start.append(nxt.timings["started_at"] - nxt.started_at.timestamp())
            idle.append(nxt.timings["started_at"] - prev.timings["finished_at"])
            busy.append(prev.timings["finished_at"] - prev.timings["started_at"])
    return {"workers": len(by_worker), "worker_busy": summary_ms(busy), "worker_idle": summary_ms(idle),
            "ray_result_back": summary_ms(back), "controller": summary_ms(controller),
            "ray_dispatch": summary_ms(start)}


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A process in its own session, so that it and everything it starts (Ray) can be ended."""
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    """SIGINT (uvicorn's graceful shutdown; the controller's KeyboardInterrupt), then SIGKILL to
    whatever of its session is left (Ray's processes)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def service_run(family: tuple[Path, list[Path]], tmp: Path, *, clients: int, seconds: float,
                workers: int, optimizer: str, split: bool, in_process: bool = False,
                database_url: str | None = None, sse: int = 0, sse_seconds: float = 60.0,
                sse_drain: float = 30.0) -> dict[str, Any]:
    """One study on the real service; ``split``: the API (``evomerge serve --no-controller``) and
    the controller (``python -m service.controller``) started apart, else one ``evomerge serve``
    (the controller its supervised child process; ``in_process``: a thread of the API process)."""
    import httpx

    folder = tmp / ("service-split" if split else "service-in-process" if in_process else "service")
    folder.mkdir(exist_ok=True)
    db_url = database_url or f"sqlite:///{folder / 'evomerge.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "EVOMERGE_DATA_DIR": str(folder), "EVOMERGE_DATABASE_URL": db_url,
           "EVOMERGE_MODEL_ROOTS": str(family[0].parent), "EVOMERGE_MAX_WORKERS": str(workers),
           "EVOMERGE_LEASE_SECONDS": "600"}
    env.pop("RAY_ADDRESS", None)
    env.pop("EVOMERGE_RAY_ADDRESS", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)  # this checkout
    serve = [*serve_command(), "--port", str(port), "--log-level", "warning",
             *(["--controller", "in-process"] if in_process else [])]
    procs: dict[str, subprocess.Popen] = {}
    phases: dict[str, Any] = {}
    try:
        procs["api" if split else "server"] = start(serve + (["--no-controller"] if split else []), env,
                                                    folder / "serve.log")
        http = httpx.Client(base_url=url, timeout=30)
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if http.get("/health").status_code == 200:
                    break
            if any(p.poll() is not None for p in procs.values()) or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; see {folder / 'serve.log'}")
            time.sleep(0.2)
        if split:  # after the API's start-up: it migrates the database
            controller = [sys.executable, "-m", "service.controller", "--database-url", db_url]
            procs["controller"] = start(controller, env, folder / "controller.log")
        supervised = {} if split or in_process else http.get("/health").json().get("controller") or {}
        spec = study_spec(*family, optimizer=optimizer, trials=100_000, parallelism=workers, name="api load")
        created = http.post("/studies", json=spec)
        if created.status_code != 201:
            raise RuntimeError(f"POST /studies: {created.status_code} {created.text}")
        sid = created.json()["id"]

        def done() -> int:
            study = http.get(f"/studies/{sid}").json()
            if study["status"] not in ("queued", "running", "paused"):  # the SSE phase ends paused
                raise RuntimeError(f"the study is {study['status']}: {study.get('error')}")
            return int(study["trials_done"])

        deadline = time.monotonic() + 180
        while done() < 4 * workers:  # the workers are up and warm
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                raise RuntimeError(f"the study made no progress; see the logs in {folder}")
            time.sleep(0.5)

        cpu = CpuMeter({**{name: p.pid for name, p in procs.items()},
                        **({"controller": supervised["pid"]} if supervised.get("pid") else {})})
        for phase in ("quiet", "load", *(["sse"] if sse else [])):
            c0, n0, t0 = cpu.read(), done(), time.time()
            load = streams = None
            if phase == "quiet":
                time.sleep(seconds)
            elif phase == "load":
                load = asyncio.run(api_load(url, sid, clients, seconds))
            else:
                streams = sse_phase(url, db_url, sid, sse, sse_seconds, sse_drain)
            c1, n1, t1 = cpu.read(), done(), time.time()
            phases[phase] = {"trials_per_s": (n1 - n0) / (t1 - t0), "window": (t0, t1),
                             "cpu_s": CpuMeter.diff(c0, c1), "seconds": t1 - t0, "api": load, "sse": streams}
        http.post(f"/studies/{sid}/cancel")
        http.close()
    finally:
        for proc in reversed(procs.values()):
            stop(proc)
    for phase in phases.values():
        phase["gaps"] = worker_gaps(db_url, sid, phase.pop("window"))
    return {"workers": workers, "optimizer": optimizer, "split": split, "in_process": in_process,
            "database": db_url.split(":", 1)[0], "phases": phases}


# ---- report ------------------------------------------------------------------------------------
def print_report(ceiling: list[dict[str, Any]], services: list[dict[str, Any]],
                 args: argparse.Namespace) -> None:
    cores = os.cpu_count()
    if ceiling:
        p = ceiling[0]["parallelism"]
        print(f"\nController alone (instant in-process workers, SQLite, noop results): {args.trials} trials, "
              f"parallelism {p}, {cores} cores")
        print(f"{'':14}{'':>10}{'first / last':>16}{'CPU ms':>8}   {'result -> next dispatch, ms':>27}")
        print(f"{'optimizer':14}{'trials/s':>10}{'10 %, trials/s':>16}{'/trial':>8}   "
              f"{'mean':>9}{'p50':>9}{'p99':>9}")
        for r in ceiling:
            o = r["overhead"]
            print(f"{r['optimizer']:14}{r['trials_per_s']:>10.1f}{r['first_tenth_per_s']:>8.0f} /"
                  f"{r['last_tenth_per_s']:>5.0f}{r['cpu_ms_per_trial']:>8.2f}   "
                  f"{o['mean_ms']:>9.2f}{o['p50_ms']:>9.2f}{o['p99_ms']:>9.2f}")
    for run in services:
        w = run["workers"]
        how = ("the API (`evomerge serve --no-controller`) and `python -m service.controller` as two "
               "processes" if run["split"] else "`evomerge serve --controller in-process` (API and "
               "controller in one process)" if run.get("in_process") else "`evomerge serve` (the API, and "
               "the controller as its supervised child process)")
        print(f"\nService: {how}, 127.0.0.1, {run.get('database', 'sqlite')}, {w} Ray workers, "
              f"noop evaluator, {run['optimizer']}")
        print(f"{'':22}{'trials/s':>9}{'worker busy':>13}{'worker idle':>13}{'Ray back':>10}"
              f"{'controller':>12}{'Ray start':>11}   CPU s")
        print(f"{'':22}{'':>9}{'ms p50':>13}{'ms p50/p99':>13}{'ms p50':>10}{'ms p50/p99':>12}{'ms p50':>11}")
        for name, ph in run["phases"].items():
            g = ph["gaps"]
            label = {"quiet": "no API traffic", "load": f"{args.clients} clients"}.get(
                name, f"{args.sse} SSE subscribers")
            cpu = ", ".join(f"{k} {v:.1f}" for k, v in ph["cpu_s"].items())
            print(f"{label:22}{ph['trials_per_s']:>9.1f}{g['worker_busy']['p50_ms']:>13.1f}"
                  f"{g['worker_idle']['p50_ms']:>7.1f}/{g['worker_idle']['p99_ms']:<5.0f}"
                  f"{g['ray_result_back']['p50_ms']:>10.1f}"
                  f"{g['controller']['p50_ms']:>6.1f}/{g['controller']['p99_ms']:<5.0f}"
                  f"{g['ray_dispatch']['p50_ms']:>11.1f}   {cpu} in {ph['seconds']:.0f} s")
        load = run["phases"]["load"]["api"]
        print(f"API under load: {load['clients']} closed-loop keep-alive clients (bench/http_load.py, "
              f"revalidating by ETag), {load['seconds']:.0f} s, while the study runs")
        print(f"{'endpoint':28}{'requests':>9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'bytes':>8}  statuses")
        for name, e in load["endpoints"].items():
            print(f"{name:28}{e['requests']:>9}{e['per_s']:>8.0f}{e['p50_ms']:>9.1f}{e['p99_ms']:>9.1f}"
                  f"{e['bytes']:>8}  {e.get('statuses')}")
        a = load["all"]
        kept = run["phases"]["load"]["trials_per_s"] / max(run["phases"]["quiet"]["trials_per_s"], 1e-9)
        print(f"{'all':28}{'':>9}{a['per_s']:>8.0f}{a['p50_ms']:>9.1f}{a['p99_ms']:>9.1f}   "
              f"controller kept {kept:.0%} of its trial rate")
        if load["errors"]:
            print(f"errors: {load['errors']}")
        sse = run["phases"].get("sse")
        if sse:
            st = sse["sse"]
            api_cpu = sse["cpu_s"].get("server", sse["cpu_s"].get("api", 0.0)) / sse["seconds"]
            print(f"SSE: {st['subscribers']} subscribers for {st['seconds']:.0f} s: "
                  f"{st['every_event_in_order']} received every event in order ({st['events']} events; "
                  f"all connected after {st['connect_s']:.1f} s); API process {api_cpu:.0%} of one core")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent API clients (default 50)")
    parser.add_argument("--seconds", type=float, default=20, help="length of each service phase (default 20)")
    parser.add_argument("--trials", type=int, default=1000, help="trials per controller-ceiling run")
    parser.add_argument("--parallelism", type=int, default=1,
                        help="slots of the instant pool (1: the overhead is one trial's round)")
    parser.add_argument("--optimizer", action="append", choices=OPTIMIZERS,
                        help="controller-ceiling optimizer (repeat; default: all three)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="Ray workers of the service run (default: the CPU count)")
    parser.add_argument("--skip-ceiling", action="store_true", help="skip the controller-alone runs")
    parser.add_argument("--skip-service", action="store_true", help="skip the service runs")
    parser.add_argument("--service", choices=("one", "in-process", "split", "both", "all"), default="both",
                        help="one: `evomerge serve` (its controller a child process); in-process: `evomerge "
                             "serve --controller in-process`; split: the API and `python -m "
                             "service.controller` started apart; both: one, then split (default); "
                             "all: the three")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                        help="the service's database (postgresql: a throw-away schema of the test server)")
    parser.add_argument("--sse", type=int, default=500, help="SSE subscribers of the last phase (0: none)")
    parser.add_argument("--sse-seconds", type=float, default=60.0, help="how long they are held")
    parser.add_argument("--sse-drain", type=float, default=30.0,
                        help="after the study is paused: how long the streams get to deliver")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import logging

    import torch

    from workers.synthetic import make_family

    torch.set_num_threads(1)
    logging.getLogger("evomerge").setLevel(logging.WARNING)
    figures: dict[str, Any] = {"cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="evomerge-api-load-") as tmp_name:
        tmp = Path(tmp_name)
        family = make_family("llama", tmp / "models", 2)
        ceiling = []
        if not args.skip_ceiling:
            for optimizer in args.optimizer or OPTIMIZERS:
                ceiling.append(controller_ceiling(family, tmp, optimizer, args.trials, args.parallelism))
                rate = ceiling[-1]["trials_per_s"]
                print(f"controller alone, {optimizer}: {rate:.1f} trials/s", flush=True)
        figures["controller"] = ceiling
        services = []
        if not args.skip_service:
            layouts = {"one": ["one"], "in-process": ["in-process"], "split": ["split"],
                       "both": ["one", "split"], "all": ["in-process", "one", "split"]}[args.service]
            for layout in layouts:
                with contextlib.ExitStack() as stack:
                    db_url = None
                    if args.database == "postgresql":
                        from service.db.testing import postgres_schema, postgres_url

                        db_url = stack.enter_context(postgres_schema(postgres_url()))
                    services.append(service_run(family, tmp, clients=args.clients, seconds=args.seconds,
                                                workers=args.workers, optimizer="optuna-cmaes",
                                                split=layout == "split", in_process=layout == "in-process",
                                                database_url=db_url, sse=args.sse,
                                                sse_seconds=args.sse_seconds, sse_drain=args.sse_drain))
        figures["service"] = services
    print_report(ceiling, services, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))
    return figures


if __name__ == "__main__":
    main()
