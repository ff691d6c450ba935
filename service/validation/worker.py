"""What a worker needs: the fields of ``workers.trial.WorkerSpec`` and the memory plan of one
worker, planned from the headers already read (``workers.memory_plan`` is torch-free)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evaluators.base import EvaluationSpec
from search_spaces.base import SearchSpace
from service.spec import StudySpec
from service.validation.models import Model, SettingsLike, StudyModels, tokenizer_ref
from service.validation.problems import Problems
from workers.memory_facts import adapter_facts  # torch-free
from workers.memory_plan import (  # torch-free
    MAX_EVAL_TOKENS,
    DoesNotFit,
    MemoryPlan,
    SourceFacts,
    WorkerLimits,
    dtype_name,
    eval_facts,
    facts_from_tensors,
    limits_from_settings,
    plan_json,
    plan_memory,
)


def _space(models: StudyModels) -> SearchSpace:
    assert models.space is not None  # the worker is planned only for a space that was built
    return models.space


def _worker_refs(models: StudyModels) -> tuple[list[str], str | None]:
    """(every model a worker loads, the base first; the base of the task vectors). A space that
    declares ``task_vector_base`` (a parameter space) computes task vectors against the study's
    base; any other (stacking) needs none (its base only lends embeddings and head)."""
    base = models.base.info.ref if models.base is not None else None
    task_vector_base = base if _space(models).task_vector_base else None
    refs = list(dict.fromkeys(m.info.ref for m in models.resolved))
    if task_vector_base is not None:
        refs = [task_vector_base, *(r for r in refs if r != task_vector_base)]
    return refs, task_vector_base


def build_worker_spec(spec: StudySpec, models: StudyModels, evaluation: EvaluationSpec,
                      plan: MemoryPlan) -> dict[str, Any]:
    """The fields of ``workers.trial.WorkerSpec``: the models, the evaluation, and the memory plan
    (``dtype`` and ``tier`` as the spec gives them: a worker resolves auto as the plan did, with its
    own resources; the API's plan goes along for the record)."""
    refs, task_vector_base = _worker_refs(models)
    space = _space(models)
    return {
        "sources": refs,
        "base_model": task_vector_base,
        "evaluation": evaluation.model_dump(mode="json"),
        "tokenizer": tokenizer_ref(models),
        "multi_objective": spec.multi_objective,
        "dtype": spec.worker.dtype,
        "tier": spec.worker.tier,
        "cache_task_vectors": spec.worker.cache_task_vectors,
        "method": space.merge_method(),
        "stacking_layers": space.stacked_layers(),
        "memory_plan": plan_json(plan),
    }



def worker_limits(settings: SettingsLike) -> WorkerLimits:
    """What one worker may use: the server's ``worker_limits()``, or for a stand-in settings
    object the same rule over its attributes (a CPU worker on this machine by default)."""
    own = getattr(settings, "worker_limits", None)
    if callable(own):
        return own()
    return limits_from_settings(
        num_gpus=float(getattr(settings, "worker_num_gpus", 0.0) or 0.0),
        device_memory=getattr(settings, "worker_device_memory", None),
        host_memory=getattr(settings, "worker_host_memory", None),
        remote=bool(getattr(settings, "ray_address", None)),
        workers_per_host=int(getattr(settings, "max_workers", 1) or 1))


def _eval_tokens(evaluation: EvaluationSpec) -> int | None:
    """The padded length of an evaluation batch, where the evaluation's options say it."""
    options = evaluation.options if isinstance(evaluation.options, Mapping) else {}
    hflm = options.get("hflm_args")
    for value in (options.get("max_length"), hflm.get("max_length") if isinstance(hflm, Mapping) else None):
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_EVAL_TOKENS:
            return value
    return None


def _plan_dtype(spec: StudySpec) -> str:
    """The candidate's dtype as the plan takes it: worker.dtype, or for auto what the worker makes
    of auto (workers.candidate): the space's out_dtype, else the base's own dtype."""
    if spec.worker.dtype != "auto":
        return spec.worker.dtype
    return dtype_name(str(getattr(spec.space, "out_dtype", None) or "")) or "auto"


def _facts(model: Model, by_ref: Mapping[str, Model]) -> SourceFacts:
    """A model's facts from its headers; a LoRA adapter's at its own size (over its base's)."""
    headers = model.headers
    if model.adapter is None or model.info.adapter_of not in by_ref:
        return facts_from_tensors(model.info.ref, ((n, h.shape, h.dtype) for n, h in headers.tensors.items()),
                                  headers.config)
    base = _facts(by_ref[model.info.adapter_of], by_ref)
    own = ((n, shape, dtype) for n, (shape, dtype) in model.adapter.tensors.items())
    return adapter_facts(model.info.ref, own, base, model.adapter.largest_target_numel())


def plan_worker_memory(spec: StudySpec, models: StudyModels, settings: SettingsLike,
                       problems: Problems) -> MemoryPlan | None:
    """The memory plan of one worker, from the headers already read; a study that no tier (or not
    the tier asked for) can hold is a ``does_not_fit`` problem at ``worker``."""
    space = _space(models)
    refs, task_vector_base = _worker_refs(models)
    by_ref = {m.info.ref: m for m in models.resolved}
    facts = [_facts(by_ref[ref], by_ref) for ref in refs]
    stacked = space.stacked_layers()
    owner = task_vector_base
    if stacked is not None:  # the candidate takes embeddings and head from the base
        owner = models.base.info.ref if models.base is not None else refs[0]
    elif owner is None:
        owner = refs[0]
    config = by_ref[owner].headers.config
    try:
        return plan_memory(
            sources=facts, base=owner if stacked is not None else task_vector_base,
            method=space.merge_method(), stacking_layers=stacked,
            candidate_dtype=_plan_dtype(spec), limits=worker_limits(settings),
            evaluation=eval_facts(config, spec.evaluation.batch_size, _eval_tokens(spec.evaluation)),
            tier=spec.worker.tier, cache_task_vectors=spec.worker.cache_task_vectors)
    except DoesNotFit as err:
        problems.add(["worker"], err.msg, err.fix, "does_not_fit")
    except ValueError as err:  # headers the planner cannot size (every number it reads is bounded)
        problems.add(["worker"], f"the workers' memory cannot be planned: {err}",
                     "check the models' headers (config.json and safetensors); the message names what is "
                     "out of bounds", "memory_plan_invalid")
    return None

