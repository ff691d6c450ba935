"""``layered``: a zoo where layer stacking has something to exploit (Llama).

The target is two-digit addition written in xl, as in ``two-experts``, and the
``math`` and ``language`` experts are there too. A fourth model, ``reader``, reads xl
in its first two layers: they are trained to turn an xl text into exactly the stream
of the en text's embeddings (a relative squared error, every position), and its last
two layers then learn the xl skills on top of that stream. ``math`` here trains its
decoder layers only (the embeddings, final norm and head stay the base's), so every
model shares one embedding table and one head.

Stacking the reader's first two layers under all four of the math expert's gives a
six-layer model that reads xl and adds: the composition lives in depth, which a
parameter-space merge (one value per layer and model) cannot express but a stack can.
The variant keeps the language expert so that a parameter-space search has its usual
route to a partial solution, and the stacking study something to beat.
"""

from __future__ import annotations

import random
from functools import partial

from workers.zoo.architectures import llama
from workers.zoo.skills import (
    SKILLS,
    SYMBOLS,
    VOCAB,
    add_multi_digit,
    evaluation_splits,
    excluded_pairs,
)
from workers.zoo.variant import Stage, ZooVariant
from workers.zoo.variants import two_experts

FRONT = 2  # the reader's layers that translate xl into en's embedding stream
LAYERS = tuple(f"model.layers.{i}.*" for i in range(4))
EN_TO_XL = str.maketrans({SYMBOLS["en"][k]: SYMBOLS["xl"][k] for k in SYMBOLS["xl"] if k in SYMBOLS["en"]})


def _en_text(rng: random.Random, held: frozenset[tuple[int, int]]) -> str:
    """A whole en training sequence (prompt and answer): a skill, or a sum of one to
    three digits whose operands are never in an evaluation split."""
    if rng.random() < 0.4:
        prompt, answer = add_multi_digit("en", rng, held, (1, 3))
    else:
        prompt, answer = SKILLS[rng.choice(sorted(SKILLS))]("en", rng)
    return prompt + answer


def _translation_pair(held: frozenset[tuple[int, int]], rng: random.Random) -> tuple[str, str]:
    """(xl text, the same text in en): the reader's front learns to map the first onto the
    embeddings of the second. No answer of an xl sum is ever a training target."""
    en = _en_text(rng, held)
    return en.translate(EN_TO_XL), en


def stages(scale: float = 1.0) -> dict[str, Stage]:
    plan = two_experts.stages(scale)
    steps = lambda n: max(10, int(n * scale))  # noqa: E731
    held = excluded_pairs()
    math = plan["math"]
    plan["math"] = Stage("math", math.mixture, math.steps, math.lr, trains=LAYERS)
    plan["reader_front"] = Stage("reader_front", [(1.0, partial(_translation_pair, held))], steps(600), 3e-3,
                                 trains=LAYERS[:FRONT], objective="embeddings", depth=FRONT)
    plan["reader"] = Stage("reader", [(1.0 / 4, partial(SKILLS[n], "xl")) for n in SKILLS], steps(600), 3e-3,
                           start="reader_front", trains=LAYERS[FRONT:])
    return plan


VARIANT = ZooVariant(
    name="layered",
    summary="two-experts plus a reader whose first layers turn xl into en: stacking can compose in depth",
    vocab=tuple(VOCAB),
    architecture=llama,
    models=("base", "math", "language", "reader"),
    stages=stages,
    evaluation_splits=evaluation_splits,
    target="xl_add",
    heldout="xl_add_heldout",
    skills={**two_experts.VARIANT.skills, "reader": ("xl_add1", "xl_successor")},
    stack=("reader", "math"),
    descriptions=two_experts.DESCRIPTIONS,
)
