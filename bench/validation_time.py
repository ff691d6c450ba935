"""How long the API takes to refuse hostile study specs (issue 13: every spec within 2 s).

Each case is a spec an attacker or a careless client could send. It is submitted over
HTTP to a live API (SQLite, no controller) on 127.0.0.1, one at a time, and the time to
the answer is measured (median and max of ``--repeat`` runs, after one warm-up run).

    .venv/bin/python bench/validation_time.py [--repeat 3]

Prints one row per case: the status and the seconds, and the slowest case last.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cases(llama: tuple[Path, list[Path]], root: Path) -> dict[str, tuple[str, bytes]]:
    from service.spec import DEMO_EXAMPLE

    base, (e0, e1) = llama
    spec: dict[str, Any] = copy.deepcopy(DEMO_EXAMPLE)
    spec.pop("heldout")
    spec.update(sources=[str(e0), str(e1)], base_model=str(base),
                evaluation={"evaluator": "noop", "objectives": [{"task": "t", "metric": "m"}]})

    def with_(**changes: Any) -> tuple[str, bytes]:
        data = {**copy.deepcopy(spec), **changes}
        return "application/json", json.dumps(data).encode()

    huge = root / "huge-tasks"
    huge.mkdir(exist_ok=True)
    for i in range(5000):
        (huge / f"f{i}").touch()
    unknown = [{"task": f"unknown_task_{i}", "metric": "exact_match"} for i in range(10_000)]
    deep = "[" * 100_000 + "]" * 100_000
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(10))
    return {
        "a valid spec (noop evaluator)": with_(),
        "10,000 objectives naming unknown tasks": with_(evaluation={"evaluator": "lm_eval",
                                                                    "objectives": unknown}),
        "32 objectives naming unknown tasks (lm-eval index)": with_(
            evaluation={"evaluator": "lm_eval", "objectives": unknown[:32]}),
        "cma population_size 1e7": with_(optimizer={"name": "cma", "population_size": 10**7}),
        "granularity 1e9": with_(space={"kind": "parameter", "method": "ties", "granularity": 10**9}),
        "evomerge:/etc": with_(evaluation={"evaluator": "lm_eval", "objectives": unknown[:1],
                                           "options": {"task_dirs": ["evomerge:/etc"]}}),
        "a task folder of 5,000 files": with_(
            evaluation={"evaluator": "lm_eval", "objectives": unknown[:1],
                        "options": {"task_dirs": [str(huge)]}}),
        "100,000 levels of nesting": ("application/json",
                                      json.dumps(spec)[:-1].encode() + f', "x": {deep}}}'.encode()),
        "a YAML alias bomb": ("application/yaml", bomb.encode()),
        "a 5,000-digit integer": ("application/json",
                                  json.dumps(spec)[:-1].encode() + b', "seed": ' + b"9" * 5000 + b"}"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    import httpx
    import torch

    torch.set_num_threads(1)
    from service.app import create_app
    from service.settings import get_settings
    from tests.api_fixtures import LiveServer
    from workers.synthetic import make_family

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        llama = make_family("llama", root / "llama", 2)
        settings = get_settings(data_dir=Path(tmp) / "data", database_url=f"sqlite:///{tmp}/bench.db",
                                model_roots=[str(root)])
        with LiveServer(create_app(settings, start_controller=False)) as url, \
                httpx.Client(base_url=url, timeout=300) as client:
            rows = []
            for name, (kind, body) in cases(llama, root).items():
                deadline = time.monotonic() + 180  # a 503: lm-eval's index is being built in the background
                headers = {"Content-Type": kind}
                while client.post("/studies", content=body, headers=headers).status_code == 503:
                    assert time.monotonic() < deadline, "the task index was never built"
                    time.sleep(2)
                times, status = [], None
                for i in range(args.repeat):
                    fresh = body.replace(b"unknown_task_", f"unknown_{i}_task_".encode())  # no cache hits
                    start = time.perf_counter()
                    r = client.post("/studies", content=fresh, headers=headers)
                    times.append(time.perf_counter() - start)
                    status = r.status_code
                rows.append((name, status, statistics.median(times), max(times)))
                print(f"{name:<55} {status}  median {statistics.median(times):6.3f} s  "
                      f"max {max(times):6.3f} s", flush=True)
    worst = max(rows, key=lambda r: r[3])
    print(f"\nslowest: {worst[0]}: {worst[3]:.3f} s (goal: under 2 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
