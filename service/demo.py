"""``evomerge demo``: the whole product on the embedded defaults, acting as a user would.

1. builds the demo zoo (cached after the first run: ``evomerge zoo build``);
2. starts ``evomerge serve`` (SQLite under the data directory, local Ray, 127.0.0.1);
3. submits the demo study over REST (``service.spec.DEMO_EXAMPLE``: TIES over the
   zoo's two experts, CMA-ES, the target task, a held-out split) and shows its progress
   with the dashboard's address;
4. downloads the best model through the API (``evomerge download``), loads it with
   transformers, scores it on the target's search and held-out splits;
5. prints the table: each source model, the uniform merge, plain task arithmetic (the
   study's baselines, scored by the service) and the evolved merge, and the time taken.

``--serve`` leaves the service running afterwards (for the dashboard) until Ctrl-C.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TARGET, HELDOUT = "zoo_xl_add", "zoo_xl_add_heldout"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_spec(trials: int | None = None, seed: int | None = None) -> dict[str, Any]:
    from service.spec import DEMO_EXAMPLE

    spec = copy.deepcopy(DEMO_EXAMPLE)
    if trials is not None:
        spec["budget"] = {**spec.get("budget", {}), "max_trials": trials}
    if seed is not None:
        spec["seed"] = seed
    return spec


class ServiceProcess:
    """``evomerge serve`` in its own process group (stopped with the whole group)."""

    def __init__(self, data_dir: Path, port: int, log_path: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOMERGE_") and k != "RAY_ADDRESS"}
        env.update(EVOMERGE_DATA_DIR=str(data_dir), EVOMERGE_PORT=str(port), EVOMERGE_HOST="127.0.0.1",
                   HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"))
        exe = Path(sys.executable).with_name("evomerge")
        cmd = [str(exe), "serve"] if exe.exists() else [sys.executable, "-m", "service.cli", "serve"]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen([*cmd, "--log-level", "warning"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout: float = 120.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with code {self.proc.returncode}; "
                                   f"see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the service did not answer on {self.url} within {timeout:.0f} s; "
                           f"see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray's processes too
        except ProcessLookupError:
            pass
        self.log.close()


def score_folder(folder: Path) -> dict[str, float]:
    """The downloaded model, loaded with transformers, on the target's two splits."""
    import torch
    from transformers import AutoModelForCausalLM

    from workers.zoo.score import exact_match
    from workers.zoo.skills import evaluation_splits

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    splits = evaluation_splits()
    return {name: exact_match(model, splits[name.removeprefix("zoo_")]) for name in (TARGET, HELDOUT)}


def _score(scores: dict[str, Any] | None, task: str) -> float | None:
    for key, value in (scores or {}).items():
        if key.split("/")[0] == task:
            return float(value)
    return None


def result_table(baselines: list[dict[str, Any]], evolved: dict[str, float], best: dict[str, Any]) -> str:
    def fmt(v: float | None) -> str:
        return "   -  " if v is None else f"{v:6.3f}"

    lines = [f"{'model':36s} {'search':>8s} {'held-out':>9s}", "-" * 55]
    for b in baselines:  # held-out scores keep the objective's key (zoo_xl_add/...)
        lines.append(f"{b['name']:36s} {fmt(_score(b.get('scores'), TARGET)):>8s} "
                     f"{fmt(_score(b.get('heldout_scores'), TARGET)):>9s}")
    lines.append(f"{'evolved merge (trial ' + str(best['number']) + ')':36s} "
                 f"{fmt(evolved.get(TARGET)):>8s} {fmt(evolved.get(HELDOUT)):>9s}")
    return "\n".join(lines)


def run_demo(*, data_dir: Path, trials: int | None = None, seed: int | None = None, serve: bool = False,
             port: int | None = None, out: Path | None = None, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The demo flow; returns what it printed as data (for tests)."""
    from service.api.client import Client
    from service.cli_client import watch
    from service.download import download
    from workers.zoo.build import build_zoo

    start = time.monotonic()
    data_dir = data_dir.expanduser().resolve()
    log("1/5 the demo zoo: tiny models that know two toy languages (built once, then cached)")
    zoo = build_zoo(None, log=lambda line: log(f"    {line}"))  # silent when cached
    log(f"    {zoo.root}")
    port = port or (8765 if _port_free(8765) else _free_port())
    service = ServiceProcess(data_dir, port, data_dir / "demo-service.log")
    try:
        log(f"2/5 starting the service on {service.url} (SQLite and exports under {data_dir}, local Ray)")
        service.wait_healthy()
        with Client(service.url) as client:
            spec = demo_spec(trials, seed)
            study = client.submit(json.dumps(spec).encode(), "application/json")
            sid = study["id"]
            log(f"3/5 submitted the demo study {sid}: {spec['space']['method']} (its search defaults) over "
                f"{', '.join(spec['sources'])}, {spec['optimizer']['name']}, "
                f"{spec['budget']['max_trials']} trials")
            log(f"    watch it live: {service.url}/#/studies/{sid}")
            if watch(client, study) != 0:
                raise RuntimeError(f"the demo study did not complete: {client.study(sid).get('error')}")
            best = client.best(sid)
            assert best is not None
            out = out or data_dir / "demo-best-model"
            log(f"4/5 downloading the best merge (trial {best['number']}) through the API to {out}")
            download(client, sid, out)
            evolved = score_folder(out)
            baselines = client.request("GET", f"/studies/{sid}/baselines")
        seconds = time.monotonic() - start
        table = result_table(baselines, evolved, best)
        log(f"5/5 exact match on the target task ({TARGET}: two-digit addition written in the xl "
            f"language, which no source model can do)\n\n{table}\n\ndone in {seconds / 60:.1f} min")
        if serve:
            log(f"\nthe service keeps running: {service.url}/#/studies/{sid}  (Ctrl-C stops it)")
            try:
                service.proc.wait()
            except KeyboardInterrupt:
                pass
        return {"study": sid, "baselines": baselines, "evolved": evolved, "best": best, "seconds": seconds,
                "table": table, "url": service.url}
    finally:
        service.stop()
