"""Study routes: submit, list, inspect, pause / resume / cancel, delete.

The REST layer never talks to workers: it validates and stores a study (status
``queued``) and changes statuses; the controller (``service.controller``) does the rest.
The rows are read and written by :mod:`service.api.study_rows`; the two reads a dashboard
repeats (a study, a trials page) by :mod:`service.api.study_reads`, with ETags.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import func, select

from service.api import trial_pages as pages
from service.api.deps import READ, WRITE, AppState, app_state
from service.api.schemas import (
    BaselineOut,
    ErrorOut,
    Page,
    ProblemsOut,
    StudyOut,
    TrialOut,
    TrialPage,
)
from service.api.study_reads import study_out, study_response, trials_response
from service.api.study_rows import (
    delete_if_idle,
    get_study_row,
    multi_objective,
    store_study,
    transition,
)
from service.db.models import Baseline, Study, StudyStatus, Trial, TrialState
from service.pareto import pareto_front
from service.spec import StudySpec, StudyValidationError
from service.stored_study import StoredStudy

router = APIRouter(prefix="/studies", tags=["studies"])
_get_study = get_study_row  # the name service.api.exports imports

# text that reaches SQL never holds NUL: PostgreSQL refuses it (a 500 otherwise)
NO_NUL = r"^[^\x00]*$"
StudyId = Annotated[str, Path(description="the study's id (from POST /studies)", max_length=36,
                              pattern=NO_NUL, examples=["a1b2c3d4e5f6"])]
_E401 = {401: {"model": ErrorOut, "description": "no or an invalid bearer token (when auth is on)"},
         403: {"model": ErrorOut, "description": "the token lacks the scope this route needs"}}
_E404 = {404: {"model": ErrorOut, "description": "no such study"}}
_E409 = {409: {"model": ErrorOut, "description": "the study's status does not allow this"}}

SPEC_TYPES = ("application/json", "application/yaml", "text/yaml", "application/x-yaml")
_YAML_EXAMPLE = """name: "zoo: xl addition by per-layer TIES"
sources: [v2-seed0/math, v2-seed0/language]
base_model: v2-seed0/base
space: {kind: parameter, method: ties, granularity: 1, weight_range: [0, 2], search_density: false,
        parameters: {density: 1.0, normalize: false}}
evaluation:
  objectives: [{task: zoo_xl_add, metric: exact_match, limit: 200}]
  options: {task_dirs: ["evomerge:zoo"]}
budget: {max_trials: 300}
"""


def refuse_if_unwritable(state: AppState, what: str) -> None:
    """507 / 503 before any work when nothing could be stored: the controller is stalled on a write
    fault, or the data directory's disk has less than EVOMERGE_MIN_FREE_BYTES free."""
    from service.faults import free_bytes

    fault = getattr(state.controller, "fault", None)
    if fault is not None:
        raise HTTPException(fault.status_code, f"cannot {what} now: {fault.reason}",
                            headers={"Retry-After": "30"})
    free = free_bytes(state.settings.data_dir)
    if free is not None and free < state.settings.min_free_bytes:
        raise HTTPException(507, f"cannot {what} now: the server's data disk has {free} bytes free, less "
                                 f"than EVOMERGE_MIN_FREE_BYTES ({state.settings.min_free_bytes}); an "
                                 "administrator must free space first (old exports can go)",
                            headers={"Retry-After": "30"})


# ---- submit ------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, _too_large(int(declared), limit))
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise HTTPException(413, _too_large(len(body), limit, at_least=True))
    return bytes(body)


def _too_large(size: int, limit: int, *, at_least: bool = False) -> str:
    return (f"the request body is {'more than ' if at_least else ''}{size} bytes; this server accepts "
            f"at most {limit} (EVOMERGE_MAX_BODY_BYTES): a study spec names its models, "
            "it does not carry them")


