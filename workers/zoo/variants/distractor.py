"""``distractor``: the first zoo's recipe on Mistral (grouped-query attention) plus a
harmful expert, fine-tuned from the base to write en sums backwards (``123+35=`` →
``851``). Same languages, target and tasks as ``two-experts`` (``evomerge:zoo``); a good
merge has to leave the distractor out (``bench/zoo_grid.py``: subtracting it hurts too)."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

from workers.zoo.architectures import mistral_gqa
from workers.zoo.skills import (
    MATH_DIGITS,
    SKILLS,
    VOCAB,
    add_multi_digit_reversed,
    evaluation_splits,
    excluded_pairs,
)
from workers.zoo.variant import Splits, Stage, ZooVariant
from workers.zoo.variants import two_experts


def stages(scale: float = 1.0) -> dict[str, Stage]:
    """The first zoo's mixtures, retimed so that four models build in the time of three
    (the easy stages at batch 64), plus the distractor: reversed en sums with the math
    expert's operand ranges and exclusions, and en replay. At batch 64 it gets twice the
    updates of batch 128 for the same time, which it needs (0.99 on its skill against
    0.73 after 600 steps at batch 128)."""
    steps = lambda n: max(10, int(n * scale))  # noqa: E731
    first = two_experts.stages(scale)
    plan = {
        "base": replace(first["base"], steps=steps(500), batch=64),
        "math": replace(first["math"], steps=steps(1100)),
        "language": replace(first["language"], steps=steps(450), lr=1.5e-3, batch=64),
    }
    reversed_sums = partial(add_multi_digit_reversed, "en", exclude=excluded_pairs(), digits=MATH_DIGITS)
    replay = [(0.15 / 4, partial(fn, "en")) for fn in SKILLS.values()]
    plan["distractor"] = Stage("distractor", [(0.85, reversed_sums), *replay], steps(1000), 3e-3, batch=64)
    return plan


def checks() -> Splits:
    """The distractor's own skill, on the en sums of the tasks (their pairs are never trained)."""
    return {"en_add_reversed": [(p, a[::-1]) for p, a in evaluation_splits()["en_add"]]}


VARIANT = ZooVariant(
    name="distractor",
    summary="two-experts on Mistral (GQA) plus a harmful expert that writes en sums backwards",
    vocab=tuple(VOCAB),
    architecture=mistral_gqa,
    models=("base", "math", "language", "distractor"),
    stages=stages,
    evaluation_splits=evaluation_splits,
    target="xl_add",
    heldout="xl_add_heldout",
    skills={**two_experts.VARIANT.skills, "distractor": ("en_add_reversed",)},
    checks=checks,
    descriptions=two_experts.DESCRIPTIONS,
)
