"""Random models of real architectures, for tests and benchmarks (no hub needed).

``make_family`` writes a base model and "experts" (the base plus a seeded
perturbation) of one architecture in Hugging Face format, with a small character-level
tokenizer that ``AutoTokenizer`` loads offline.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True
    ),
    "mistral": dict(
        model_type="mistral", architectures=["MistralForCausalLM"], tie_word_embeddings=False
    ),
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False
    ),
    "gemma2": dict(
        model_type="gemma2", architectures=["Gemma2ForCausalLM"], tie_word_embeddings=True,
        head_dim=8, query_pre_attn_scalar=8,
    ),
    "phi3": dict(
        model_type="phi3", architectures=["Phi3ForCausalLM"], tie_word_embeddings=False,
        pad_token_id=0,
    ),
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], tie_word_embeddings=True),
}

VOCAB = ["<pad>", "<s>", "</s>", "<unk>", *string.digits, *string.ascii_letters, *"+=?-.,: "]


def tokenizer_files(out: Path, vocab: list[str] | None = None) -> None:
    """Write a character-level fast tokenizer that loads offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = vocab or VOCAB
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.save_pretrained(str(out))


def make_config(arch: str, *, hidden: int = 32, layers: int = 2, vocab: int = len(VOCAB),
                intermediate: int | None = None, heads: int = 4):
    from transformers import AutoConfig

    spec = dict(ARCHITECTURES[arch])
    model_type = spec.pop("model_type")
    if arch == "gpt2":
        return AutoConfig.for_model(
            model_type, n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab,
            n_positions=128, bos_token_id=1, eos_token_id=2, **spec,
        )
    return AutoConfig.for_model(
        model_type,
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        **spec,
    )


def make_model(arch: str, out: Path, *, seed: int = 0, base: Path | None = None,
               noise: float = 0.02, dtype: torch.dtype = torch.float32,
               shard_size: str | None = None, safe: bool = True, **config_kw: Any) -> Path:
    """Save one model: random (seeded), or ``base`` plus seeded Gaussian noise."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    torch.manual_seed(seed)
    if base is None:
        model = AutoModelForCausalLM.from_config(make_config(arch, **config_kw))
        with torch.no_grad():  # bias-free inits leave biases at 0: give them some life
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name or "ln_" in name:
                    p.add_(torch.randn_like(p) * 0.05)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if shard_size:
        kwargs["max_shard_size"] = shard_size
    model.save_pretrained(str(out), **kwargs)
    if not safe:  # the legacy pickle format, as older checkpoints have it
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state = {k: v for k, v in state.items() if not k.endswith("lm_head.weight")}
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        torch.save(state, out / "pytorch_model.bin")
    tokenizer_files(out)
    return out


def make_family(arch: str, root: Path, n_experts: int = 2, *, seed: int = 0,
                **kw: Any) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` fine-tune-like variants of it."""
    base = make_model(arch, root / f"{arch}-base", seed=seed, **kw)
    experts = [
        make_model(arch, root / f"{arch}-expert{i}", seed=seed + 100 + i, base=base,
                   **{k: v for k, v in kw.items() if k in ("dtype", "shard_size", "safe", "noise")})
        for i in range(n_experts)
    ]
    return base, experts


def read_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())
