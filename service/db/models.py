"""evomerge's tables (SQLAlchemy 2, typed declarative).

Every table name starts with ``em_``: Optuna's storage lives in the same database and
owns ``studies``, ``trials`` and friends (see ``OPTUNA_TABLES``). The schema changes only
through Alembic migrations in ``migrations/versions`` (``service.db.migrate``); a test
checks that these models and the migrated schema agree.

JSON columns are replaced, not mutated in place: ``trial.scores = {**trial.scores, "x": 1}``
(SQLAlchemy does not see ``trial.scores["x"] = 1``).
"""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.db.types import UTCDateTime, utcnow

TABLE_PREFIX = "em_"

#: Tables of Optuna's RDB storage (and its Alembic version table): never ours to touch.
OPTUNA_TABLES = frozenset(
    {
        "studies",
        "version_info",
        "study_directions",
        "study_user_attributes",
        "study_system_attributes",
        "trials",
        "trial_user_attributes",
        "trial_system_attributes",
        "trial_params",
        "trial_values",
        "trial_intermediate_values",
        "trial_heartbeats",
        "alembic_version",
    }
)

# Deterministic constraint names, so migrations can refer to them on both databases.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONValue = Any
# SQL NULL (not JSON null) for Python None, so "IS NULL" means "not set".
JsonColumn = JSON(none_as_null=True)
# BIGINT on PostgreSQL; INTEGER on SQLite, which autoincrements only an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def new_id() -> str:
    """A study id: 12 hex characters, short enough to type."""
    return uuid.uuid4().hex[:12]


