"""A zoo variant's character-level vocabulary: token ids, encoding and decoding.

Every zoo vocabulary starts with ``<pad> <s> </s> <unk>``, so the special ids are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS, UNK = 0, 1, 2, 3


class Vocab:
    """Tokens in id order; one character per token after the four specials."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[:4]) != SPECIALS:
            raise ValueError(f"a zoo vocabulary starts with {' '.join(SPECIALS)}, not {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"a zoo vocabulary repeats a token: {tokens}")
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """Up to the first end-of-sequence."""
        out = []
        for i in ids:
            if i == EOS:
                break
            out.append(self.tokens[i])
        return "".join(out)


@cache
def vocab(tokens: tuple[str, ...]) -> Vocab:
    return Vocab(tokens)
