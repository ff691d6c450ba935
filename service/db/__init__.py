"""evomerge's database: models, engines and sessions, migrations, API tokens.

Typical start-up::

    from service.db import make_engine, session_factory, upgrade
    upgrade(settings.database_url)            # idempotent, safe with several processes
    engine = make_engine(settings.database_url)
    Session = session_factory(engine)
    with Session.begin() as session:
        session.add(Study(name="demo", spec={...}))
"""

from service.db.engine import make_engine, normalize_url, redact_url, session_factory, url_string
from service.db.migrate import MigrationError, current, downgrade, head, schema_differences, upgrade
from service.db.models import (
    OPTUNA_TABLES,
    OUR_TABLES,
    ApiToken,
    Artifact,
    ArtifactState,
    Base,
    Baseline,
    Event,
    ScoreCacheEntry,
    Study,
    StudyStatus,
    Trial,
    TrialState,
    WeightDigest,
    new_id,
)
from service.db.optuna_storage import optuna_storage
from service.db.tokens import TokenError, create_token, list_tokens, revoke_token, verify_token
from service.db.types import UTCDateTime, utcnow

__all__ = [
    "OPTUNA_TABLES",
    "OUR_TABLES",
    "ApiToken",
    "Artifact",
    "ArtifactState",
    "Base",
    "Baseline",
    "Event",
    "MigrationError",
    "ScoreCacheEntry",
    "Study",
    "StudyStatus",
    "TokenError",
    "Trial",
    "TrialState",
    "UTCDateTime",
    "WeightDigest",
    "create_token",
    "current",
    "downgrade",
    "head",
    "list_tokens",
    "make_engine",
    "new_id",
    "normalize_url",
    "optuna_storage",
    "redact_url",
    "revoke_token",
    "schema_differences",
    "session_factory",
    "upgrade",
    "url_string",
    "utcnow",
    "verify_token",
]
