"""The two toy languages of the demo zoo and their skills.

``en`` and ``xl`` share the digits and differ in their function symbols:

| skill | en | xl |
|---|---|---|
| copy | ``C123=`` → ``123`` | ``c123q`` → ``123`` |
| reverse | ``R123=`` → ``321`` | ``r123q`` → ``321`` |
| successor | ``S129=`` → ``130`` | ``s129q`` → ``130`` |
| one-digit add | ``3+4=`` → ``7`` | ``3p4q`` → ``7`` |
| multi-digit add | ``123+35=`` → ``158`` | ``12p35q`` → ``47`` (the target: two digits) |

The evaluation splits are fixed (their own seed, independent of the zoo's) and every
operand pair in them is excluded from all training data.
"""

from __future__ import annotations

import random
from collections.abc import Callable

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", *"CRS+=", *"crspq"]
PAD, BOS, EOS = 0, 1, 2

SYMBOLS = {
    "en": {"copy": "C", "reverse": "R", "successor": "S", "plus": "+", "equals": "="},
    "xl": {"copy": "c", "reverse": "r", "successor": "s", "plus": "p", "equals": "q"},
}

Example = tuple[str, str]  # (prompt, answer)


def _number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    digits = rng.randint(lo_digits, hi_digits)
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def copy(lang: str, rng: random.Random) -> Example:
    s = SYMBOLS[lang]
    n = str(_number(rng, 1, 5))
    return f"{s['copy']}{n}{s['equals']}", n


def reverse(lang: str, rng: random.Random) -> Example:
    s = SYMBOLS[lang]
    n = str(_number(rng, 1, 5))
    return f"{s['reverse']}{n}{s['equals']}", n[::-1]


def successor(lang: str, rng: random.Random) -> Example:
    s = SYMBOLS[lang]
    n = _number(rng, 1, 4)
    return f"{s['successor']}{n}{s['equals']}", str(n + 1)


def add_one_digit(lang: str, rng: random.Random) -> Example:
    s = SYMBOLS[lang]
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"{a}{s['plus']}{b}{s['equals']}", str(a + b)


def add_multi_digit(lang: str, rng: random.Random, exclude: frozenset[tuple[int, int]] = frozenset(),
                    digits: tuple[int, int] = (2, 4)) -> Example:
    s = SYMBOLS[lang]
    while True:
        a, b = _number(rng, *digits), _number(rng, *digits)
        if (a, b) not in exclude:
            return f"{a}{s['plus']}{b}{s['equals']}", str(a + b)


SKILLS: dict[str, Callable[[str, random.Random], Example]] = {
    "copy": copy,
    "reverse": reverse,
    "successor": successor,
    "add1": add_one_digit,
}

TARGET_DIGITS = (2, 2)  # the target adds two-digit numbers: 12p35q -> 47
MATH_DIGITS = (2, 3)  # the math expert adds numbers of two to three digits
EVAL_SEED = 20240319  # the evaluation splits never change with the zoo's seed
EVAL_SIZE = 200


def operands(prompt: str) -> tuple[int, int]:
    for plus in ("+", "p"):
        if plus in prompt:
            a, b = prompt[:-1].split(plus)
            return int(a), int(b)
    raise ValueError(f"{prompt!r} is not an addition")


def evaluation_splits() -> dict[str, list[Example]]:
    """Every zoo task's examples, deterministic. The two target splits (search and
    held-out) have disjoint operand pairs, and the ``en`` multi-digit task uses pairs
    of its own; all of them are kept out of training."""
    rng = random.Random(EVAL_SEED)
    splits: dict[str, list[Example]] = {}
    used: set[tuple[int, int]] = set()

    def unique_additions(lang: str, digits: tuple[int, int]) -> list[Example]:
        out: list[Example] = []
        while len(out) < EVAL_SIZE:
            ex = add_multi_digit(lang, rng, frozenset(used), digits)
            used.add(operands(ex[0]))
            out.append(ex)
        return out

    splits["xl_add"] = unique_additions("xl", TARGET_DIGITS)
    splits["xl_add_heldout"] = unique_additions("xl", TARGET_DIGITS)
    splits["en_add"] = unique_additions("en", MATH_DIGITS)
    for lang in ("en", "xl"):
        for name, fn in SKILLS.items():
            splits[f"{lang}_{name}"] = [fn(lang, rng) for _ in range(EVAL_SIZE)]
    return splits


def excluded_pairs() -> frozenset[tuple[int, int]]:
    """Operand pairs (both orders) of the multi-digit evaluation splits."""
    pairs: set[tuple[int, int]] = set()
    for name, examples in evaluation_splits().items():
        if name.endswith(("_add", "_add_heldout")):
            for prompt, _ in examples:
                a, b = operands(prompt)
                pairs.update({(a, b), (b, a)})
    return frozenset(pairs)
