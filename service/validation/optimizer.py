"""The study's optimizer (its seed, directions and options, a dry run over the space) and the
budget's warnings."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

from search_spaces.base import RecipeNotInSpace, SearchSpace
from search_spaces.optimizers.base import OptimizerSpec
from search_spaces.recipe import Recipe
from service.spec import StudySpec
from service.validation.problems import Problems


def _canonical_recipe(recipe: Recipe, aliases: Mapping[str, str]) -> Recipe:
    """The recipe with models named as the space names them (real paths)."""
    return recipe.with_models_renamed(lambda name: aliases.get(name, name))


def check_optimizer(spec: StudySpec, n_objectives: int | None, space: SearchSpace | None,
                    aliases: Mapping[str, str], problems: Problems) -> OptimizerSpec | None:
    """The optimizer spec with the study's seed and directions, after a dry run over the space."""
    from search_spaces import optimizers

    opt = spec.optimizer
    start = len(problems.items)
    cls = optimizers.get(opt.name)  # known: OptimizerSpec checked the name
    seed = spec.seed
    if "seed" in opt.model_fields_set:
        if "seed" in spec.model_fields_set and opt.seed != spec.seed:
            problems.add(["optimizer", "seed"], f"two seeds: optimizer.seed {opt.seed} and seed {spec.seed}",
                         "set the seed once, at the top level (seed)", "two_seeds")
        seed = opt.seed
    multi = spec.multi_objective
    if multi and n_objectives is not None and n_objectives < 2:
        problems.add(["multi_objective"], f"a multi-objective study needs two or more objectives, "
                     f"it has {n_objectives}", "add objectives, or set multi_objective: false",
                     "multi_objective_one_objective")
    if multi and not cls.multi_objective:
        capable = [n for n in optimizers.names() if optimizers.get(n).multi_objective]
        problems.add(["optimizer", "name"],
                     f"{opt.name} optimizes one objective; this study is multi-objective",
                     f"use {', '.join(capable)} (nsga2 is made for it), or set multi_objective: false to "
                     "optimize the weighted sum", "optimizer_single_objective")
    want = (n_objectives or 0) if multi else 1
    if "directions" in opt.model_fields_set:
        if any(d != "maximize" for d in opt.directions):
            problems.add(["optimizer", "directions"], "a direction is 'minimize', but evomerge orients every "
                         "objective so that higher is better (a lower-is-better metric such as perplexity "
                         "enters negated)", "remove optimizer.directions; override a metric's direction with "
                         "higher_is_better on its objective", "directions_minimize")
        elif n_objectives is not None and len(opt.directions) != want:
            if not multi:
                msg = (f"optimizer.directions has {len(opt.directions)} entries, but the study is single-"
                       "objective (the weighted sum of its objectives)")
                fix = "set multi_objective: true for a Pareto search, or remove optimizer.directions"
            else:
                msg = f"optimizer.directions has {len(opt.directions)} entries for {n_objectives} objectives"
                fix = "remove optimizer.directions (one 'maximize' per objective is derived)"
            problems.add(["optimizer", "directions"], msg, fix, "directions_mismatch")
    unknown = sorted(set(opt.options) - set(cls.known_options))
    for key in unknown:
        problems.add(["optimizer", "options", key], f"{opt.name} has no option {key!r}",
                     f"{opt.name} takes: {', '.join(sorted(cls.known_options)) or 'no options'}",
                     "unknown_option")
    if len(problems.items) > start or n_objectives is None:
        return None
    filled = opt.model_copy(update={"seed": seed, "directions": ["maximize"] * want})
    if space is None:
        return filled
    if filled.x0 is not None:
        x0 = _canonical_recipe(filled.x0, aliases)
        try:
            space.encode(x0)
        except (RecipeNotInSpace, ValueError) as err:
            problems.add(["optimizer", "x0"], f"the start recipe is not in the space: {err}",
                         "change x0 to a recipe the space expresses, or widen the space", "x0_not_in_space")
            return None
        filled = filled.model_copy(update={"x0": x0})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizers.create_optimizer(filled, space)  # a dry run, in memory
    except ValueError as err:  # OptimizerError is a ValueError
        problems.add(["optimizer"], str(err), "change the optimizer as the message says", "optimizer_invalid")
        return None
    return filled



def budget_warnings(spec: StudySpec, space: SearchSpace | None) -> list[str]:
    """A budget that is valid but likely wasted (idle workers, too few trials to converge)."""
    out = []
    trials = spec.budget.max_trials
    if trials is not None and trials < spec.parallelism:
        out.append(f"parallelism {spec.parallelism} exceeds max_trials {trials}: some workers will stay idle")
    if trials is not None and space is not None:  # what the optimizer declares it needs
        from search_spaces import optimizers

        too_few = optimizers.get(spec.optimizer.name).budget_warning(trials, space.dimension)
        if too_few:
            out.append(too_few)
    if spec.heldout is not None and trials is not None and spec.heldout.top_k > trials:
        out.append(f"heldout.top_k {spec.heldout.top_k} exceeds max_trials {trials}: "
                   "every trial is re-scored")
    return out

