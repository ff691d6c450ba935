"""What one worker may use: its device's and its host's memory, from settings or
detected on the machine (torch-free; a worker asks torch for its GPU's free memory only
if torch is already imported)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from workers.memory_facts import DEVICES, MAX_BYTES, _check_count


@dataclass(frozen=True)
class WorkerLimits:
    """What one worker may use: its device's memory and its host's (None: unknown). On a CPU
    worker the device is the host: the smaller known of the two is its budget."""

    device: str  # "cpu" or "cuda"
    device_bytes: int | None
    host_bytes: int | None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"WorkerLimits.device {self.device!r} is not one of {', '.join(DEVICES)}")
        for key in ("device_bytes", "host_bytes"):
            value = getattr(self, key)
            if value is not None:
                _check_count("WorkerLimits", **{key: value})

    @property
    def cpu_budget(self) -> int | None:
        known = [b for b in (self.device_bytes, self.host_bytes) if b is not None]
        return min(known) if known else None


def _meminfo_bytes(*, available: bool, path: Path = Path("/proc/meminfo")) -> int | None:
    """This machine's MemAvailable (``available``; else or failing that MemTotal), in bytes."""
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    except (OSError, ValueError):
        return None
    for key in (("MemAvailable", "MemTotal") if available else ("MemTotal",)):
        parts = fields.get(key, "").split()
        if parts and parts[0].isdigit():
            return int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return None


def _cgroup_limit_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[2].startswith("/") and parts[1] in ("", "memory"):
                sub = parts[2].lstrip("/")
                candidates.insert(0, (root / sub / "memory.max") if parts[1] == "" else
                                  (root / "memory" / sub / "memory.limit_in_bytes"))
    except OSError:
        pass
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < MAX_BYTES:  # v1 writes ~2^63 for "no limit", v2 "max"
            return int(text)
    return None


def detect_host_bytes(*, available: bool = True) -> int | None:
    """This machine's memory, capped by its cgroup limit: what is available now (MemAvailable, for a
    worker at start), or its total (MemTotal, for a plan that must not change with what else runs)."""
    known = [b for b in (_meminfo_bytes(available=available), _cgroup_limit_bytes()) if b is not None]
    return min(known) if known else None


def detect_local_limits(device: str) -> WorkerLimits:
    """The limits of a worker on this machine. A GPU's memory is measured only where torch is
    already imported (a worker): this module never imports torch, so elsewhere it is None."""
    host = detect_host_bytes()
    if device == "cpu":
        return WorkerLimits(device="cpu", device_bytes=host, host_bytes=host)
    torch = sys.modules.get("torch")
    device_bytes = None
    if torch is not None and torch.cuda.is_available():
        device_bytes = int(torch.cuda.mem_get_info()[0])
    return WorkerLimits(device="cuda", device_bytes=device_bytes, host_bytes=host)


def limits_from_settings(*, num_gpus: float, device_memory: int | None = None, host_memory: int | None = None,
                         remote: bool = False, workers_per_host: int = 1) -> WorkerLimits:
    """A worker's limits from the server's settings (EVOMERGE_WORKER_DEVICE_MEMORY,
    EVOMERGE_WORKER_HOST_MEMORY). Unset, the host's memory is this machine's total (MemTotal,
    so that a study's plan does not change with what else runs) shared by the
    ``workers_per_host`` local workers, unless the workers run elsewhere (``remote``: a Ray
    cluster), where it is unknown; a GPU's memory is unknown (the worker measures it at start)."""
    device = "cuda" if num_gpus > 0 else "cpu"
    host = host_memory
    if host is None and not remote:
        detected = detect_host_bytes(available=False)
        host = detected // max(1, min(workers_per_host, 1024)) if detected is not None else None
    if device == "cpu":
        return WorkerLimits(device="cpu", device_bytes=host, host_bytes=host)
    return WorkerLimits(device="cuda", device_bytes=device_memory, host_bytes=host)


# ---- the plan ----------------------------------------------------------------------------
