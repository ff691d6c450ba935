"""The score cache: a candidate scored once is not scored again, in this study or in another.

``em_score_cache`` maps a key to the scores, values and metrics of one complete, full-fidelity
evaluation and to what it cost (examples, tokens, worker-seconds: what every hit saves). The key
is the sha256 of a canonical JSON (sorted keys, no spaces) of its parts, each itself a digest:

- ``recipe``: the canonical recipe, every model reference replaced by that model's digest
  (service/weight_digests.py: its weight files, config and tokenizer files by name and sha256),
  so the key does not depend on where a model lives; ``models`` lists those digests;
- ``candidate``: what else shapes the scored model: the workers' dtype, the tokenizer's model,
  single or multi-objective values;
- ``evaluation``: the evaluator spec: its name, objectives (task, metric, few-shot, limit, split,
  weight, direction), seed, subset and options (``batch_size`` and path options left out);
- ``examples``: what determines the example ids: the digest of every file of each task folder or
  file an option names (``task_dirs``, packaged ``evomerge:NAME`` folders included, ``text_files``),
  the installed lm-eval's version (its built-in tasks and how it reads them) and evomerge's (its
  subset selection and merge code). The example ids are keyed by what determines them, not listed:
  the controller never loads a dataset (it runs in the API process, without building lm-eval's
  tasks, which takes seconds to minutes), and the same task files, versions, seed, limit, split and
  few-shot select the same examples.

A change to any part is another key: a miss. The digests are taken once per study runtime, at its
first dispatch (:func:`context`); a file is hashed once and again only when it changes. Only
complete full-fidelity results are stored (never failed or pruned ones); held-out re-scoring is not
cached. ``EVOMERGE_SCORE_CACHE=false`` turns the cache off (no lookup, no store).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import ScoreCacheEntry, utcnow
from service.db.insert_ignore import insert_ignore
from service.weight_digests import canonical_json, model_digest, path_digest, sha256_text

if TYPE_CHECKING:
    from search_spaces.recipe import Recipe
    from service.runtime import StudyRuntime
    from service.settings import Settings
    from service.validation import ValidatedStudy
    from workers.trial import TrialResult

log = logging.getLogger("evomerge.score_cache")

KEY_FORMAT = 1  # raised when the key's composition changes: older entries then simply miss
MAX_PENDING_SLACK = 64  # in-flight keys kept beyond the trials in flight before stale ones are dropped


@dataclass(frozen=True)
class Probe:
    """A candidate's key, its parts, and the cache entry found under it (None: a miss)."""

    key: str
    parts: dict[str, Any]
    entry: ScoreCacheEntry | None


def _renamed(data: Mapping[str, Any], names: Mapping[str, str]) -> tuple[dict[str, Any], set[str]]:
    """A recipe's JSON with every model reference (as ``Recipe.with_models_renamed`` finds them:
    ``base_model``, ``tokenizer_source`` unless "base", each model entry, each slice's base and
    sources) replaced by ``names[ref]``, and the set of new names. KeyError: a model not named."""
    out = dict(data)
    used: set[str] = set()

    def rename(ref: str) -> str:
        used.add(names[ref])
        return names[ref]

    if out.get("base_model") is not None:
        out["base_model"] = rename(out["base_model"])
    if out.get("tokenizer_source") not in (None, "base"):
        out["tokenizer_source"] = rename(out["tokenizer_source"])
    out["models"] = [{**e, "model": rename(e["model"])} for e in out.get("models") or []] or out.get("models")
    slices = []
    for sl in out.get("slices") or []:
        sl = {**sl, "sources": [{**src, "model": rename(src["model"])} for src in sl.get("sources", [])]}
        if sl.get("base_model") is not None:
            sl["base_model"] = rename(sl["base_model"])
        slices.append(sl)
    if out.get("slices"):
        out["slices"] = slices
    return out, used