def _create(state: AppState, body: bytes, owner: str) -> StudyOut:
    """Validate (reads model headers: blocking) and store a study; runs in a threadpool."""
    from evaluators.validation import IndexNotReady, builtin_index_policy
    from service.study_refs import submission_folder
    from service.validation import validate_study  # imports the evaluator registry lazily

    def other_study(ref: Any) -> Any:  # {study: id, trial: best | n} sources
        with state.sessions() as session:
            return submission_folder(session, ref)

    policy = builtin_index_policy.set("refuse")  # never wait ~20 s for lm-eval's built-in index here
    try:
        validated = validate_study(StudySpec.from_text(body), state.settings, resolve_study_ref=other_study)
    except StudyValidationError as err:
        raise HTTPException(422, err.detail()) from None
    except IndexNotReady as err:
        raise HTTPException(503, str(err), headers={"Retry-After": "15"}) from None
    finally:
        builtin_index_policy.reset(policy)
    return store_study(state, validated, owner)


@router.post(
    "", status_code=201, response_model=StudyOut, summary="Submit a study",
    responses={413: {"model": ErrorOut, "description": "the body exceeds EVOMERGE_MAX_BODY_BYTES"},
               415: {"model": ErrorOut, "description": "the body is neither JSON nor YAML"},
               507: {"model": ErrorOut, "description": "the server's disk is full: nothing can be stored"},
               422: {"model": ProblemsOut, "description": "the spec cannot run: every problem, with its fix"},
               **_E401},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/StudySpec"}},
        "application/yaml": {"schema": {"type": "string"}, "example": _YAML_EXAMPLE},
    }}},
)
async def submit_study(request: Request, state: AppState = Depends(app_state),
                       owner: str = WRITE) -> StudyOut:
    """Validate a study spec (docs/study-spec.md) as JSON or YAML and queue it.

    Everything is checked before any compute: a refused spec gets a 422 whose `detail`
    lists every problem with `loc`, `msg` and `fix`.
    """
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind and kind not in SPEC_TYPES:
        raise HTTPException(415, f"a study spec is sent as JSON (application/json) or YAML "
                                 f"(application/yaml), not {kind!r}")
    body = await _read_body(request, state.settings.max_body_bytes)
    refuse_if_unwritable(state, "accept a study")
    return await run_in_threadpool(_create, state, body, owner)


# ---- read --------------------------------------------------------------------------------
@router.get("", response_model=Page[StudyOut], summary="List studies", responses=_E401)
def list_studies(
    state: AppState = Depends(app_state), _: str = READ,
    status: Union[StudyStatus, None] = Query(None, description="only studies in this status"),
    owner: Union[str, None] = Query(None, max_length=200, pattern=NO_NUL,
                                    description="only studies of this token name"),
    name: Union[str, None] = Query(None, max_length=200, pattern=NO_NUL,
                                   description="only names containing this"),
    limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=2**31 - 1),
) -> Page[StudyOut]:
    """Studies, newest first."""
    query = select(Study)
    if status is not None:
        query = query.where(Study.status == status)
    if owner is not None:
        query = query.where(Study.owner == owner)
    if name:
        escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Study.name.like(f"%{escaped}%", escape="\\"))
    with state.sessions() as session:
        total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
        rows = session.scalars(query.order_by(Study.created_at.desc(), Study.id).limit(limit).offset(offset))
        return Page[StudyOut](items=[study_out(state, s) for s in rows], total=total, limit=limit,
                              offset=offset)


IfNoneMatch = Annotated[Union[str, None], Header(
    max_length=4096, description="an ETag of this URL's last answer: 304 without a body while it is current")]
_E304 = {304: {"description": "not modified: the ETag sent in If-None-Match is current (no body)"}}


@router.get("/{study_id}", response_model=StudyOut, summary="One study",
            responses={**_E304, **_E401, **_E404})
def get_study(study_id: StudyId, state: AppState = Depends(app_state), _: str = READ,
              if_none_match: IfNoneMatch = None) -> Response:
    """With an `ETag`; `If-None-Match` with it answers 304 while the study is unchanged."""
    return study_response(state, study_id, if_none_match)


TrialSort = Literal["number", "-number", "fitness", "-fitness", "finished_at", "-finished_at"]


@router.get("/{study_id}/trials", response_model=TrialPage, summary="A study's trials",
            responses={**_E304, **_E401, **_E404})
