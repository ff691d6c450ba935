"""The toy languages of the zoo family and their skills.

``en``, ``xl`` and ``zl`` share the digits and differ in their function symbols:

| skill | en | xl | zl |
|---|---|---|---|
| copy | ``C123=`` → ``123`` | ``c123q`` → ``123`` | ``k123w`` → ``123`` |
| reverse | ``R123=`` → ``321`` | ``r123q`` → ``321`` | ``v123w`` → ``321`` |
| successor | ``S129=`` → ``130`` | ``s129q`` → ``130`` | ``u129w`` → ``130`` |
| one-digit add | ``3+4=`` → ``7`` | ``3p4q`` → ``7`` | |
| one-digit subtract | ``7-3=`` → ``4`` | | ``7m3w`` → ``4`` |
| multi-digit add | ``123+35=`` → ``158`` | ``12p35q`` → ``47`` | |
| multi-digit subtract | ``123-35=`` → ``88`` | | ``53m21w`` → ``32`` |

Subtractions always have ``a >= b``. The evaluation splits are fixed (their own seed,
independent of the zoo's) and every operand pair in them is excluded from all training
data. ``evaluation_splits`` and ``excluded_pairs`` here are the first zoo's
(``two-experts``, also used by ``distractor``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *"0123456789", *"CRS+=", *"crspq"]  # two-experts
PAD, BOS, EOS = 0, 1, 2

SYMBOLS = {
    "en": {"copy": "C", "reverse": "R", "successor": "S", "plus": "+", "minus": "-", "equals": "="},
    "xl": {"copy": "c", "reverse": "r", "successor": "s", "plus": "p", "equals": "q"},
    "zl": {"copy": "k", "reverse": "v", "successor": "u", "minus": "m", "equals": "w"},
}
OPERATORS = "+p-m"  # every language's plus and minus

Example = tuple[str, str]  # (prompt, answer)
Pairs = frozenset[tuple[int, int]]


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


def add_multi_digit(lang: str, rng: random.Random, exclude: Pairs = frozenset(),
                    digits: tuple[int, int] = (2, 4)) -> Example:
    s = SYMBOLS[lang]
    while True:
        a, b = _number(rng, *digits), _number(rng, *digits)
        if (a, b) not in exclude:
            return f"{a}{s['plus']}{b}{s['equals']}", str(a + b)


def add_multi_digit_reversed(lang: str, rng: random.Random, exclude: Pairs = frozenset(),
                             digits: tuple[int, int] = (2, 4)) -> Example:
    """A sum written backwards (``123+35=`` → ``851``): the distractor's skill."""
    prompt, answer = add_multi_digit(lang, rng, exclude, digits)
    return prompt, answer[::-1]


def sub_one_digit(lang: str, rng: random.Random) -> Example:
    s = SYMBOLS[lang]
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    a, b = max(a, b), min(a, b)
    return f"{a}{s['minus']}{b}{s['equals']}", str(a - b)


def sub_multi_digit(lang: str, rng: random.Random, exclude: Pairs = frozenset(),
                    digits: tuple[int, int] = (2, 4)) -> Example:
    s = SYMBOLS[lang]
    while True:
        a, b = _number(rng, *digits), _number(rng, *digits)
        a, b = max(a, b), min(a, b)
        if (a, b) not in exclude:
            return f"{a}{s['minus']}{b}{s['equals']}", str(a - b)


SKILLS: dict[str, Callable[[str, random.Random], Example]] = {
    "copy": copy,
    "reverse": reverse,
    "successor": successor,
    "add1": add_one_digit,
}
SUB_SKILLS: dict[str, Callable[[str, random.Random], Example]] = {
    "copy": copy,
    "reverse": reverse,
    "successor": successor,
    "sub1": sub_one_digit,
}

TARGET_DIGITS = (2, 2)  # the target adds two-digit numbers: 12p35q -> 47
MATH_DIGITS = (2, 3)  # the math expert adds numbers of two to three digits
EVAL_SEED = 20240319  # the evaluation splits never change with the zoo's seed
EVAL_SIZE = 200


def operands(prompt: str) -> tuple[int, int]:
    for op in OPERATORS:
        if op in prompt:
            a, b = prompt[:-1].split(op)
            return int(a), int(b)
    raise ValueError(f"{prompt!r} is not an addition or a subtraction")


def unique_examples(make: Callable[[Pairs], Example], used: set[tuple[int, int]],
                    n: int = EVAL_SIZE) -> list[Example]:
    """``n`` examples of ``make(exclude)`` whose operand pairs are new; ``used`` grows."""
    out: list[Example] = []
    while len(out) < n:
        ex = make(frozenset(used))
        used.add(operands(ex[0]))
        out.append(ex)
    return out


def pairs_of(examples: Iterable[Example]) -> Pairs:
    """Operand pairs of ``examples``, both orders."""
    pairs: set[tuple[int, int]] = set()
    for prompt, _ in examples:
        a, b = operands(prompt)
        pairs.update({(a, b), (b, a)})
    return frozenset(pairs)


def evaluation_splits() -> dict[str, list[Example]]:
    """Every task's examples of the first zoo, deterministic. The two target splits
    (search and held-out) have disjoint operand pairs, and the ``en`` multi-digit task
    uses pairs of its own; all of them are kept out of training."""
    rng = random.Random(EVAL_SEED)
    splits: dict[str, list[Example]] = {}
    used: set[tuple[int, int]] = set()

    def unique_additions(lang: str, digits: tuple[int, int]) -> list[Example]:
        return unique_examples(lambda exclude: add_multi_digit(lang, rng, exclude, digits), used)

    splits["xl_add"] = unique_additions("xl", TARGET_DIGITS)
    splits["xl_add_heldout"] = unique_additions("xl", TARGET_DIGITS)
    splits["en_add"] = unique_additions("en", MATH_DIGITS)
    for lang in ("en", "xl"):
        for name, fn in SKILLS.items():
            splits[f"{lang}_{name}"] = [fn(lang, rng) for _ in range(EVAL_SIZE)]
    return splits


def excluded_pairs() -> Pairs:
    """Operand pairs (both orders) of the first zoo's multi-digit evaluation splits."""
    splits = evaluation_splits()
    return pairs_of(ex for name, examples in splits.items()
                    if name.endswith(("_add", "_add_heldout")) for ex in examples)