@dataclass
class ScoreCacheContext:
    """One study's share of the key, computed once per runtime; ``reason``: why the cache is off."""

    models: dict[str, str]  # a model reference as recipes name it -> "sha256:<its digest>"
    fixed: dict[str, Any]  # the parts that do not depend on the recipe
    reason: str | None = None
    pending: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)  # in flight -> key, parts

    @classmethod
    def off(cls, reason: str) -> ScoreCacheContext:
        return cls(models={}, fixed={}, reason=reason)

    def key(self, recipe: Recipe | Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """The recipe's key and parts; None when the cache is off or it names a model not hashed."""
        from search_spaces.recipe import Recipe

        if self.reason is not None:
            return None
        # the JSON the trial row stores (no second dump or validation of the recipe per trial)
        data = recipe.model_dump(mode="json") if isinstance(recipe, Recipe) else recipe
        try:
            canon, models = _renamed(data, self.models)
        except KeyError:
            return None
        parts = {**self.fixed, "recipe": sha256_text(canonical_json(canon)), "models": sorted(models)}
        return sha256_text(canonical_json(parts)), parts

    def remember(self, in_flight_id: int, probe: Probe | None, in_flight: Mapping[int, Any]) -> None:
        """Keep a missed candidate's key until its result comes back (ids no longer in flight are
        dropped now and then: a failed trial's key is never taken)."""
        if probe is None:
            return
        if len(self.pending) > len(in_flight) + MAX_PENDING_SLACK:
            self.pending = {k: v for k, v in self.pending.items() if k in in_flight}
        self.pending[in_flight_id] = (probe.key, probe.parts)


# ---- the key's parts ---------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    from search_spaces.version import evomerge_version

    try:
        lm_eval: str | None = version("lm_eval")
    except PackageNotFoundError:
        lm_eval = None
    return {"evomerge": evomerge_version(), "lm_eval": lm_eval}


def _location_digest(sessions: sessionmaker[Session], value: Any) -> str:
    from evaluators.validation import BUILTIN_PREFIX, packaged_task_dir

    text = str(value)
    return path_digest(sessions, packaged_task_dir(text) if text.startswith(BUILTIN_PREFIX) else text)


def evaluation_parts(sessions: sessionmaker[Session], validated: ValidatedStudy) -> dict[str, str]:
    """The ``evaluation`` and ``examples`` parts: the spec without its path options, and the digests
    of what those options name (by content, not by place)."""
    from evaluators import registry

    ev = validated.evaluation
    data = ev.model_dump(mode="json", exclude={"batch_size"})
    options = dict(data.get("options") or {})
    named: dict[str, Any] = {}
    for declared in registry.get(ev.evaluator).path_options:
        value = options.pop(declared.key, None)
        if isinstance(value, list):
            named[declared.key] = [_location_digest(sessions, v) for v in value]
        elif isinstance(value, Mapping):
            named[declared.key] = {k: _location_digest(sessions, v) for k, v in value.items()}
    data["options"] = options
    return {"evaluation": sha256_text(canonical_json(data)),
            "examples": sha256_text(canonical_json({"paths": named, **_versions()}))}


def model_folders(validated: ValidatedStudy, paths: Mapping[str, str]) -> dict[str, str | None]:
    """Each model reference a recipe of the study may name -> the local folder to hash (None: none,
    a hub model not in the local cache). Another study's model is its export folder, named by its
    placeholder before it is resolved and by the folder after."""
    out: dict[str, str | None] = {}
    for m in validated.models:
        out[m.ref] = paths.get(m.ref) if m.origin == "study" else m.path
    for folder in paths.values():
        out[folder] = folder
    return out


def build_context(sessions: sessionmaker[Session], settings: Settings, validated: ValidatedStudy,
                  paths: Mapping[str, str]) -> ScoreCacheContext:
    """Hash the study's models and task files (each file once: service/weight_digests.py)."""
    if not getattr(settings, "score_cache", True):
        return ScoreCacheContext.off("the score cache is turned off (EVOMERGE_SCORE_CACHE=false)")
    folders = model_folders(validated, paths)
    missing = sorted(ref for ref, folder in folders.items() if folder is None)
    if missing:
        return ScoreCacheContext.off(f"no local folder to hash for {', '.join(missing)} (a hub model not "
                                     "in the local cache): its weights cannot be keyed")
    by_folder: dict[str, str] = {}
    models: dict[str, str] = {}
    for ref, folder in folders.items():
        assert folder is not None
        if folder not in by_folder:
            by_folder[folder] = "sha256:" + model_digest(sessions, folder)
        models[ref] = by_folder[folder]
    worker = validated.worker_spec
    tokenizer = worker.get("tokenizer")
    candidate = {"dtype": worker.get("dtype"), "multi_objective": validated.multi_objective,
                 "tokenizer": models.get(tokenizer) if tokenizer else None}
    fixed = {"format": KEY_FORMAT, "candidate": sha256_text(canonical_json(candidate)),
             **evaluation_parts(sessions, validated), **_versions()}
    return ScoreCacheContext(models=models, fixed=fixed)


def context(sessions: sessionmaker[Session], settings: Settings, rt: StudyRuntime) -> ScoreCacheContext:
    """The runtime's context, built at its first use (a failure turns the cache off for the runtime;
    a database write fault is raised, to be retried like any other write)."""
    if rt.score_cache is None:
        from service.faults import write_fault

        try:
            rt.score_cache = build_context(sessions, settings, rt.validated, rt.paths)
        except Exception as err:
            if write_fault(err) is not None:
                raise
            rt.score_cache = ScoreCacheContext.off(f"the study's models or tasks could not be hashed: {err}")
        if rt.score_cache.reason is not None:
            log.info("study %s: score cache off: %s", rt.study_id, rt.score_cache.reason)
    return rt.score_cache


# ---- the table ---------------------------------------------------------------------------------------
def lookup(session: Session, key: str) -> ScoreCacheEntry | None:
    """The entry under ``key`` (its ``hits`` and ``last_used_at`` bumped), or None."""
    bumped = session.execute(update(ScoreCacheEntry).where(ScoreCacheEntry.key == key)
                             .values(hits=ScoreCacheEntry.hits + 1, last_used_at=utcnow())
                             .execution_options(synchronize_session=False))
    if not bumped.rowcount:
        return None
    return session.scalar(select(ScoreCacheEntry).where(ScoreCacheEntry.key == key))


def full_fidelity(result: TrialResult, spec: Any) -> bool:
    """A complete result scored on every example of its objectives' limits: not raced, or raced to a
    last rung that is each task's limit (racing's ``max_examples`` unset, or at least every limit)."""
    if result.state != "complete":
        return False
    if not result.rungs:
        return True
    top = getattr(getattr(spec, "fidelity", None), "max_examples", None)
    if top is None:
        return True
    limits = [o.limit for o in spec.evaluation.objectives]
    return all(isinstance(n, int) and n <= top for n in limits)


def store(session: Session, key: str, parts: dict[str, Any], result: TrialResult) -> None:
    """Keep a complete result under ``key``; an entry already there is kept (insert-or-ignore)."""
    if result.state != "complete":
        raise ValueError(f"only complete results are cached, not {result.state!r} ones")
    insert_ignore(session, ScoreCacheEntry, {
        "key": key, "parts": parts, "scores": dict(result.scores),
        "values": [float(v) for v in result.values], "metrics": dict(result.metrics),
        "examples": result.cost.examples, "tokens": result.cost.tokens,
        "worker_seconds": result.cost.worker_seconds, "hits": 0}, unique=("key",))


# ---- the controller's two calls ----------------------------------------------------------------------
def probe(sessions: sessionmaker[Session], settings: Settings, rt: StudyRuntime,
          recipe: Recipe | Mapping[str, Any]) -> Probe | None:
    """Look a candidate up before it is dispatched; None when it cannot be keyed (the cache is off,
    or an error, logged: the cache never stops a trial)."""
    from service.faults import write_fault

    try:
        keyed = context(sessions, settings, rt).key(recipe)
        if keyed is None:
            return None
        with sessions.begin() as s:
            entry = lookup(s, keyed[0])
        return Probe(key=keyed[0], parts=keyed[1], entry=entry)
    except Exception as err:
        if write_fault(err) is not None:
            raise
        log.warning("study %s: score cache lookup failed, the candidate is scored: %s", rt.study_id, err)
        return None


def keep(sessions: sessionmaker[Session], rt: StudyRuntime, in_flight_id: int, result: TrialResult) -> bool:
    """Store a result under the key its candidate was dispatched with (True: stored). A result with
    no key (recovered after a restart, the cache off), or not complete at full fidelity, is not kept;
    a failure is logged, never raised (the result itself is already committed)."""
    ctx = rt.score_cache
    keyed = ctx.pending.pop(in_flight_id, None) if ctx is not None else None
    if keyed is None or not full_fidelity(result, rt.spec):
        return False
    try:
        with sessions.begin() as s:
            store(s, keyed[0], keyed[1], result)
        return True
    except Exception as err:
        log.warning("study %s: a score could not be cached: %s", rt.study_id, err)
        return False



def settle(rt: StudyRuntime, in_flight_id: int, found: Probe | None) -> ScoreCacheEntry | None:
    """A probed candidate now has its row (or baseline) id: the entry of a hit, to record at once; on a
    miss its key is kept with the runtime until its result comes back (:func:`keep`)."""
    if found is None or rt.score_cache is None:
        return None
    if found.entry is None:
        rt.score_cache.remember(in_flight_id, found, rt.in_flight)
    return found.entry


def check(sessions: sessionmaker[Session], settings: Settings, rt: StudyRuntime, in_flight_id: int,
          recipe: Recipe | Mapping[str, Any]) -> ScoreCacheEntry | None:
    """:func:`probe` then :func:`settle`, for a candidate whose id is known (a baseline). A recipe
    given as JSON (a baseline's, written short) is validated first, so that its key is the key of
    the same recipe as a trial dumps it (defaults included)."""
    from search_spaces.recipe import Recipe

    if not isinstance(recipe, Recipe):
        try:
            recipe = Recipe.model_validate(recipe)
        except ValueError:
            return None  # the worker reports why it cannot be built
    return settle(rt, in_flight_id, probe(sessions, settings, rt, recipe))
