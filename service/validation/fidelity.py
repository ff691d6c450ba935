"""Checks of a study's ``fidelity`` (racing) that need more than its own fields."""

from __future__ import annotations

from service.spec.study import StudySpec
from service.validation.problems import Problems


def check_fidelity(spec: StudySpec, problems: Problems) -> list[int] | None:
    """The rung sizes of a raced study (None: not raced, or a problem was added)."""
    from evaluators import registry
    from evaluators.base import SpecError

    fidelity = spec.fidelity
    if fidelity is None:
        return None
    loc = ["fidelity"]
    if spec.multi_objective:
        problems.add(loc, "racing compares candidates on one fitness; a multi-objective study has a front",
                     "remove fidelity, or set multi_objective: false (the weighted sum is raced)",
                     "fidelity_multi_objective")
        return None
    try:
        evaluator = registry.get(spec.evaluation.evaluator)
    except SpecError:
        return None  # reported by check_evaluation
    if not evaluator.supports_rungs:
        problems.add(loc, f"the {evaluator.name} evaluator cannot score rungs of examples",
                     "remove fidelity, or use an evaluator that races (lm_eval)", "fidelity_unsupported")
        return None
    limits = [o.limit for o in spec.evaluation.objectives]
    bad = [i for i, limit in enumerate(limits) if not isinstance(limit, int)]
    for i in bad:
        problems.add(["evaluation", "objectives", i, "limit"],
                     "racing needs a count of examples on every objective (rungs are counts)",
                     "set limit to a whole number of examples", "fidelity_needs_limit")
    if bad:
        return None
    full = max(limit for limit in limits if isinstance(limit, int))
    if fidelity.min_examples >= full:
        problems.add([*loc, "min_examples"],
                     f"min_examples ({fidelity.min_examples}) is not below the largest limit ({full}): "
                     "there would be one rung only",
                     f"set min_examples below {full} (e.g. {max(full // 9, 1)}), or remove fidelity",
                     "fidelity_one_rung")
        return None
    return fidelity.sizes(full)
