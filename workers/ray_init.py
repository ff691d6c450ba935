"""Starting Ray: join a cluster, or start a local one that only this machine can reach.

The embedded default (no ``RAY_ADDRESS``) binds every Ray server to loopback and turns on
token authentication (docs/workers.md, "Local or cluster").
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
from collections.abc import Iterator
from typing import Any


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``); with neither, start a local Ray in-process, bound to
    loopback and with token authentication (:func:`start_local_ray`)."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    opts: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    opts.update(kwargs)
    if not address:
        start_local_ray(**opts)
        return
    opts.pop("num_cpus", None)
    with _loopback_kept() if _is_loopback(address) else contextlib.nullcontext():
        ray.init(address=address, **opts)


def start_local_ray(**opts: Any) -> None:
    """``ray.init()`` of a single-machine Ray that nobody else can reach: its servers (GCS,
    raylet, workers, agents) on loopback only (:func:`_loopback_kept`), and token
    authentication, the same for every process (:func:`local_ray_auth`)."""
    import ray

    local_ray_auth()
    opts.setdefault("_node_ip_address", "127.0.0.1")
    with _loopback_kept():
        ray.init(**opts)


@contextlib.contextmanager
def _loopback_kept() -> Iterator[None]:
    """While it lasts, Ray keeps ``127.0.0.1`` as it is.

    Ray's servers bind 127.0.0.1 only when the node's address is exactly ``127.0.0.1``, but on
    Linux Ray replaces that address (a node's, or a cluster address to join) with the machine's
    own, unless it believes it cannot form clusters (its Windows/macOS mode). That belief is
    switched on here, for ``ray.init`` alone: a local Ray then listens on loopback only, and a
    process joining it at ``127.0.0.1:port`` reaches it there.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _is_loopback(address: str) -> bool:
    """Is ``host:port`` on this machine's loopback (``ray://`` client addresses never are)?"""
    if "://" in address:
        return False
    host = address.rpartition(":")[0].strip("[]") or address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_ray_auth() -> None:
    """Token authentication for the embedded Ray, consistent across its processes.

    ``RAY_AUTH_MODE`` is respected when set; unset, Ray itself turns token mode on for the
    cluster it starts (and writes it into this process's environment, which Ray's processes
    inherit). Where token mode would find no token, a random one is put in ``RAY_AUTH_TOKEN``
    of this process's environment, inherited the same way, rather than letting Ray write one
    under ``~/.ray``.
    """
    if os.environ.get("RAY_AUTH_MODE", "token").strip().lower() != "token":
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    if os.path.isfile(os.path.expanduser("~/.ray/auth_token")):
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
