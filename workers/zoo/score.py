"""Exact-match scoring of the zoo's tasks with a plain batched greedy decoder.

Prompts are grouped by length so no padding is needed; each group decodes greedily
until every row has produced end-of-sequence (or ``max_new`` tokens).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from workers.zoo.skills import VOCAB, Example
from workers.zoo.vocab import EOS, Vocab, vocab

FIRST_ZOO_VOCAB = vocab(tuple(VOCAB))


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, prompts: list[str], max_new: int = 7,
                   tokens: Vocab = FIRST_ZOO_VOCAB) -> list[str]:
    by_len: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        by_len[len(p)].append(i)
    out = [""] * len(prompts)
    for idxs in by_len.values():
        ids = torch.tensor([tokens.encode(prompts[i]) for i in idxs])
        done = torch.zeros(len(idxs), dtype=torch.bool)
        generated: list[torch.Tensor] = []
        for _ in range(max_new):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
            generated.append(nxt)
            done |= nxt == EOS
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        gen = torch.stack(generated, 1)
        for row, i in enumerate(idxs):
            out[i] = tokens.decode(gen[row].tolist())
    return out


def exact_match(model: torch.nn.Module, examples: list[Example], tokens: Vocab = FIRST_ZOO_VOCAB) -> float:
    """The share of ``examples`` answered exactly; ``tokens``: the zoo variant's vocabulary
    (default: the first zoo's, shared by ``two-experts`` and ``distractor``)."""
    answers = greedy_answers(model, [p for p, _ in examples], tokens=tokens)
    return sum(a == gold for a, (_, gold) in zip(answers, examples)) / len(examples)