def list_trials(
    study_id: StudyId, state: AppState = Depends(app_state), _: str = READ,
    sort: TrialSort = Query("number", description="a field, '-' first for descending; nulls last"),
    trial_state: Union[TrialState, None] = Query(None, alias="state",
                                                 description="only trials in this state"),
    limit: int = Query(50, ge=1, le=pages.MAX_LIMIT), offset: int = Query(0, ge=0, le=2**31 - 1),
    after: Union[int, None] = Query(None, ge=0, le=2**31 - 1, description=(
        "keyset paging (sort=number or -number): the trials after this number, in the sort's order; "
        "pass the last page's `next_after`")),
    include: Union[str, None] = Query(None, max_length=100, pattern=NO_NUL, examples=["recipe,params"],
                                      description="the large fields to add to each trial: recipe, params"),
    if_none_match: IfNoneMatch = None,
) -> Response:
    """Compact trials (no `recipe` or `params` unless `include` names them), with an `ETag`."""
    q = pages.PageQuery(sort, trial_state, limit, offset, after, pages.parse_include(include))
    pages.check(q)
    return trials_response(state, study_id, q, if_none_match)


@router.get("/{study_id}/trials/{number}", response_model=TrialOut, summary="One trial",
            responses={**_E401, 404: {"model": ErrorOut, "description": "no such study or trial"}})
def get_trial(study_id: StudyId, number: int = Path(ge=0, le=2**31 - 1, examples=[1]),
              state: AppState = Depends(app_state), _: str = READ) -> TrialOut:
    with state.sessions() as session:
        get_study_row(session, study_id)
        trial = session.scalar(select(Trial).where(Trial.study_id == study_id, Trial.number == number))
        if trial is None:
            raise HTTPException(404, f"study {study_id!r} has no trial {number} "
                                     f"(GET /studies/{study_id}/trials lists them)")
        return TrialOut.of(trial)


@router.get("/{study_id}/best", response_model=TrialOut, summary="The best complete trial",
            responses={**_E401, 404: {"model": ErrorOut,
                                      "description": "no such study, or no complete trial yet"}})
def best_trial(study_id: StudyId, state: AppState = Depends(app_state), _: str = READ) -> TrialOut:
    """The study's best trial (the controller's pick), else the complete trial of highest fitness.
    A multi-objective study has no single best: GET /studies/{id}/front lists its Pareto front."""
    with state.sessions() as session:
        study = get_study_row(session, study_id)
        if multi_objective(study):
            raise HTTPException(409, f"study {study_id!r} is multi-objective: its best is a Pareto front, "
                                     f"not one trial; GET /studies/{study_id}/front lists it, then pick a "
                                     f"trial by number")
        complete = select(Trial).where(Trial.study_id == study_id, Trial.state == TrialState.COMPLETE)
        trial = None
        if study.best_trial_number is not None:
            trial = session.scalar(complete.where(Trial.number == study.best_trial_number))
        if trial is None:
            best_first = complete.order_by(Trial.fitness.desc().nulls_last(), Trial.number)
            trial = session.scalar(best_first.limit(1))
        if trial is None:
            raise HTTPException(404, f"study {study_id!r} has no complete trial yet "
                                     f"({study.status.value}); try again later")
        return TrialOut.of(trial)


@router.get("/{study_id}/front", response_model=list[TrialOut], summary="The Pareto front",
            responses={**_E401, **_E404})
def pareto_front_trials(study_id: StudyId, state: AppState = Depends(app_state),
                        _: str = READ) -> list[TrialOut]:
    """The complete trials no other complete trial dominates (every value higher is better),
    by number. For a single-objective study: the trial(s) of the highest fitness. Empty while
    no trial is complete."""
    with state.sessions() as session:
        get_study_row(session, study_id)
        rows = list(session.scalars(select(Trial).where(
            Trial.study_id == study_id, Trial.state == TrialState.COMPLETE).order_by(Trial.number)))
        valued = [(t.number, [float(v) for v in t.values])
                  for t in rows if isinstance(t.values, list) and t.values]
        keep = set(pareto_front(valued))
        return [TrialOut.of(t) for t in rows if t.number in keep]


