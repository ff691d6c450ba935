"""The parameter side of a merge plan: checking a recipe's parameter names against its
method, and resolving the method's parameters for one output tensor.

Kept apart from :mod:`workers.plan` (which decides which tensors exist and where their
inputs come from) so that each error about a parameter is raised in one place.
"""

from __future__ import annotations

import difflib
from fractions import Fraction
from typing import Any

from search_spaces.recipe import Recipe
from workers import params
from workers.methods.base import MergeError, MergeMethod

Scope = dict | None


def check_known_params(method: MergeMethod, recipe: Recipe) -> None:
    """Refuse a parameter name the method does not take, wherever the recipe sets it."""
    known = {p.name for p in method.global_params} | {p.name for p in method.model_params}
    scopes: list[tuple[str, dict]] = [("parameters", recipe.parameters)]
    for entry in recipe.models or []:
        scopes.append((f"model {entry.model!r}", entry.parameters))
    for i, sl in enumerate(recipe.slices or []):
        scopes.append((f"slice {i}", sl.parameters))
        for src in sl.sources:
            scopes.append((f"slice {i} source {src.model!r}", src.parameters))
    for where, scope in scopes:
        for key in scope:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=2)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise MergeError(
                    f"{method.name} has no parameter {key!r} ({where}){hint}; "
                    f"it takes: {', '.join(sorted(known)) or 'none'}"
                )


def resolve_tensor_params(
    method: MergeMethod,
    scopes_by_input: list[list[Scope]],
    global_scopes: list[Scope],
    tensor: str,
    pos: Fraction,
    input_names: list[str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The method's per-model and global parameter values for one tensor at depth ``pos``:
    the most specific scope wins, then the default; each value is checked."""
    def value(spec: Any, scopes: Any, missing: str, where: str) -> Any:
        found = params.resolve(spec.name, scopes, tensor, pos)
        if found is None:
            if spec.required:
                raise MergeError(f"{method.name}: {missing}")
            found = spec.default
        return spec.check(found, where)

    global_params = {
        spec.name: value(spec, global_scopes, f"global parameter {spec.name!r} is missing (tensor {tensor}); "
                         "add it under 'parameters:'", f"at tensor {tensor}")
        for spec in method.global_params}
    per_model = [
        {spec.name: value(spec, scopes, f"parameter {spec.name!r} is missing for model {ref!r} (tensor "
                          f"{tensor}); add it to that model's 'parameters:'",
                          f"of model {ref!r} at tensor {tensor}")
         for spec in method.model_params}
        for scopes, ref in zip(scopes_by_input, input_names)]
    return per_model, global_params


def check_input_count(method: MergeMethod, n_in: int) -> None:
    """Refuse a tensor whose number of inputs (besides the base) the method cannot take."""
    if n_in < method.min_models or (method.max_models is not None and n_in > method.max_models):
        want = (
            f"exactly {method.min_models}"
            if method.max_models == method.min_models
            else f"at least {method.min_models}"
            + (f" and at most {method.max_models}" if method.max_models else "")
        )
        raise MergeError(
            f"{method.name} takes {want} model(s) besides the base; this recipe gives {n_in}"
        )
