"""``two-experts``: the first zoo (Llama). An en math expert and an xl speaker; the target
is two-digit addition written in xl (``12p35q`` → ``47``), which neither can do."""

from __future__ import annotations

import random
from functools import partial

from workers.zoo.architectures import llama
from workers.zoo.skills import MATH_DIGITS, SKILLS, VOCAB, add_multi_digit, evaluation_splits, excluded_pairs
from workers.zoo.variant import Stage, ZooVariant


def _skill(lang: str, name: str):  # type: ignore[no-untyped-def]
    return partial(SKILLS[name], lang)


def stages(scale: float = 1.0) -> dict[str, Stage]:
    """Base, then two experts fine-tuned from it. ``scale`` shrinks the step counts
    (tests use a reduced zoo; the demo uses the full one)."""
    held = excluded_pairs()

    def en_multi(rng: random.Random):  # type: ignore[no-untyped-def]
        return add_multi_digit("en", rng, held, MATH_DIGITS)

    en_basic = [(1.0, _skill("en", n)) for n in SKILLS]
    xl_light = [(0.1, _skill("xl", n)) for n in ("copy", "reverse", "successor")]  # ~7 %
    steps = lambda n: max(10, int(n * scale))  # noqa: E731
    return {
        "base": Stage("base", en_basic + xl_light, steps(500), 3e-3),
        "math": Stage("math", [(0.85, en_multi)] + [(0.15 / 4, m) for _, m in en_basic],
                      steps(1200), 3e-3),
        "language": Stage(
            "language",
            [(0.7 / 4, _skill("xl", n)) for n in SKILLS] + [(0.3 / 4, m) for _, m in en_basic],
            steps(600),
            1e-3,
        ),
    }


DESCRIPTIONS = {
    "xl_add": "target: multi-digit addition in xl (search split)",
    "xl_add_heldout": "target: multi-digit addition in xl (held-out split)",
    "en_add": "the math expert's skill: multi-digit addition in en",
}

XL_SKILLS = tuple(f"xl_{n}" for n in SKILLS)

VARIANT = ZooVariant(
    name="two-experts",
    summary="the first zoo (Llama): an en adder + an xl speaker -> two-digit addition in xl",
    vocab=tuple(VOCAB),
    architecture=llama,
    models=("base", "math", "language"),
    stages=stages,
    evaluation_splits=evaluation_splits,
    target="xl_add",
    heldout="xl_add_heldout",
    skills={"math": ("en_add",), "language": XL_SKILLS},
    descriptions=DESCRIPTIONS,
    legacy=True,
)
