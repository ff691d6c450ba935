"""What the memory planner knows of a model and of an evaluation, from headers only
(torch-free): :class:`SourceFacts`, :class:`EvalFacts`, dtype names and sizes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from search_spaces.tensor_names import LAYER_RE

# A histogram is kept for tensors above HISTOGRAM_MIN_ELEMENTS (4 × sparsify.SAMPLE_SIZE):
# at most 65,536 occupied bins of 20 bytes and 65,536 refined values of 8 bytes
# (MagnitudeHistogram.MAX_OCCUPIED, MAX_REFINED; tests/test_memory_plan.py keeps them in step).
HISTOGRAM_MIN_ELEMENTS = 4 * (1 << 16)
HISTOGRAM_MAX_BYTES = (1 << 16) * 20 + (1 << 16) * 8
# Evaluation: float32 activations alive at once in a forward pass, in hidden widths.
ACTIVATION_WIDTHS = 8
# The padded length of an evaluation batch when the evaluation does not say (lm-eval pads
# each batch to its longest request; few tasks go past a thousand tokens).
DEFAULT_EVAL_TOKENS = 1024
MAX_EVAL_TOKENS = 1_000_000
MAX_BATCH_SIZE = 4096
MAX_BYTES = 1 << 60  # 1 EiB: no memory size or model size is larger


DEVICES = ("cpu", "cuda")
CANDIDATE_DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {
    "F64": "float64", "F32": "float32", "BF16": "bfloat16", "F16": "float16",  # safetensors
    "fp64": "float64", "double": "float64", "fp32": "float32", "float": "float32",
    "fp16": "float16", "half": "float16", "bf16": "bfloat16",
}
_OTHER_DTYPE_BYTES = {"bool": 1, "u8": 1, "i8": 1, "uint8": 1, "int8": 1, "i16": 2, "int16": 2, "i32": 4,
                      "int32": 4, "i64": 8, "int64": 8, "f8_e4m3": 1, "f8_e5m2": 1}
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]i?)?b?\s*$", re.I)


def gb(nbytes: int | None) -> str:
    """Bytes as decimal GB with one decimal (the unit of the plan's messages); sizes below
    0.1 GB in MB (or bytes), so that a small model does not read as '0.0 GB'."""
    if nbytes is None:
        return "unknown"
    if nbytes >= 10**8 or nbytes == 0:
        return f"{nbytes / 1e9:.1f} GB"
    return f"{nbytes / 1e6:.1f} MB" if nbytes >= 10**5 else f"{nbytes} bytes"


def dtype_name(name: str) -> str | None:
    """A floating dtype's canonical name (float32, bfloat16, …) from a safetensors, torch or
    short name; None for anything else (integers, bool, float8)."""
    text = str(name).removeprefix("torch.")
    text = _DTYPE_ALIASES.get(text, text)
    return text if text in DTYPE_BYTES else None


def parse_size(value: int | float | str) -> int:
    """A memory size in bytes from ``80GB``, ``24GiB``, ``512MB``, ``1.5TB`` or a number of bytes.

    Decimal units (KB, MB, GB, TB) are powers of 1000, binary ones (KiB … TiB) of 1024."""
    if isinstance(value, bool):
        raise ValueError("a memory size is a number of bytes or a text such as '80GB', not a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = _SIZE.match(str(value))
        if m is None:
            raise ValueError(f"{str(value)[:40]!r} is not a memory size: write e.g. 80GB, 24GiB, 512MB or a "
                             "number of bytes")
        number = float(m["num"]) * _UNITS[(m["unit"] or "").lower()]
    if not 1 <= number <= MAX_BYTES:
        raise ValueError(f"memory size {number:.0f} bytes is outside 1 byte … 1 EiB")
    return int(number)


# ---- facts -------------------------------------------------------------------------------
def _check_count(owner: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_BYTES:
            raise ValueError(f"{owner}.{key} must be an integer in 0 … 2^60, got {value!r}")


@dataclass(frozen=True)
class SourceFacts:
    """One model as the planner sees it (from its headers, or from the loaded tensors)."""

    ref: str
    nbytes: int  # every tensor, in its stored dtype
    numel: int  # floating-point elements
    largest_numel: int  # elements of its largest floating-point tensor
    dtype: str  # the dominant floating dtype: bfloat16, float16, float32 or float64
    layer_nbytes: int = 0  # bytes of one decoder layer
    num_layers: int = 0
    # the most its task vector's magnitude histograms take (a trimming method's worker)
    histogram_bytes: int = 0
    # a LoRA adapter: elements of the largest tensor it composes (base + B·A·scale) per merge step
    composed_numel: int = 0

    def __post_init__(self) -> None:
        _check_count("SourceFacts", nbytes=self.nbytes, numel=self.numel, largest_numel=self.largest_numel,
                     layer_nbytes=self.layer_nbytes, num_layers=self.num_layers,
                     histogram_bytes=self.histogram_bytes, composed_numel=self.composed_numel)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"SourceFacts.dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class EvalFacts:
    """What the evaluation's memory depends on. :meth:`nbytes` is an estimate: the KV
    cache, float32 logits over the whole padded batch, and ``ACTIVATION_WIDTHS`` float32
    hidden-width activations per token."""

    batch_size: int
    max_length: int  # padded tokens per sequence
    num_layers: int
    kv_width: int  # num_key_value_heads × head_dim
    vocab: int
    hidden: int

    def __post_init__(self) -> None:
        _check_count("EvalFacts", num_layers=self.num_layers, kv_width=self.kv_width, vocab=self.vocab,
                     hidden=self.hidden)
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"EvalFacts.batch_size {self.batch_size} is outside 1 … {MAX_BATCH_SIZE}")
        if not 1 <= self.max_length <= MAX_EVAL_TOKENS:
            raise ValueError(f"EvalFacts.max_length {self.max_length} is outside 1 … {MAX_EVAL_TOKENS}")

    def parts(self, dtype_bytes: int) -> dict[str, int]:
        """The estimate's parts in bytes, the KV cache in the candidate's dtype."""
        tokens = self.batch_size * self.max_length
        return {
            "kv_cache": tokens * self.num_layers * 2 * self.kv_width * dtype_bytes,
            "logits": tokens * self.vocab * 4,
            "activations": ACTIVATION_WIDTHS * tokens * self.hidden * 4,
        }

    def nbytes(self, dtype_bytes: int) -> int:
        return sum(self.parts(dtype_bytes).values())


def _layer_of(name: str) -> tuple[str, int] | None:
    m = LAYER_RE.match(name)
    return (m["prefix"], int(m["idx"])) if m else None


def _config_value(config: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` set in ``config`` or its ``text_config`` (multimodal configs)."""
    text = config.get("text_config")
    for cfg in (config, text if isinstance(text, Mapping) else {}):
        for key in keys:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def facts_from_tensors(ref: str, tensors: Iterable[tuple[str, Sequence[int], str]],
                       config: Mapping[str, Any]) -> SourceFacts:
    """A model's facts from (name, shape, dtype name) of each tensor and its ``config.json``.

    Dtype names may be safetensors' (``BF16``), torch's (``torch.bfloat16``) or plain
    (``bfloat16``). One decoder layer's bytes come from the names (``model.layers.N.…``,
    the stack with the most layers); the layer count from the names, else the config.
    """
    nbytes = numel = largest = 0
    by_dtype: dict[str, int] = {}
    layer_bytes: dict[tuple[str, int], int] = {}
    histograms = 0
    for name, shape, dtype in tensors:
        n = 1
        for d in shape:
            n *= int(d)
        canonical = dtype_name(dtype)
        size = n * (DTYPE_BYTES[canonical] if canonical else _other_dtype_bytes(dtype))
        nbytes += size
        layer = _layer_of(name)
        if layer is not None:
            layer_bytes[layer] = layer_bytes.get(layer, 0) + size
        if canonical is not None:
            numel += n
            largest = max(largest, n)
            if n > HISTOGRAM_MIN_ELEMENTS:
                histograms += HISTOGRAM_MAX_BYTES
            by_dtype[canonical] = by_dtype.get(canonical, 0) + size
    stacks: dict[str, list[int]] = {}
    for (prefix, _), size in layer_bytes.items():
        stacks.setdefault(prefix, []).append(size)
    layers = max(stacks.values(), key=len) if stacks else []
    num_layers = len(layers) or int(_config_value(config, "num_hidden_layers", "n_layer", "num_layers") or 0)
    return SourceFacts(
        ref=ref, nbytes=nbytes, numel=numel, largest_numel=largest,
        dtype=max(by_dtype, key=lambda k: by_dtype[k]) if by_dtype else "float32",
        layer_nbytes=max(layers) if layers else 0, num_layers=num_layers, histogram_bytes=histograms,
    )


def adapter_facts(ref: str, tensors: Iterable[tuple[str, Sequence[int], str]], base: SourceFacts,
                  composed_numel: int) -> SourceFacts:
    """A LoRA adapter's facts: it holds its own tensors (``tensors``: the adapter file's), and
    stands for a model of its base's size, whose task vectors and histograms are full-size;
    ``composed_numel``: its largest changed tensor, composed on the device when a merge reads it."""
    own = facts_from_tensors(ref, tensors, {})
    return SourceFacts(ref=ref, nbytes=own.nbytes, numel=base.numel, largest_numel=base.largest_numel,
                       dtype=base.dtype, layer_nbytes=base.layer_nbytes, num_layers=base.num_layers,
                       histogram_bytes=base.histogram_bytes, composed_numel=composed_numel)


def _other_dtype_bytes(name: str) -> int:
    """Bytes per element of a non-floating dtype (integers, bool, float8), by its name."""
    text = str(name).removeprefix("torch.").lower()
    if text in _OTHER_DTYPE_BYTES:
        return _OTHER_DTYPE_BYTES[text]
    digits = re.search(r"(\d+)", text)
    return max(1, int(digits[1]) // 8) if digits else 1


def eval_facts(config: Mapping[str, Any], batch_size: int, max_length: int | None) -> EvalFacts:
    """The evaluation's facts from a model's ``config.json``. Without ``max_length`` the padded
    length is ``DEFAULT_EVAL_TOKENS``, at most the model's context."""
    hidden = int(_config_value(config, "hidden_size", "n_embd", "d_model") or 0)
    heads = int(_config_value(config, "num_attention_heads", "n_head") or 0)
    kv_heads = int(_config_value(config, "num_key_value_heads", "num_kv_heads") or heads)
    head_dim = int(_config_value(config, "head_dim") or (hidden // heads if heads else hidden))
    context = _config_value(config, "max_position_embeddings", "n_positions", "n_ctx")
    length = max_length or min(DEFAULT_EVAL_TOKENS, int(context or DEFAULT_EVAL_TOKENS))
    return EvalFacts(
        batch_size=batch_size, max_length=min(length, MAX_EVAL_TOKENS),
        num_layers=int(_config_value(config, "num_hidden_layers", "n_layer", "num_layers") or 0),
        kv_width=(kv_heads * head_dim) if heads else hidden,
        vocab=int(_config_value(config, "vocab_size") or 0), hidden=hidden,
    )
