"""The model configurations of the zoo family: one size (hidden 64, intermediate 256,
4 layers, 4 heads, untied embeddings, 32 positions), three architectures."""

from __future__ import annotations

from typing import Any

from workers.zoo.vocab import BOS, EOS, PAD

SIZES: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=32,
    tie_word_embeddings=False,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
)


def llama(vocab_size: int):
    """The first zoo's model: Llama, multi-head attention."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, num_key_value_heads=4, **SIZES)


def mistral_gqa(vocab_size: int):
    """Mistral with grouped-query attention (2 key/value heads)."""
    from transformers import MistralConfig

    return MistralConfig(vocab_size=vocab_size, num_key_value_heads=2, sliding_window=None, **SIZES)


def qwen2_gqa(vocab_size: int):
    """Qwen2: biases on the query/key/value projections, grouped-query attention."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab_size, num_key_value_heads=2, **SIZES)


def model_for(config):  # type: ignore[no-untyped-def]
    """A freshly initialised causal LM of ``config``'s architecture (the global torch seed decides)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    return cls(config)
