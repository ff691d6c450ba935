"""The FastAPI application: ``create_app(settings)`` (a factory; nothing runs at import).

Start-up migrates the database (idempotent), opens the engine, and — unless
``start_controller=False`` (tests, or an API-only replica) — starts the study controller: in a
thread, or with ``controller_process=True`` as a supervised child process (service/controller_process.py).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api import events, exports, studies
from service.api.deps import AppState, app_state
from service.api.guards import BodyGuard, add_error_handlers
from service.api.schemas import ErrorOut, HealthDegradedOut, HealthOut
from service.dashboard import router as dashboard_router
from service.settings import Settings, get_settings

VERSION = "0.1.0"
DESCRIPTION = """Evolutionary search for model-merge recipes, as a service.

Submit a study spec (docs/study-spec.md) with `POST /studies`, follow it with
`GET /studies/{id}/events` (server-sent events), read its best trial with
`GET /studies/{id}/best`. Every route but `/health` needs `Authorization: Bearer <token>`
when the server runs with `EVOMERGE_AUTH=true` (tokens: `evomerge token create NAME`).
All tokens see all studies; a study's `owner` is the name of the token that submitted it.
A web dashboard is served at `/` (its files are public; it calls this API with your token).
"""


def _start_controller(state: AppState, as_process: bool) -> Any:
    if as_process:  # a supervised child process (service/controller_process.py)
        from service.controller_process import ControllerProcess

        supervised = ControllerProcess(state.settings)
        supervised.start()
        return supervised
    try:
        from service.controller import Controller
    except ImportError as exc:
        raise RuntimeError(
            f"the study controller cannot be imported ({exc}); without it no study would ever run. "
            "Fix the installation, or start the API alone with create_app(..., start_controller=False)"
        ) from exc
    controller = Controller(state.settings, state.sessions)
    controller.start()
    return controller


def create_app(settings: Settings | None = None, *, start_controller: bool = True,
               controller_process: bool = False, poll_seconds: float = 0.5) -> FastAPI:
    """The API app for ``settings`` (default: from the environment, read now).

    ``controller_process``: run the controller as a supervised child process (``evomerge serve``'s
    default) rather than in a thread of this one.

    ``poll_seconds``: how often the event streams' poller (one per followed study) reads the database.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from service.db import make_engine, session_factory, upgrade

        if settings.database_url.startswith("sqlite"):
            settings.ensure_dirs()
        await run_in_threadpool(upgrade, settings.database_url)
        engine = make_engine(settings.database_url)
        state = AppState(settings=settings, engine=engine, sessions=session_factory(engine),
                         poll_seconds=poll_seconds)
        state.hub = events.EventHub(state)  # one poller per followed study, for all its subscribers
        try:
            if start_controller:
                state.controller = await run_in_threadpool(_start_controller, state, controller_process)
            app.state.evomerge = state
            yield
        finally:
            app.state.evomerge = None
            await state.hub.close()
            if state.controller is not None:
                await run_in_threadpool(state.controller.stop)
            engine.dispose()

    app = FastAPI(title="evomerge", version=VERSION, description=DESCRIPTION, lifespan=lifespan,
                  responses=COMMON_RESPONSES)
    app.add_middleware(BodyGuard, max_body_bytes=settings.max_body_bytes)
    add_error_handlers(app)
    app.include_router(studies.router)
    app.include_router(events.router)
    app.include_router(exports.router)
    app.include_router(dashboard_router)  # the web dashboard at / (static files; data from the API)

    @app.get("/health", response_model=HealthOut, tags=["service"], summary="Is the service up?",
             responses={503: {"model": HealthDegradedOut,
                              "description": "starting up, or degraded: the database does not answer, "
                                             "the data disk is (nearly) full or read-only, or the study "
                                             "controller is stalled on a write fault, or its process is "
                                             "down (until it is started again)"}})
    def health(state: AppState = Depends(app_state)) -> Any:
        """No token needed. Checks that the database answers, that the data directory has space
        (EVOMERGE_MIN_FREE_BYTES) and can be written, and that the study controller is not stalled (nor
        its process down). `controller`: is it up, how often was it restarted."""
        problems = _health_problems(state)
        report = getattr(state.controller, "health", None)  # is it up, how often was it restarted
        controller = report() if callable(report) else None
        if problems:
            degraded = HealthDegradedOut(detail="; ".join(problems), problems=problems, version=VERSION,
                                         database=state.engine.dialect.name, auth=settings.auth,
                                         controller=controller)
            return JSONResponse(degraded.model_dump(mode="json"), status_code=503)
        return HealthOut(version=VERSION, database=state.engine.dialect.name, auth=settings.auth,
                         controller=controller)

    _add_spec_schema(app)
    return app


COMMON_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorOut, "description": "the JSON body nests too deeply"},
    413: {"model": ErrorOut, "description": "the body is larger than this route accepts"},
    503: {"model": ErrorOut, "description": "the database cannot be reached or written; try again later"},
    507: {"model": ErrorOut, "description": "the server's disk is full: nothing can be stored until an "
                                            "administrator frees space"},
}


def _health_problems(state: AppState) -> list[str]:
    """What keeps the service from working, one line each (empty: healthy)."""
    problems: list[str] = []
    try:
        with state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        problems.append(f"the database does not answer: {type(exc).__name__}")
    problems.extend(_disk_problems(state.settings))
    down = getattr(state.controller, "problem", None)  # a supervised controller process that is down
    why = down() if callable(down) else None
    if why:
        problems.append(why)
    fault = getattr(state.controller, "fault", None)
    if fault is not None:
        problems.append(f"the study controller is stalled since {fault.since:%Y-%m-%d %H:%M:%S} UTC: "
                        f"{fault.reason}")
    return problems


def _disk_problems(settings: Settings) -> list[str]:
    """The data directory's free space and writability (never its path: /health is public)."""
    from service.faults import free_bytes, write_probe

    free = free_bytes(settings.data_dir)
    if free is None:  # no data directory (an API-only replica on PostgreSQL): nothing to check
        return []
    if free < settings.min_free_bytes:
        return [f"the data directory's disk has {free} bytes free, less than EVOMERGE_MIN_FREE_BYTES "
                f"({settings.min_free_bytes}): free space there (old exports can go), or the studies stall"]
    why = write_probe(settings.data_dir)
    if why is not None:
        return [f"the data directory (EVOMERGE_DATA_DIR) cannot be written: {why}"]
    return []


def _add_spec_schema(app: FastAPI) -> None:
    """Put the study spec's JSON schema (and its parts) into the OpenAPI components, for the
    request body of ``POST /studies`` (read raw there, to accept YAML as well as JSON)."""
    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        from service.spec import StudySpec

        schema = plain_openapi()
        spec_schema = copy.deepcopy(StudySpec.model_json_schema(ref_template="#/components/schemas/{model}"))
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, part in spec_schema.pop("$defs", {}).items():
            components.setdefault(name, part)
        components["StudySpec"] = spec_schema
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
