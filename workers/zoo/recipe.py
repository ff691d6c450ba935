"""The zoo's training stages: what each model learns, from which data."""

from __future__ import annotations

import random
from functools import partial

from workers.zoo.skills import MATH_DIGITS, SKILLS, add_multi_digit, excluded_pairs
from workers.zoo.train import Stage


def _skill(lang: str, name: str):
    return partial(SKILLS[name], lang)


def stages(scale: float = 1.0) -> dict[str, Stage]:
    """Base, then two experts fine-tuned from it. ``scale`` shrinks the step counts
    (tests use a reduced zoo; the demo uses the full one)."""
    held = excluded_pairs()

    def en_multi(rng: random.Random):
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
