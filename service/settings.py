"""The service's settings, read from ``EVOMERGE_*`` environment variables.

Nothing here runs at import time: ``get_settings()`` builds a fresh ``Settings`` each call
(the app factory calls it once and keeps the result), and no directory is created until
``Settings.ensure_dirs()`` is called.

List settings take JSON (``EVOMERGE_MODEL_ROOTS='["/models", "/zoo"]'``) or a plain list:
paths separated by ``os.pathsep`` (``/models:/zoo``), hub patterns by commas
(``EVOMERGE_HUB_ALLOWLIST='meta-llama/*,Qwen/Qwen2.5-*'``).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from workers.memory_plan import MAX_BYTES, WorkerLimits, limits_from_settings, parse_size  # torch-free

DEFAULT_DATA_DIR = Path("./evomerge-data")
ZOO_CACHE = Path("~/.cache/evomerge/zoo")


class SettingsError(ValueError):
    """The settings are inconsistent; the message says which variable to change."""


def _split_list(value: Any, sep: str) -> Any:
    """Accept a JSON list or a ``sep``-separated string for a list setting."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [part.strip() for part in text.split(sep) if part.strip()]


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the API, controller and workers are configured with."""

    model_config = SettingsConfigDict(env_prefix="EVOMERGE_", extra="ignore", validate_default=True)

    data_dir: Path = Field(DEFAULT_DATA_DIR, description="where the SQLite file, exports and models live")
    database_url: str = Field(
        "", description="SQLAlchemy URL; default sqlite:///<data_dir>/evomerge.db; postgresql://... works"
    )
    ray_address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else local")
    model_roots: Annotated[list[Path], NoDecode] = Field(
        None,  # type: ignore[assignment]  # derived from data_dir by _roots below
        description="folders local models may be read from; default <data_dir>/models and the zoo cache",
    )
    hub_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="fnmatch patterns of allowed hub ids; empty: no hub ids"
    )
    auth: bool = Field(False, description="require an API token; off is only allowed on a loopback host")
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=1, le=65535)
    trust_remote_code: bool = False
    worker_num_cpus: float = Field(1.0, ge=0)
    worker_num_gpus: float = Field(0.0, ge=0)
    worker_threads: int = Field(1, ge=1)
    max_workers: int = Field(2, ge=1)
    lease_seconds: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(1_000_000, gt=0)
    min_free_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="/health reports degraded (503) when the data directory's disk "
        "has less free space than this")
    export_budget_bytes: int | None = Field(
        None, ge=0, description="disk budget for exports under data_dir/exports; over it, least recently "
        "used exports that are not a study's best (nor being downloaded) are evicted. None: no limit")
    export_shard_size: str = Field("5GB", description="safetensors shard size of exported models")
    worker_device_memory: int | None = Field(
        None, ge=1, le=MAX_BYTES, description="GPU memory of one worker ('80GB', '24GiB' or bytes); unset: "
        "unknown at submission (each GPU worker measures its own at start). Not used by CPU workers")
    worker_host_memory: int | None = Field(
        None, ge=1, le=MAX_BYTES, description="host memory of one worker ('128GB', '64GiB' or bytes); unset: "
        "this machine's memory (MemTotal, capped by its cgroup limit) shared by EVOMERGE_MAX_WORKERS local "
        "workers, or unknown when the workers run on a Ray cluster (EVOMERGE_RAY_ADDRESS)")
    score_cache: bool = Field(
        True, description="reuse the scores of a candidate scored before, in any study "
        "(service/score_cache.py); false: every candidate is scored, nothing is looked up or stored")

    @field_validator("data_dir")
    @classmethod
    def _expand_data_dir(cls, value: Path) -> Path:
        return value.expanduser()

    @field_validator("database_url")
    @classmethod
    def _default_database(cls, value: str, info: ValidationInfo) -> str:
        if value.strip():
            return value.strip()
        data_dir = info.data.get("data_dir", DEFAULT_DATA_DIR)
        return f"sqlite:///{data_dir.resolve() / 'evomerge.db'}"

    @field_validator("ray_address")
    @classmethod
    def _ray_from_environment(cls, value: str | None) -> str | None:
        return value or os.environ.get("RAY_ADDRESS") or None

    @field_validator("model_roots", mode="before")
    @classmethod
    def _roots(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return [info.data.get("data_dir", DEFAULT_DATA_DIR) / "models", ZOO_CACHE]
        return _split_list(value, os.pathsep)

    @field_validator("model_roots")
    @classmethod
    def _expand_roots(cls, value: list[Path]) -> list[Path]:
        return [p.expanduser() for p in value]

    @field_validator("hub_allowlist", mode="before")
    @classmethod
    def _split_hub(cls, value: Any) -> Any:
        return _split_list(value, ",")

    @field_validator("worker_device_memory", "worker_host_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return parse_size(value)

    # -- checks the server runs before it binds ---------------------------------------

    def check(self) -> Settings:
        """Refuse settings the server must not start with; returns self for chaining."""
        if not self.auth and not is_loopback(self.host):
            raise SettingsError(
                f"auth is off but the server would listen on {self.host!r}, which other machines can reach. "
                "Either set EVOMERGE_AUTH=true (and create a token with `evomerge token create NAME`) "
                "or set EVOMERGE_HOST=127.0.0.1."
            )
        return self

    # -- helpers for validation --------------------------------------------------------

    def ensure_dirs(self) -> None:
        """Create the data directory (and its models folder); called at start-up, never at import."""
        (self.data_dir / "models").mkdir(parents=True, exist_ok=True)

    def check_data_dir(self, setting: str = "EVOMERGE_DATA_DIR") -> Settings:
        """Create the data directory if needed and check that it can be written (a small file is
        written and deleted there), and the SQLite database's folder too; else a SettingsError in
        one line: the path, why, and the setting to change. Returns self for chaining."""
        from service.faults import write_probe

        why: str | None
        try:
            self.ensure_dirs()
            why = write_probe(self.data_dir)
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
        if why is not None:
            raise SettingsError(
                f"the data directory {self.data_dir} cannot be written ({why}): set {setting} to a writable "
                "directory (it holds the SQLite database, the exports and the models folder)")
        folder = self._sqlite_folder()
        if folder is not None and folder.resolve() != self.data_dir.resolve():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                why = write_probe(folder)
            except OSError as exc:
                why = exc.strerror or type(exc).__name__
            if why is not None:
                raise SettingsError(f"the SQLite database's folder {folder} cannot be written ({why}): set "
                                    "EVOMERGE_DATABASE_URL to a file in a writable folder")
        return self

    def _sqlite_folder(self) -> Path | None:
        """The folder of the SQLite database file, None for PostgreSQL or an in-memory database."""
        url = self.database_url
        if not url.startswith("sqlite:///") or url.startswith("sqlite:///:memory:") or "mode=" in url:
            return None
        path = url[len("sqlite:///"):].split("?", 1)[0]
        return Path(path).expanduser().parent if path else None

    def worker_limits(self) -> WorkerLimits:
        """What one trial worker may use, as study validation plans it (workers.memory_plan)."""
        return limits_from_settings(
            num_gpus=self.worker_num_gpus, device_memory=self.worker_device_memory,
            host_memory=self.worker_host_memory, remote=bool(self.ray_address),
            workers_per_host=self.max_workers)

    def hub_id_allowed(self, hub_id: str) -> bool:
        """True when ``hub_id`` matches one of ``hub_allowlist`` (case-sensitive fnmatch)."""
        return any(fnmatch.fnmatchcase(hub_id, pattern) for pattern in self.hub_allowlist)

    def path_allowed(self, path: str | Path) -> bool:
        """True when ``path`` (symlinks resolved) lies inside one of ``model_roots``."""
        target = Path(path).expanduser().resolve()
        return any(target.is_relative_to(root.resolve()) for root in self.model_roots)


def get_settings(**overrides: Any) -> Settings:
    """Read the settings from the environment now; keyword arguments win over it."""
    return Settings(**overrides)
