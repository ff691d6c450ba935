"""Training the zoo's tiny models: AdamW with warm-up and cosine decay, loss on the answer
tokens only, in the variant's character-level vocabulary. Deterministic for a seed on CPU."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from fnmatch import fnmatchcase

import torch

from workers.zoo.skills import Example
from workers.zoo.variant import Stage
from workers.zoo.vocab import EOS, PAD, Vocab


def _batch(examples: list[Example], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor]:
    seqs, masks = [], []
    for prompt, answer in examples:
        p, a = vocab.encode(prompt), [*vocab.encode(answer), EOS]
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


def trained_parameters(model: torch.nn.Module, patterns: tuple[str, ...] | None) -> list[torch.nn.Parameter]:
    if patterns is None:
        return list(model.parameters())
    chosen = [p for n, p in model.named_parameters() if any(fnmatchcase(n, pat) for pat in patterns)]
    if not chosen:
        raise ValueError(f"no parameter matches {patterns}")
    return chosen


def _pairs(pairs: list[tuple[str, str]], vocab: Vocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids, target ids and the mask of real positions of same-length text pairs."""
    width = max(len(a) for a, _ in pairs)
    ids = torch.full((len(pairs), width), PAD, dtype=torch.long)
    target = torch.full_like(ids, PAD)
    for i, (a, b) in enumerate(pairs):
        if len(a) != len(b):
            raise ValueError(f"an embeddings stage needs texts of one length: {a!r}, {b!r}")
        ids[i, : len(a)] = torch.tensor(vocab.encode(a))
        target[i, : len(b)] = torch.tensor(vocab.encode(b))
    return ids, target, ids != PAD


def _loss(model: torch.nn.Module, stage: Stage, batch: list, vocab: Vocab) -> torch.Tensor:
    if stage.objective == "embeddings":
        ids, target, real = _pairs(batch, vocab)
        hidden = model(input_ids=ids, attention_mask=real.long(), output_hidden_states=True).hidden_states
        with torch.no_grad():
            goal = model.get_input_embeddings()(target)
        err = ((hidden[stage.depth] - goal) ** 2).sum(-1)[real]
        return err.mean() / (goal**2).sum(-1)[real].mean()  # relative: the scale of the embeddings
    ids, target_mask = _batch(batch, vocab)
    logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    # position t predicts token t+1; score only answer tokens
    pred, gold, mask = logits[:, :-1], ids[:, 1:], target_mask[:, 1:]
    return torch.nn.functional.cross_entropy(pred[mask], gold[mask])


def train(model: torch.nn.Module, stage: Stage, seed: int, vocab: Vocab,
          log: Callable[[str], None] | None = None) -> float:
    """Train ``model`` in place; returns the mean loss of the last 50 steps."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    weights = [w for w, _ in stage.mixture]
    makers = [m for _, m in stage.mixture]
    params = trained_parameters(model, stage.trains)
    chosen = {id(p) for p in params}
    frozen = [p for p in model.parameters() if id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, int(stage.warmup * stage.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, stage.steps, warmup))
    model.train()
    recent: list[float] = []
    try:
        for step in range(stage.steps):
            examples = [rng.choices(makers, weights)[0](rng) for _ in range(stage.batch)]
            loss = _loss(model, stage, examples, vocab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            recent = [*recent, loss.item()][-50:]
            if log and (step + 1) % 100 == 0:
                log(f"  {stage.name}: step {step + 1}/{stage.steps} loss {sum(recent) / len(recent):.4f}")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval()
    return sum(recent) / max(1, len(recent))
