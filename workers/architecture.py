"""The layer structure of a decoder model, found from its tensor names.

Works for the common decoder layouts without per-architecture tables: Llama, Mistral,
Qwen2 (attention biases), Gemma / Gemma 2 (post-sublayer norms), Phi-3 (fused
projections) use ``model.layers.N.``; GPT-2 style models use ``transformer.h.N.`` (or
``h.N.``). Every tensor is put in a module category (attention / mlp / embeddings /
norms / other) that recipe filters can name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from search_spaces.tensor_names import EMBED_NAMES, HEAD_NAMES, LAYER_RE

__all__ = ["CATEGORIES", "LAYER_RE", "ArchitectureError", "ModelLayout", "category", "find_layout",
           "layer_count_keys"]

CATEGORIES = ("attention", "mlp", "embeddings", "norms", "other")

_ATTN_OUT = re.compile(
    r"(?:^|\.)(?:self_attn|attn|attention|self_attention)\.(?:o_proj|c_proj|out_proj|dense)\.(?:weight|bias)$"
)
_MLP_OUT = re.compile(
    r"(?:^|\.)(?:mlp|feed_forward|ffn)\.(?:down_proj|c_proj|fc2|dense_4h_to_h|w2)\.(?:weight|bias)$"
)


def category(name: str) -> str:
    """Module category of a tensor name: attention, mlp, embeddings, norms or other."""
    lowered = name.lower()
    leaf = lowered.rsplit(".", 2)
    tail = ".".join(leaf[-2:])
    if "norm" in tail or re.search(r"(?:^|\.)ln_?\w*\.(?:weight|bias)$", lowered):
        return "norms"
    if any(k in lowered for k in ("embed", "wte", "wpe", "lm_head", "embed_out")):
        return "embeddings"
    if any(k in lowered for k in ("attn", "attention")):
        return "attention"
    if any(k in lowered for k in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    return "other"


class ArchitectureError(ValueError):
    """The model's tensors do not form a layer structure we can merge."""


@dataclass
class ModelLayout:
    """Where a model's decoder layers are, and what else it holds."""

    layer_prefix: str
    num_layers: int
    layer_suffixes: list[str]
    pre_names: list[str] = field(default_factory=list)
    post_names: list[str] = field(default_factory=list)
    tied_head: str | None = None  # head name served by the input embedding
    embed_name: str | None = None

    def layer_name(self, idx: int, suffix: str) -> str:
        return f"{self.layer_prefix}.{idx}.{suffix}"

    def residual_scale_targets(self, model_type: str = "") -> list[tuple[str, bool]]:
        """Layer-tensor suffixes that a residual-contribution scale multiplies.

        Returns ``(suffix, unit_offset)`` pairs. For pre-norm layers these are the
        attention and MLP output projections (weight and bias). For layers with norms
        after each sub-layer (Gemma 2/3, OLMo 2) the scale goes on those norms instead;
        ``unit_offset`` marks norms computed as ``x * (1 + w)`` (Gemma), scaled as
        ``s * (1 + w) - 1``.
        """
        if "post_feedforward_layernorm.weight" in self.layer_suffixes:
            offset = model_type.startswith("gemma")
            return [
                (s, offset)
                for s in self.layer_suffixes
                if s in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
            ]
        targets = [
            (s, False) for s in self.layer_suffixes if _ATTN_OUT.search(s) or _MLP_OUT.search(s)
        ]
        if not targets:
            raise ArchitectureError(
                "cannot find the attention / MLP output projections of this architecture, "
                "so a residual scale cannot be applied; leave 'scale' unset"
            )
        return targets


def find_layout(names: list[str], config: dict, ref: str = "model") -> ModelLayout:
    """Derive the layer layout from tensor names (and ``config.json`` for tying)."""
    prefixes: dict[str, dict[int, set[str]]] = {}
    others: list[str] = []
    for name in names:
        m = LAYER_RE.match(name)
        if m:
            prefixes.setdefault(m["prefix"], {}).setdefault(int(m["idx"]), set()).add(m["rest"])
        else:
            others.append(name)
    if not prefixes:
        raise ArchitectureError(
            f"{ref}: no decoder layers found (expected tensor names like "
            "'model.layers.0.…' or 'transformer.h.0.…')"
        )
    # The decoder stack is the prefix with the most layers.
    prefix = max(prefixes, key=lambda p: len(prefixes[p]))
    for p, layers in prefixes.items():
        if p != prefix:
            others.extend(f"{p}.{i}.{r}" for i, rest in layers.items() for r in rest)
    layers = prefixes[prefix]
    n = len(layers)
    if sorted(layers) != list(range(n)):
        raise ArchitectureError(f"{ref}: layer indices under {prefix!r} are not 0..{n - 1}")
    suffixes = sorted(layers[0])
    for i in range(1, n):
        if layers[i] != layers[0]:
            missing = sorted(set(layers[0]) ^ layers[i])
            raise ArchitectureError(f"{ref}: layer {i} differs from layer 0 in {missing[:5]}")
    embed = next((o for o in others if o.endswith(EMBED_NAMES)), None)
    pre = [o for o in others if category(o) == "embeddings" and not o.endswith(HEAD_NAMES)]
    post = [o for o in others if o not in pre]
    head_present = any(o.endswith(HEAD_NAMES) for o in others)
    tied = None
    if not head_present and embed is not None and config.get("tie_word_embeddings", True):
        tied = "lm_head.weight"
    return ModelLayout(
        layer_prefix=prefix,
        num_layers=n,
        layer_suffixes=suffixes,
        pre_names=sorted(pre),
        post_names=sorted(post),
        tied_head=tied,
        embed_name=embed,
    )


def layer_count_keys(config: dict) -> list[str]:
    """The config keys holding the number of layers (patched when stacking)."""
    keys = [k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config]
    text = config.get("text_config")
    if isinstance(text, dict):
        keys += [f"text_config.{k}" for k in layer_count_keys(text)]
    return keys
