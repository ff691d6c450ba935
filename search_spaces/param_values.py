"""Evaluating a recipe parameter without the engine, on "probe" tensors.

``encode`` must tell which value a hand-made recipe gives each gene, and search spaces
import no torch and no workers. The rules themselves are shared with the engine
(``search_spaces.recipe.evaluate_setting``); only the tensors differ: a value is a
scalar, a per-layer gradient (layer ``i`` of ``L`` at ``t = i/(L-1)``, non-layer
tensors at ``t = 0``), or a filtered list where the first matching filter wins; a
filter is a module category or a substring of the tensor name.

The probes are the tensors of a Llama-style decoder (the naming most families share):
per layer the attention and MLP projections and the two norms, and outside the layers
the embeddings, the head and the final norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from search_spaces.recipe import evaluate_setting, resolve_setting

CATEGORIES = ("attention", "mlp", "embeddings", "norms", "other")

_LAYER_PROBES = (
    ("self_attn.q_proj.weight", "attention"),
    ("self_attn.k_proj.weight", "attention"),
    ("self_attn.v_proj.weight", "attention"),
    ("self_attn.o_proj.weight", "attention"),
    ("mlp.gate_proj.weight", "mlp"),
    ("mlp.up_proj.weight", "mlp"),
    ("mlp.down_proj.weight", "mlp"),
    ("input_layernorm.weight", "norms"),
    ("post_attention_layernorm.weight", "norms"),
)
_EDGE_PROBES = (
    ("model.embed_tokens.weight", "embeddings"),
    ("lm_head.weight", "embeddings"),
    ("model.norm.weight", "norms"),
)


@dataclass(frozen=True)
class Probe:
    """A representative tensor: its name, module category and layer (None outside)."""

    name: str
    category: str
    layer: int | None


def probes(num_layers: int) -> list[Probe]:
    out = [Probe(name, cat, None) for name, cat in _EDGE_PROBES]
    for layer in range(num_layers):
        out += [Probe(f"model.layers.{layer}.{s}", cat, layer) for s, cat in _LAYER_PROBES]
    return out


def position(probe: Probe, num_layers: int) -> Fraction:
    """Relative depth of a probe, as the engine computes it for a one-slice merge."""
    if probe.layer is None:
        return Fraction(0)
    if num_layers <= 1:
        return Fraction(1)
    return Fraction(probe.layer, num_layers - 1)


def filter_matches(flt: str | None, probe: Probe) -> bool:
    if flt is None or flt == "*":
        return True
    if flt in CATEGORIES:
        return probe.category == flt
    return flt in probe.name


def evaluate(setting: Any, probe: Probe, pos: Fraction) -> Any:
    """The value of one setting for a probe (None when no filter matches)."""
    return evaluate_setting(setting, lambda flt: filter_matches(flt, probe), pos)


def resolve(name: str, scopes: list[dict[str, Any] | None], probe: Probe, pos: Fraction) -> Any:
    """First value of ``name`` found in ``scopes`` (most specific first), else None."""
    return resolve_setting(name, scopes, lambda flt: filter_matches(flt, probe), pos)
