"""``subtract``: another operation and symbol set (Qwen2, attention biases, GQA). An en
subtractor and a zl speaker; the target is two-digit subtraction written in zl
(``53m21w`` → ``32``, always ``a >= b``)."""

from __future__ import annotations

import random
from functools import partial

from workers.zoo.architectures import qwen2_gqa
from workers.zoo.skills import (
    EVAL_SEED,
    EVAL_SIZE,
    SUB_SKILLS,
    Pairs,
    pairs_of,
    sub_multi_digit,
    unique_examples,
)
from workers.zoo.variant import Splits, Stage, ZooVariant
from workers.zoo.vocab import SPECIALS

TARGET_DIGITS = (2, 2)
MATH_DIGITS = (2, 3)
MULTI_DIGIT = ("zl_sub", "zl_sub_heldout", "en_sub")


def evaluation_splits() -> Splits:
    """The target's two splits and the en multi-digit split have disjoint operand pairs,
    all kept out of training; then 200 prompts of every one-step skill."""
    rng = random.Random(EVAL_SEED)
    used: set[tuple[int, int]] = set()

    def subtractions(lang: str, digits: tuple[int, int]):  # type: ignore[no-untyped-def]
        return unique_examples(lambda exclude: sub_multi_digit(lang, rng, exclude, digits), used)

    splits = {
        "zl_sub": subtractions("zl", TARGET_DIGITS),
        "zl_sub_heldout": subtractions("zl", TARGET_DIGITS),
        "en_sub": subtractions("en", MATH_DIGITS),
    }
    for lang in ("en", "zl"):
        for name, fn in SUB_SKILLS.items():
            splits[f"{lang}_{name}"] = [fn(lang, rng) for _ in range(EVAL_SIZE)]
    return splits


def excluded_pairs() -> Pairs:
    splits = evaluation_splits()
    return pairs_of(ex for name in MULTI_DIGIT for ex in splits[name])


def stages(scale: float = 1.0) -> dict[str, Stage]:
    """Like the first zoo's, with extra pairs of 3-digit numbers for the math expert (the
    case Qwen2 learns last) and a shorter language expert (it merges better)."""
    held = excluded_pairs()
    en_multi = partial(sub_multi_digit, "en", exclude=held, digits=MATH_DIGITS)
    en_long = partial(sub_multi_digit, "en", exclude=held, digits=(3, 3))  # the hardest case
    en_basic = [(1.0, partial(fn, "en")) for fn in SUB_SKILLS.values()]
    zl_light = [(0.1, partial(SUB_SKILLS[n], "zl")) for n in ("copy", "reverse", "successor")]
    zl_all = [(1.0, partial(fn, "zl")) for fn in SUB_SKILLS.values()]
    steps = lambda n: max(10, int(n * scale))  # noqa: E731
    return {
        "base": Stage("base", en_basic + zl_light, steps(500), 3e-3),
        "math": Stage("math", [(0.6, en_multi), (0.25, en_long)] + [(0.15 / 4, m) for _, m in en_basic],
                      steps(1200), 3e-3),
        "language": Stage("language", [(0.7 / 4, m) for _, m in zl_all] + [(0.3 / 4, m) for _, m in en_basic],
                          steps(450), 1e-3),
    }


VARIANT = ZooVariant(
    name="subtract",
    summary="Qwen2 (biases, GQA): an en subtractor + a zl speaker -> two-digit subtraction in zl",
    vocab=(*SPECIALS, *"0123456789", *"CRS-=", *"kvumw"),
    architecture=qwen2_gqa,
    models=("base", "math", "language"),
    stages=stages,
    evaluation_splits=evaluation_splits,
    target="zl_sub",
    heldout="zl_sub_heldout",
    task_prefix="zoo_subtract_",
    task_folder="zoo_subtract",
    skills={"math": ("en_sub",), "language": tuple(f"zl_{n}" for n in SUB_SKILLS)},
    descriptions={
        "zl_sub": "target: two-digit subtraction in zl (search split)",
        "zl_sub_heldout": "target: two-digit subtraction in zl (held-out split)",
        "en_sub": "the math expert's skill: multi-digit subtraction in en",
    },
)