class StudyStatus(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (StudyStatus.COMPLETED, StudyStatus.CANCELLED, StudyStatus.FAILED)


class TrialState(str, enum.Enum):
    PENDING = "pending"  # asked, not yet given to a worker
    RUNNING = "running"  # leased to a worker until lease_expires_at
    COMPLETE = "complete"  # scored and told to the optimizer
    FAILED = "failed"  # gave up (failure_reason says why)
    CANCELLED = "cancelled"  # its study was cancelled before it finished
    PRUNED = "pruned"  # stopped by multi-fidelity racing after a rung, with its partial scores

    @property
    def finished(self) -> bool:
        return self in (TrialState.COMPLETE, TrialState.FAILED, TrialState.CANCELLED, TrialState.PRUNED)


class ArtifactState(str, enum.Enum):
    PENDING = "pending"  # asked for; the controller has not started it
    RUNNING = "running"  # a worker is writing it
    READY = "ready"  # complete on disk: servable
    FAILED = "failed"
    EVICTED = "evicted"  # removed by the retention policy (ask again to rebuild it)


def _enum(cls: type[enum.Enum]) -> Enum:
    """A portable enum column: VARCHAR(16) holding the values, no native type, no CHECK.

    Adding a member needs no migration; SQLAlchemy refuses unknown values on write.
    """
    return Enum(
        cls,
        native_enum=False,
        create_constraint=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    __tablename__ = "em_studies"
    __table_args__ = (Index("ix_em_studies_status", "status"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=False)
    status: Mapped[StudyStatus] = mapped_column(_enum(StudyStatus), default=StudyStatus.QUEUED)
    owner: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    trials_done: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    trials_failed: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    elapsed_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    best_trial_number: Mapped[int | None] = mapped_column(Integer)
    best_value: Mapped[float | None] = mapped_column(Float)
    optuna_study_name: Mapped[str | None] = mapped_column(String(255), unique=True)
    optimizer_state: Mapped[bytes | None] = mapped_column(LargeBinary)
    error: Mapped[str | None] = mapped_column(Text)
    # what the study spent and saved (service/cost.py), recounted from its rows with every result
    cost: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)

    trials: Mapped[list[Trial]] = relationship(
        back_populates="study", order_by="Trial.number", passive_deletes=True, cascade="all, delete-orphan"
    )
    artifacts: Mapped[list[Artifact]] = relationship(
        back_populates="study", passive_deletes=True, cascade="all, delete-orphan"
    )

    def __repr__(self) -> str:
        return f"Study(id={self.id!r}, name={self.name!r}, status={self.status})"


class Trial(Base):
    __tablename__ = "em_trials"
    __table_args__ = (
        UniqueConstraint("study_id", "number", name="uq_em_trials_study_id_number"),
        Index("ix_em_trials_study_id_state", "study_id", "state"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("em_studies.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    point_id: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    recipe: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    scores: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    metrics: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    values: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    fitness: Mapped[float | None] = mapped_column(Float)
    state: Mapped[TrialState] = mapped_column(_enum(TrialState), default=TrialState.PENDING)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    timings: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200))
    # cost (service/cost.py): examples scored, tokens through the model, seconds on a worker;
    # a cache hit (``cached``) spent none of them
    examples: Mapped[int | None] = mapped_column(BigInteger)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    worker_seconds: Mapped[float | None] = mapped_column(Float)
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    rung: Mapped[int | None] = mapped_column(Integer)  # racing: the last rung scored (None: not raced)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    study: Mapped[Study] = relationship(back_populates="trials")

    def __repr__(self) -> str:
        return f"Trial(study_id={self.study_id!r}, number={self.number}, state={self.state})"


class Artifact(Base):
    __tablename__ = "em_artifacts"
    __table_args__ = (
        Index("ix_em_artifacts_study_id_trial_number", "study_id", "trial_number"),
        Index("ix_em_artifacts_state", "state"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("em_studies.id", ondelete="CASCADE"))
    trial_number: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    state: Mapped[ArtifactState] = mapped_column(_enum(ArtifactState), default=ArtifactState.PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    export_key: Mapped[str | None] = mapped_column(String(64), index=True)  # content address
    progress: Mapped[float | None] = mapped_column(Float)  # 0..1 while running
    requested_by: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_accessed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    download_lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())  # never evict before

    study: Mapped[Study] = relationship(back_populates="artifacts")


class Baseline(Base):
    """A reference score beside the search: a source model alone, or the uniform merge."""

    __tablename__ = "em_baselines"
    __table_args__ = (UniqueConstraint("study_id", "name", name="uq_em_baselines_study_id_name"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("em_studies.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))  # "source" | "uniform"
    recipe: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    state: Mapped[TrialState] = mapped_column(_enum(TrialState), default=TrialState.PENDING)
    scores: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    values: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    fitness: Mapped[float | None] = mapped_column(Float)
    heldout_scores: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    error: Mapped[str | None] = mapped_column(Text)
    examples: Mapped[int | None] = mapped_column(BigInteger)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    worker_seconds: Mapped[float | None] = mapped_column(Float)
    cached: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ScoreCacheEntry(Base):
    """Scores of one candidate on one evaluation, shared by every study (service/score_cache.py).

    ``key`` is the sha256 of the canonical recipe, the sha256 of the sources' weights, the
    evaluator spec and the example ids: a change to any part is a different key (a miss).
    """

    __tablename__ = "em_score_cache"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    parts: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)  # the key's parts, hashed
    scores: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    values: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    metrics: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)
    # what scoring it cost the first time: what every hit saves
    examples: Mapped[int | None] = mapped_column(BigInteger)
    tokens: Mapped[int | None] = mapped_column(BigInteger)
    worker_seconds: Mapped[float | None] = mapped_column(Float)
    hits: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WeightDigest(Base):
    """The sha256 of one weight file, kept while its size and modification time stay the same
    (a source is hashed once, not at every study)."""

    __tablename__ = "em_weight_digests"
    __table_args__ = (UniqueConstraint("path", "size_bytes", "mtime_ns",
                                       name="uq_em_weight_digests_path_size_bytes_mtime_ns"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Event(Base):
    """An append-only log; a dashboard follows it by ``id`` (``WHERE id > :last``)."""

    __tablename__ = "em_events"
    __table_args__ = (
        Index("ix_em_events_study_id_id", "study_id", "id"),
        {"sqlite_autoincrement": True},  # never reuse an id, even after deletes
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[str | None] = mapped_column(ForeignKey("em_studies.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(64))
    data: Mapped[JSONValue] = mapped_column(JsonColumn, nullable=True)


class ApiToken(Base):
    """An API token; only its SHA-256 is stored (see ``service.db.tokens``)."""

    __tablename__ = "em_api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    scopes: Mapped[str] = mapped_column(String(100), default="read,write,download",
                                        server_default="read,write,download")

    def __repr__(self) -> str:
        return f"ApiToken(name={self.name!r}, revoked={self.revoked})"


OUR_TABLES = frozenset(Base.metadata.tables)
assert all(name.startswith(TABLE_PREFIX) for name in OUR_TABLES)
assert not OUR_TABLES & OPTUNA_TABLES
