"""Training the zoo's tiny models: a character-level Llama, AdamW with warm-up and
cosine decay, loss on the answer tokens only. Deterministic for a seed on CPU."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from workers.zoo.skills import EOS, PAD, VOCAB, Example

TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}


def encode(text: str) -> list[int]:
    return [TOKEN_ID[c] for c in text]


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


@dataclass(frozen=True)
class Stage:
    """One training run: a data mixture, a step count and a peak learning rate."""

    name: str
    mixture: Sequence[tuple[float, Callable[[random.Random], Example]]]
    steps: int
    lr: float
    batch: int = 128
    warmup: float = 0.05


def _batch(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, masks = [], []
    for prompt, answer in examples:
        p, a = encode(prompt), [*encode(answer), EOS]
        seqs.append(p + a)
        masks.append([0] * len(p) + [1] * len(a))
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        target_mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids, target_mask


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: torch.nn.Module, stage: Stage, seed: int,
          log: Callable[[str], None] | None = None) -> float:
    """Train ``model`` in place; returns the mean loss of the last 50 steps."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    weights = [w for w, _ in stage.mixture]
    makers = [m for _, m in stage.mixture]
    opt = torch.optim.AdamW(model.parameters(), lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, int(stage.warmup * stage.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, stage.steps, warmup))
    model.train()
    recent: list[float] = []
    for step in range(stage.steps):
        examples = [rng.choices(makers, weights)[0](rng) for _ in range(stage.batch)]
        ids, target_mask = _batch(examples)
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        # position t predicts token t+1; score only answer tokens
        pred, gold, mask = logits[:, :-1], ids[:, 1:], target_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(pred[mask], gold[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = [*recent, loss.item()][-50:]
        if log and (step + 1) % 100 == 0:
            log(f"  {stage.name}: step {step + 1}/{stage.steps} loss {sum(recent) / len(recent):.4f}")
    model.eval()
    return sum(recent) / max(1, len(recent))
