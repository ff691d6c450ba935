"""The embedded Ray (no ``RAY_ADDRESS``: ``evomerge serve`` starts one in-process, through
``workers.pool.init_ray``) is reachable from this machine only, and uses token authentication.

It runs in a subprocess of its own: this test session's Ray (the ``ray_local`` fixture) is
already started, and a process starts Ray once.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# What the controller does (init_ray with the settings' address, none here), then a task and an
# actor so that worker processes exist too; then every listening socket of Ray's processes: this
# process's descendants, and any process whose command line names this Ray session's folder.
PROBE = r"""
import json, os, sys
import psutil, ray
from service.settings import get_settings
from workers.pool import init_ray

init_ray(get_settings().ray_address)

@ray.remote
def pid():
    return os.getpid()

@ray.remote
class Pinger:
    def pid(self):
        return os.getpid()

pids = {ray.get(pid.remote()), ray.get(Pinger.remote().pid.remote())}
session = ray._private.worker._global_node.get_session_dir_path()
me = psutil.Process()
procs = {p.pid: p for p in [me, *me.children(recursive=True)]}
for p in psutil.process_iter(["cmdline"]):
    if session in " ".join(p.info["cmdline"] or []):
        procs.setdefault(p.pid, p)
sockets = []
for c in psutil.net_connections(kind="inet"):
    if c.pid in procs and (c.status == psutil.CONN_LISTEN or not c.raddr):
        sockets.append({"name": procs[c.pid].name(), "ip": c.laddr.ip, "port": c.laddr.port})
print(json.dumps({
    "sockets": sockets,
    "workers_seen": sorted(pids & set(procs)),
    "nodes": [n["NodeManagerAddress"] for n in ray.nodes()],
    "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    "token_in_env": bool(os.environ.get("RAY_AUTH_TOKEN")),
}))
ray.shutdown()
"""


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def test_the_embedded_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EVOMERGE_"))}
    env.update({"HOME": str(tmp_path), "EVOMERGE_DATA_DIR": str(tmp_path / "data"),
                "EVOMERGE_HOST": "0.0.0.0"})  # whatever the API's host, Ray stays on loopback
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    names = {s["name"] for s in report["sockets"]}
    assert {"gcs_server", "raylet"} <= names, report  # the probe saw Ray's servers
    assert report["workers_seen"], "the probe saw no worker process of its own"
    exposed = [s for s in report["sockets"] if not _loopback(s["ip"])]
    assert not exposed, f"the embedded Ray listens beyond loopback: {exposed}"
    assert report["nodes"] == ["127.0.0.1"]
    # token authentication, with the token in the environment its processes inherit (nothing on disk)
    assert report["auth_mode"] == "token" and report["token_in_env"]
    assert not (tmp_path / ".ray" / "auth_token").exists()
