"""The whole study: every concern checked in order, every problem raised at once."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, SerializeAsAny

from evaluators.base import EvaluationSpec
from search_spaces.base import SearchSpace
from search_spaces.optimizers.base import OptimizerSpec
from search_spaces.sources import StudyRef
from service.spec import StudySpec, StudyValidationError
from service.validation.evaluation import check_eval_paths, check_evaluation, check_heldout
from service.validation.fidelity import check_fidelity
from service.validation.models import ResolvedModel, SettingsLike, StudyResolver
from service.validation.optimizer import budget_warnings, check_optimizer
from service.validation.problems import Problems, spec_order
from service.validation.space import check_dtypes, models_and_space
from service.validation.worker import build_worker_spec, plan_worker_memory
from workers.memory_plan import plan_json  # torch-free


class ValidatedStudy(BaseModel):
    """A study that passed validation, with everything derived from its models filled in."""

    # as any: StudySpec is re-typed when a space kind is registered at run time (service.spec.study)
    spec: SerializeAsAny[StudySpec] = Field(description="the spec as submitted")
    space_spec: dict[str, Any] = Field(description="the full space spec (models, layer counts)")
    space: dict[str, Any] = Field(description="the built space's describe(): dimension, genes, labels")
    evaluation: EvaluationSpec = Field(description="validated: directions resolved, task_dirs absolute")
    heldout_evaluation: EvaluationSpec | None = Field(
        description="what the best trials are re-scored with at the end (None: no held-out scoring)"
    )
    heldout_top_k: int = 0
    optimizer: OptimizerSpec = Field(description="with the study's seed and one direction per fitness value")
    multi_objective: bool
    models: list[ResolvedModel]
    study_refs: list[StudyRef] = Field(description="other studies' models the controller must resolve")
    trust_remote_code: bool = False
    worker_spec: dict[str, Any] = Field(description="fields of workers.trial.WorkerSpec")
    memory_plan: dict[str, Any] | None = Field(
        default=None, description="a worker's memory plan (workers.memory_plan.MemoryPlan as JSON): its "
        "tier, what it needs on the device and the host, and why the other tiers do or do not fit")
    warnings: list[str] = Field(default_factory=list, description="accepted, but worth a look")

    def build_space(self) -> SearchSpace:
        from search_spaces.registry import build_space

        return build_space(self.space_spec)


def validate_study(spec: StudySpec | Mapping[str, Any], settings: SettingsLike, *,
                   resolve_study_ref: StudyResolver | None = None) -> ValidatedStudy:
    """Check everything a study needs before any compute; raise :class:`StudyValidationError`
    listing every problem, or return the :class:`ValidatedStudy`.

    ``resolve_study_ref(StudyRef) -> folder`` gives, for a ``{study: …}`` source, a model
    folder whose headers stand for that study's model (its exported best model, or for a
    parameter-space study any of its sources: the merge keeps their shapes); it raises
    ``LookupError`` (or ``ValueError``) with a message when the study cannot be used.
    """
    if not isinstance(spec, StudySpec):
        spec = StudySpec.from_data(spec)
    problems = Problems()
    if spec.trust_remote_code and not bool(getattr(settings, "trust_remote_code", False)):
        problems.add(["trust_remote_code"], "this server does not run code shipped with models",
                     "set trust_remote_code: false (or ask an administrator to set "
                     "EVOMERGE_TRUST_REMOTE_CODE)", "trust_remote_code_refused")
    check_dtypes(spec, problems)
    models = models_and_space(spec, settings, problems, resolve_study_ref)
    evaluation = heldout = None
    if spec.evaluation.subset != "search":
        problems.add(["evaluation", "subset"], "a search scores its candidates on the search subset",
                     "remove evaluation.subset; held-out scoring at the end is set with `heldout`",
                     "subset_holdout")
    evaluation_in = check_eval_paths(spec.evaluation, spec, settings, problems)
    if not problems.under(["evaluation", "options"]):
        evaluation = check_evaluation(evaluation_in, problems, ["evaluation"])
    if evaluation is not None:
        heldout = check_heldout(spec, evaluation, problems)
    check_fidelity(spec, problems)
    optimizer = check_optimizer(spec, len(spec.evaluation.objectives), models.space, models.aliases, problems)
    plan = plan_worker_memory(spec, models, settings, problems) if models.space is not None else None

    if problems.items:
        raise StudyValidationError(sorted(problems.items, key=spec_order))
    assert models.space is not None and evaluation is not None and optimizer is not None and plan is not None
    return ValidatedStudy(
        spec=spec,
        space_spec=models.space.spec.model_dump(mode="json"),
        space=models.space.describe(),
        evaluation=evaluation,
        heldout_evaluation=heldout,
        heldout_top_k=spec.heldout.top_k if spec.heldout is not None else 0,
        optimizer=optimizer,
        multi_objective=spec.multi_objective,
        models=[m.info for m in models.resolved],
        study_refs=list(dict.fromkeys(m.spec_ref for m in models.resolved
                                      if isinstance(m.spec_ref, StudyRef))),
        trust_remote_code=spec.trust_remote_code,
        worker_spec=build_worker_spec(spec, models, evaluation, plan),
        memory_plan=plan_json(plan),
        warnings=[*models.warnings, *budget_warnings(spec, models.space)],
    )