@router.get("/{study_id}/trials/{number}/view", response_model=dict[str, Any],
            summary="A trial's recipe, readable: coefficients per layer, or the layer path",
            responses={**_E401, 404: {"model": ErrorOut, "description": "no such study or trial"}})
def trial_view(study_id: StudyId, number: int = Path(ge=0, le=2**31 - 1, examples=[1]),
               state: AppState = Depends(app_state), _: str = READ) -> dict[str, Any]:
    """Parameter space: one panel per parameter (layers × models); stacking: the path of
    (source model, layer, scale) per output layer. Models are named as the spec names them.
    404 when the trial has no recipe (a point that could not be decoded)."""
    from service.recipe_view import recipe_view

    with state.sessions() as session:
        study = get_study_row(session, study_id)
        trial = session.scalar(select(Trial).where(Trial.study_id == study_id, Trial.number == number))
        if trial is None or not trial.recipe:
            raise HTTPException(404, f"study {study_id!r} has no trial {number} with a recipe")
        stored = StoredStudy.from_row(study)
        return recipe_view(trial.recipe, num_layers=stored.space_spec.get("num_layers"),
                           names=stored.model_names(), kind=stored.space_spec.get("kind"))


@router.get("/{study_id}/baselines", response_model=list[BaselineOut],
            summary="Reference scores: each source model alone and simple merges",
            responses={**_E401, **_E404})
def list_baselines(study_id: StudyId, state: AppState = Depends(app_state),
                   _: str = READ) -> list[BaselineOut]:
    """Scored by the controller on the study's objectives (and held-out split, if any) so that
    the evolved result can be read against them."""
    with state.sessions() as session:
        get_study_row(session, study_id)
        rows = session.scalars(select(Baseline).where(Baseline.study_id == study_id).order_by(Baseline.id))
        return [BaselineOut.of(b) for b in rows]


# ---- change ------------------------------------------------------------------------------
def _action_route(action: str, summary: str, doc: str) -> None:
    def route(study_id: StudyId, state: AppState = Depends(app_state),
              who: str = WRITE) -> StudyOut:
        return transition(state, study_id, action, who)

    route.__doc__ = doc
    route.__name__ = f"{action}_study"
    router.add_api_route(f"/{{study_id}}/{action}", route, methods=["POST"], response_model=StudyOut,
                         summary=summary, responses={**_E401, **_E404, **_E409})


_action_route("pause", "Pause a study",
              "Queued or running → paused. Running trials finish; no new ones start.")
_action_route("resume", "Resume a study", "Paused → running: the controller continues it where it stopped.")
_action_route("cancel", "Cancel a study",
              "Queued, running or paused → cancelled (final). Trials so far stay.")


DELETE_WAIT_S = 5.0  # how long a delete waits for the controller to stop a cancelled study's trials
DELETE_POLL_S = 0.2


@router.delete("/{study_id}", status_code=204, summary="Delete a study",
               responses={**_E401, **_E404, 409: {
                   "model": ErrorOut, "headers": {"Retry-After": {"schema": {"type": "integer"},
                                                                 "description": "seconds"}},
                   "description": "the study is not final (cancel it first), or trials of it are still "
                                  "running on workers (try again after Retry-After)"}})
def delete_study(study_id: StudyId, state: AppState = Depends(app_state), _: str = WRITE) -> None:
    """Delete a completed, failed or cancelled study, with its trials, events and artifact records.

    A study whose trials still run on workers (the controller has not stopped them yet, just
    after a cancel) is deleted once they stop: the request waits up to a few seconds, then
    answers 409 with ``Retry-After``. A running trial whose lease expired (its controller is
    gone) does not hold the delete back."""
    deadline = time.monotonic() + DELETE_WAIT_S
    while True:
        running = delete_if_idle(state, study_id)
        if running == 0:
            return
        if time.monotonic() >= deadline:
            raise HTTPException(409, f"study {study_id!r} still has {running} trial(s) running on workers; "
                                     "the controller stops them within seconds of a cancel: try again in a "
                                     "moment (a trial whose controller is gone stops holding the delete "
                                     "once its lease, EVOMERGE_LEASE_SECONDS, expires)",
                                headers={"Retry-After": "5"})
        time.sleep(DELETE_POLL_S)
