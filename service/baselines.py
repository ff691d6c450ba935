"""Reference points scored beside a study's search, so the evolved result can be read
against them: each model alone (the base included), the uniform average of the sources,
and plain task arithmetic (every task vector added at weight 1).

They are scored by the study's own workers on its own objectives (and on its held-out
split at the end, with the top trials), never told to the optimizer and never counted
in the budget. A baseline that cannot be built (sources of different shapes in a
stacking study, say) is recorded as failed with the reason.
"""

from __future__ import annotations

from typing import Any

from service.validation import ValidatedStudy


def baseline_recipes(validated: ValidatedStudy) -> list[tuple[str, str, dict[str, Any]]]:
    """``(name, kind, recipe)`` of each baseline of the study, names as the spec gives models."""
    given = {m.ref: m.given for m in validated.models}
    adapter_of = {m.ref: m.adapter_of for m in validated.models if m.adapter_of is not None}
    base_ref = next((m.ref for m in validated.models if m.loc[:1] == ["base_model"]), None)
    sources = list(dict.fromkeys(m.ref for m in validated.models if m.loc[:1] == ["sources"]))

    def linear(refs: list[str]) -> dict[str, Any]:
        recipe: dict[str, Any] = {"merge_method": "linear",
                                  "models": [{"model": r, "parameters": {"weight": 1.0}} for r in refs]}
        bases = {adapter_of[r] for r in refs if r in adapter_of}
        if bases:  # a LoRA adapter is composed onto the recipe's base_model (not an input of linear)
            recipe["base_model"] = bases.pop()
        return recipe

    out: list[tuple[str, str, dict[str, Any]]] = []
    for ref in ([base_ref] if base_ref is not None else []) + sources:
        role = "base" if ref == base_ref else "source"
        out.append((f"{role}: {given.get(ref, ref)}", "source", linear([ref])))
    if len(sources) >= 2:
        out.append(("uniform merge", "uniform", linear(sources)))
    if base_ref is not None and sources:
        out.append(("task arithmetic", "task_arithmetic",
                    {"merge_method": "task_arithmetic", "base_model": base_ref,
                     "models": [{"model": r, "parameters": {"weight": 1.0}} for r in sources]}))
    return out
