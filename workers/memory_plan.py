"""How much memory a study's workers need, and which memory tier they use.

Torch-free on purpose: the API plans a study from file headers before anything is
loaded (``import service`` must not import torch), and each worker re-plans with its own
resources at start. The merge engine (``workers.tensor_merge``) reads its chunk size
from here, so the plan and the engine agree on the workspace.

The plan (docs/workers.md, "Memory: tiers and sizing a worker"):

- **resident**: the sources are loaded onto the compute device once; the device holds
  the sources, the candidate, the merge workspace and the evaluation;
- **streamed** (GPU workers only): the sources stay in pinned host memory and each
  tensor's inputs are copied to the device while the previous tensor is merged; the
  device holds the candidate, the workspace, a double-buffered staging area and the
  evaluation;
- **mapped**: the sources are read through the page cache (mmap), for hosts smaller
  than the sources; on a GPU each tensor's inputs go through a small pinned staging
  buffer.

``plan_memory`` picks the fastest tier that fits (resident, then streamed, then mapped)
or raises :class:`DoesNotFit` with the numbers and the fix. Every figure is an estimate
of the large buffers; allocator slack, the CUDA context and Python's own memory come on
top (a few hundred MB).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

# Elements per chunk when a method merges a tensor piece by piece in float32
# (workers.tensor_merge): each float32 scratch buffer of a chunked merge is this big.
# 2^22 (16 MB of float32): a compiled kernel keeps its temporaries in registers, so a
# chunk's size costs no memory there, and fewer chunks mean fewer calls (each ~0.2 ms
# of Python and guards on a CPU, a quarter of a candidate's time at 2^20).
CHUNK_ELEMENTS = 1 << 22
# Chunks of a method merged eagerly (MergeMethod.fused False) and of the eager passes
# that build histograms: their float32 temporaries stay in the CPU's cache (at 2^22,
# dare_ties took 29 s per candidate of the 1.1B bench models, at 2^20 16 s).
EAGER_CHUNK_ELEMENTS = 1 << 20

# Methods whose output at each entry depends only on the inputs at that entry and on
# per-tensor statistics (a trimming threshold, an L1 norm): merged in chunks, so their
# workspace is a few chunks, not a few copies of the largest tensor. Kept in step with
# each method's ``chunked`` declaration by tests/test_memory_plan.py.
CHUNKED_METHODS = frozenset({
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "passthrough",
})
# Methods that convert each full input tensor to float32 (a global angle or a norm over
# the whole tensor that a chunk cannot give).
WHOLE_TENSOR_METHODS = frozenset({"slerp", "model_stock"})
METHODS = CHUNKED_METHODS | WHOLE_TENSOR_METHODS
# Methods that form task vectors (source − base): the only ones a task-vector cache helps.
TASK_VECTOR_METHODS = CHUNKED_METHODS - {"linear", "passthrough"}
# Methods that select by magnitude over the whole tensor: a worker keeps a magnitude
# histogram per task vector (workers.sparsify.MagnitudeHistogram), host memory; where its
# bins' values are not known exactly, a threshold is found among the entries of one bin,
# gathered in float32 only when the bin holds at most 1/1024 of the tensor.
TRIMMING_METHODS = frozenset({"ties", "breadcrumbs", "breadcrumbs_ties"})
BAND_FRACTION = 1 / 1024
# A histogram is kept for tensors above HISTOGRAM_MIN_ELEMENTS (4 × sparsify.SAMPLE_SIZE):
# at most 65,536 occupied bins of 20 bytes and 65,536 refined values of 8 bytes
# (MagnitudeHistogram.MAX_OCCUPIED, MAX_REFINED; tests/test_memory_plan.py keeps them in step).
HISTOGRAM_MIN_ELEMENTS = 4 * (1 << 16)
HISTOGRAM_MAX_BYTES = (1 << 16) * 20 + (1 << 16) * 8
CHUNK_BUFFERS = 8  # float32 chunk buffers of a chunked merge besides one per non-base input
WHOLE_TENSOR_BUFFERS = 5  # float32 full-tensor buffers of a whole-tensor merge besides its inputs
STAGING_SLOTS = 2  # double buffering: the next tensor's inputs arrive while this one merges
# A GPU worker that stages its sources copies a tensor bigger than this a chunk of rows
# at a time (workers.sources.Sources.for_merge), so staging holds at most this per input.
SLICE_ABOVE = 256 * 2**20
# A resident stacking candidate assigns the sources' tensors; residual scales fold into the
# output projections (o_proj, down_proj), about a third of a layer's bytes, which are new.
STACKING_NEW_FRACTION = 1 / 3
# Evaluation: float32 activations alive at once in a forward pass, in hidden widths.
ACTIVATION_WIDTHS = 8
# The padded length of an evaluation batch when the evaluation does not say (lm-eval pads
# each batch to its longest request; few tasks go past a thousand tokens).
DEFAULT_EVAL_TOKENS = 1024
MAX_EVAL_TOKENS = 1_000_000
MAX_BATCH_SIZE = 4096
MAX_BYTES = 1 << 60  # 1 EiB: no memory size or model size is larger

TIERS: tuple[str, ...] = ("resident", "streamed", "mapped")
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
_LAYER = re.compile(r"^(?P<prefix>(?:[\w.]*\.)?(?:layers|h|blocks|layer))\.(?P<idx>\d+)\.")
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

    def __post_init__(self) -> None:
        _check_count("SourceFacts", nbytes=self.nbytes, numel=self.numel, largest_numel=self.largest_numel,
                     layer_nbytes=self.layer_nbytes, num_layers=self.num_layers,
                     histogram_bytes=self.histogram_bytes)
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
    m = _LAYER.match(name)
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


# ---- limits ------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerLimits:
    """What one worker may use: its device's memory and its host's (None: unknown). On a CPU
    worker the device is the host: the smaller known of the two is its budget."""

    device: str  # "cpu" or "cuda"
    device_bytes: int | None
    host_bytes: int | None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"WorkerLimits.device {self.device!r} is not one of {', '.join(DEVICES)}")
        for key in ("device_bytes", "host_bytes"):
            value = getattr(self, key)
            if value is not None:
                _check_count("WorkerLimits", **{key: value})

    @property
    def cpu_budget(self) -> int | None:
        known = [b for b in (self.device_bytes, self.host_bytes) if b is not None]
        return min(known) if known else None


def _meminfo_bytes(*, available: bool, path: Path = Path("/proc/meminfo")) -> int | None:
    """This machine's MemAvailable (``available``; else or failing that MemTotal), in bytes."""
    try:
        fields = dict(line.split(":", 1) for line in path.read_text().splitlines() if ":" in line)
    except (OSError, ValueError):
        return None
    for key in (("MemAvailable", "MemTotal") if available else ("MemTotal",)):
        parts = fields.get(key, "").split()
        if parts and parts[0].isdigit():
            return int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return None


def _cgroup_limit_bytes(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """This process's cgroup memory limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``)."""
    candidates = [root / "memory.max", root / "memory" / "memory.limit_in_bytes"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[2].startswith("/") and parts[1] in ("", "memory"):
                sub = parts[2].lstrip("/")
                candidates.insert(0, (root / sub / "memory.max") if parts[1] == "" else
                                  (root / "memory" / sub / "memory.limit_in_bytes"))
    except OSError:
        pass
    for path in candidates:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < MAX_BYTES:  # v1 writes ~2^63 for "no limit", v2 "max"
            return int(text)
    return None


def detect_host_bytes(*, available: bool = True) -> int | None:
    """This machine's memory, capped by its cgroup limit: what is available now (MemAvailable, for a
    worker at start), or its total (MemTotal, for a plan that must not change with what else runs)."""
    known = [b for b in (_meminfo_bytes(available=available), _cgroup_limit_bytes()) if b is not None]
    return min(known) if known else None


def detect_local_limits(device: str) -> WorkerLimits:
    """The limits of a worker on this machine. A GPU's memory is measured only where torch is
    already imported (a worker): this module never imports torch, so elsewhere it is None."""
    host = detect_host_bytes()
    if device == "cpu":
        return WorkerLimits(device="cpu", device_bytes=host, host_bytes=host)
    torch = sys.modules.get("torch")
    device_bytes = None
    if torch is not None and torch.cuda.is_available():
        device_bytes = int(torch.cuda.mem_get_info()[0])
    return WorkerLimits(device="cuda", device_bytes=device_bytes, host_bytes=host)


def limits_from_settings(*, num_gpus: float, device_memory: int | None = None, host_memory: int | None = None,
                         remote: bool = False, workers_per_host: int = 1) -> WorkerLimits:
    """A worker's limits from the server's settings (EVOMERGE_WORKER_DEVICE_MEMORY,
    EVOMERGE_WORKER_HOST_MEMORY). Unset, the host's memory is this machine's total (MemTotal,
    so that a study's plan does not change with what else runs) shared by the
    ``workers_per_host`` local workers, unless the workers run elsewhere (``remote``: a Ray
    cluster), where it is unknown; a GPU's memory is unknown (the worker measures it at start)."""
    device = "cuda" if num_gpus > 0 else "cpu"
    host = host_memory
    if host is None and not remote:
        detected = detect_host_bytes(available=False)
        host = detected // max(1, min(workers_per_host, 1024)) if detected is not None else None
    if device == "cpu":
        return WorkerLimits(device="cpu", device_bytes=host, host_bytes=host)
    return WorkerLimits(device="cuda", device_bytes=device_memory, host_bytes=host)


# ---- the plan ----------------------------------------------------------------------------
class TierFit(BaseModel):
    """What one tier would need, and whether the worker has it."""

    fits: bool
    device_bytes: int = Field(ge=0, description="on the compute device (on a CPU worker: host memory)")
    host_bytes: int = Field(ge=0, description="anonymous host memory besides the device's")
    page_cache_bytes: int = Field(0, ge=0, description="what the tier would like the page cache to hold")
    why_not: str | None = Field(None, description="why it does not fit (None: it fits)")


class MemoryPlan(BaseModel):
    """Which tier a worker uses, and what it needs (bytes)."""

    tier: Literal["resident", "streamed", "mapped"]
    device: Literal["cpu", "cuda"]
    candidate_dtype: str
    device_bytes: int = Field(ge=0, description="needed on the compute device (CPU: host memory)")
    host_bytes: int = Field(ge=0, description="anonymous host memory besides the device's")
    page_cache_bytes: int = Field(ge=0, description="what the mapped tier would like the page cache to hold")
    moved_bytes_per_candidate: int = Field(ge=0, description="bytes read and written to build one candidate")
    breakdown: dict[str, int] = Field(description="sources, candidate, workspace, staging, evaluation, "
                                      "task_vector_cache")
    limits: WorkerLimits
    tiers: dict[str, TierFit]
    cache_task_vectors: bool
    notes: list[str] = Field(default_factory=list)

    def summary(self) -> str:
        """One line, e.g. 'resident: 9.8 GB on cpu, 0.0 GB host; moves 8.8 GB per candidate'."""
        return (f"{self.tier}: {gb(self.device_bytes)} on {self.device}, {gb(self.host_bytes)} host; "
                f"moves {gb(self.moved_bytes_per_candidate)} per candidate")


class DoesNotFit(ValueError):
    """No tier (or not the tier asked for) fits the worker: ``msg`` has the numbers, ``fix`` the way out."""

    def __init__(self, msg: str, fix: str, tiers: Mapping[str, TierFit] | None = None) -> None:
        super().__init__(f"{msg}. Fix: {fix}")
        self.msg, self.fix = msg, fix
        self.tiers = dict(tiers or {})


@dataclass(frozen=True)
class _Sizes:
    """The parts every tier is built from (bytes)."""

    sources: int
    candidate: int  # the full candidate in its dtype
    candidate_resident: int  # what a resident candidate adds (stacking: only the scaled tensors)
    workspace: int
    staging: int  # device staging of the streamed / mapped tiers on a GPU
    host_staging: int  # the mapped tier's ring of pinned buffers on a GPU worker
    evaluation: int
    task_vectors: int  # the float32 task-vector cache, if the method forms task vectors
    histograms: int  # the trimming methods' magnitude histograms, in host memory
    read: int  # source bytes one candidate reads
    read_resident: int


def _inputs(method: str, sources: Sequence[SourceFacts], base: str | None) -> tuple[int, int]:
    """(non-base inputs, models feeding one output tensor) of a method over these sources."""
    if method == "passthrough":
        return 1, 1
    non_base = sum(1 for s in sources if s.ref != base)
    has_base = any(s.ref == base for s in sources)
    return max(1, non_base), max(1, non_base + int(has_base))


def _workspace(method: str, non_base: int, feeding: int, largest_numel: int) -> int:
    if method in CHUNKED_METHODS:
        band = int(BAND_FRACTION * largest_numel) * 4 if method in TRIMMING_METHODS else 0
        return (non_base + CHUNK_BUFFERS) * CHUNK_ELEMENTS * 4 + band
    return (feeding + WHOLE_TENSOR_BUFFERS) * largest_numel * 4


def _candidate(owner: SourceFacts, dtype_bytes: int, stacking_layers: int | None) -> tuple[int, int]:
    """(full candidate bytes, bytes a resident candidate adds)."""
    scale = dtype_bytes / owner.dtype_bytes
    if stacking_layers is None or not owner.num_layers or not owner.layer_nbytes:
        full = owner.numel * dtype_bytes
        return full, full
    outside = max(0, owner.nbytes - owner.num_layers * owner.layer_nbytes)  # embeddings, norm, head
    full = int((outside + stacking_layers * owner.layer_nbytes) * scale)
    if dtype_bytes != owner.dtype_bytes:  # converted, not assigned: every tensor is new
        return full, full
    return full, int(STACKING_NEW_FRACTION * stacking_layers * owner.layer_nbytes)


def _sizes(sources: Sequence[SourceFacts], owner: SourceFacts, base: str | None, method: str,
           stacking_layers: int | None, dtype: str, limits: WorkerLimits,
           evaluation: EvalFacts | None) -> _Sizes:
    dtype_bytes = DTYPE_BYTES[dtype]
    non_base, feeding = _inputs(method, sources, base)
    largest_numel = max(s.largest_numel for s in sources)
    largest_bytes = max(s.largest_numel * s.dtype_bytes for s in sources)
    # bigger tensors are staged a chunk of rows at a time (workers.sources.Sources.for_merge),
    # a chunk being much smaller than SLICE_ABOVE
    staged_bytes = min(largest_bytes, SLICE_ABOVE)
    total = sum(s.nbytes for s in sources)
    full, resident = _candidate(owner, dtype_bytes, stacking_layers)
    uses_tv = method in TASK_VECTOR_METHODS and base is not None
    tv = sum(s.numel for s in sources if s.ref != base) * 4 if uses_tv else 0
    read = total if stacking_layers is None else min(total, int(full / dtype_bytes * owner.dtype_bytes))
    return _Sizes(
        sources=total, candidate=full, candidate_resident=resident,
        workspace=_workspace(method, non_base, feeding, largest_numel),
        staging=STAGING_SLOTS * feeding * staged_bytes if limits.device == "cuda" else 0,
        host_staging=STAGING_SLOTS * len(sources) * staged_bytes if limits.device == "cuda" else 0,
        evaluation=evaluation.nbytes(dtype_bytes) if evaluation is not None else 0,
        task_vectors=tv, read=read,
        histograms=(sum(s.histogram_bytes for s in sources if s.ref != base)
                    if method in TRIMMING_METHODS else 0),
        read_resident=read if stacking_layers is None else resident,
    )


def _check(device_need: int, host_need: int, limits: WorkerLimits) -> str | None:
    """Why these needs do not fit the limits (None: they fit, or the limits are unknown)."""
    if limits.device == "cpu":
        budget = limits.cpu_budget
        need = device_need + host_need
        if budget is not None and need > budget:
            return f"needs {gb(need)} of host memory, {gb(budget)} available"
        return None
    why = []
    if limits.device_bytes is not None and device_need > limits.device_bytes:
        why.append(f"needs {gb(device_need)} of GPU memory, {gb(limits.device_bytes)} available")
    if limits.host_bytes is not None and host_need > limits.host_bytes:
        why.append(f"needs {gb(host_need)} of host memory, {gb(limits.host_bytes)} available")
    return " and ".join(why) or None


def _tiers(z: _Sizes, limits: WorkerLimits, with_cache: bool) -> dict[str, TierFit]:
    cuda = limits.device == "cuda"
    cache = z.task_vectors if with_cache else 0
    resident_dev = z.sources + z.candidate_resident + z.workspace + z.evaluation + cache
    small_dev = z.candidate + z.workspace + z.staging + z.evaluation
    hist = z.histograms  # host memory in every tier (on a CPU worker, host memory is its device)
    needs = {
        "resident": (resident_dev + (hist if not cuda else 0), hist if cuda else 0, 0),
        "streamed": (small_dev, z.sources + hist, 0),
        "mapped": (small_dev + (hist if not cuda else 0), z.host_staging + (hist if cuda else 0), z.sources),
    }
    out: dict[str, TierFit] = {}
    for tier, (dev, host, page) in needs.items():
        if tier == "streamed" and not cuda:
            out[tier] = TierFit(fits=False, device_bytes=dev, host_bytes=0, why_not=(
                "a CPU worker computes in host memory, where the resident tier already keeps the sources: "
                "streaming is for GPU workers"))
            continue
        why = _check(dev, host, limits)
        out[tier] = TierFit(fits=why is None, device_bytes=dev, host_bytes=host, page_cache_bytes=page,
                            why_not=why)
    return out


def _moved(tier: str, z: _Sizes, limits: WorkerLimits, tiers: Mapping[str, TierFit]) -> tuple[int, list[str]]:
    """Bytes one candidate moves in this tier, and a note when the page cache cannot hold the sources."""
    if tier == "resident":
        return z.read_resident + z.candidate_resident, []
    moved = z.read + z.candidate  # read on the device and written
    if limits.device == "cuda":
        moved += z.read  # copied to the device first
    if tier != "mapped":
        return moved, []
    fit = tiers["mapped"]
    host = limits.cpu_budget if limits.device == "cpu" else limits.host_bytes
    if host is None:
        return moved, ["the host's memory is unknown: if its page cache cannot hold the sources "
                       f"({gb(z.sources)}), every candidate reads them from disk again"]
    anonymous = fit.host_bytes + (fit.device_bytes if limits.device == "cpu" else 0)
    room = max(0, host - anonymous)
    if room >= z.sources:
        return moved, []
    return moved + z.read, [f"the page cache has room for {gb(room)} of the sources' {gb(z.sources)}: every "
                            f"candidate reads about {gb(z.read)} from disk (more host memory avoids it)"]


def _resolve_dtype(candidate_dtype: str, owner: SourceFacts) -> str:
    if candidate_dtype != "auto" and candidate_dtype not in DTYPE_BYTES:
        raise ValueError(f"candidate dtype {candidate_dtype!r} is not one of {', '.join(CANDIDATE_DTYPES)}")
    return owner.dtype if candidate_dtype == "auto" else candidate_dtype


def _check_arguments(sources: Sequence[SourceFacts], base: str | None, method: str, tier: str,
                     stacking_layers: int | None) -> SourceFacts:
    if not sources:
        raise ValueError("plan_memory needs at least one source")
    if method not in METHODS:
        raise ValueError(f"merge method {method!r} is not one of {', '.join(sorted(METHODS))}")
    if tier not in ("auto", *TIERS):
        raise ValueError(f"tier {tier!r} is not one of auto, {', '.join(TIERS)}")
    if stacking_layers is not None and not 0 <= stacking_layers <= MAX_BYTES:
        raise ValueError(f"stacking_layers {stacking_layers} must be a count of layers")
    by_ref = {s.ref: s for s in sources}
    if base is not None and base not in by_ref:
        raise ValueError(f"base {base!r} is not among the sources ({', '.join(by_ref)})")
    return by_ref[base] if base is not None else sources[0]


def plan_memory(*, sources: list[SourceFacts], base: str | None, method: str, stacking_layers: int | None,
                candidate_dtype: str = "auto", limits: WorkerLimits, evaluation: EvalFacts | None = None,
                tier: str = "auto", cache_task_vectors: bool = False) -> MemoryPlan:
    """The memory plan of one worker of a study, or :class:`DoesNotFit`.

    ``sources``: every model the worker loads (base included); ``base``: the model whose
    shapes the candidate has and, for task-vector methods, the base of the task vectors
    (None: the first source); ``stacking_layers``: for a stacking study, the most output
    layers a recipe of its space can have (None for a parameter space).
    """
    owner = _check_arguments(sources, base, method, tier, stacking_layers)
    dtype = _resolve_dtype(candidate_dtype, owner)
    z = _sizes(sources, owner, base, method, stacking_layers, dtype, limits, evaluation)
    notes: list[str] = []
    with_cache = _use_cache(cache_task_vectors, method, z, limits, notes)
    tiers = _tiers(z, limits, with_cache)
    chosen = _choose(tier, tiers, limits, z, dtype)
    if chosen != "resident" and with_cache:
        with_cache = False
        notes.append(f"the task-vector cache needs the resident tier; the {chosen} tier forms task vectors "
                     "per chunk")
    fit = tiers[chosen]
    moved, moved_notes = _moved(chosen, z, limits, tiers)
    notes += moved_notes + _limit_notes(limits)
    if stacking_layers is not None and chosen == "resident" and z.candidate_resident < z.candidate:
        notes.append("a resident stacking candidate assigns the sources' tensors; only the output "
                     "projections its residual scales touch are new")
    if evaluation is not None:
        notes.append(f"evaluation: an estimate for batches of {evaluation.batch_size} × "
                     f"{evaluation.max_length} tokens (KV cache, float32 logits, activations)")
    return MemoryPlan(
        tier=chosen, device=limits.device, candidate_dtype=dtype,  # type: ignore[arg-type]
        device_bytes=fit.device_bytes, host_bytes=fit.host_bytes,
        page_cache_bytes=z.sources if chosen == "mapped" else 0, moved_bytes_per_candidate=moved,
        breakdown={
            "sources": z.sources,
            "candidate": z.candidate_resident if chosen == "resident" else z.candidate,
            "workspace": z.workspace,
            "staging": z.staging if chosen != "resident" else 0,
            "evaluation": z.evaluation,
            "task_vector_cache": z.task_vectors if with_cache else 0,
            "magnitude_histograms": z.histograms,
        },
        limits=limits, tiers=tiers, cache_task_vectors=with_cache, notes=notes,
    )


def _use_cache(asked: bool, method: str, z: _Sizes, limits: WorkerLimits, notes: list[str]) -> bool:
    """Whether the float32 task-vector cache is used: asked for, useful, and room in the resident tier."""
    if not asked:
        return False
    if z.task_vectors == 0:
        notes.append(f"cache_task_vectors: {method} forms no task vectors (or the study has no base): "
                     "nothing to cache")
        return False
    tiers = _tiers(z, limits, with_cache=True)
    if not tiers["resident"].fits:
        notes.append(f"cache_task_vectors: no room for the {gb(z.task_vectors)} cache in the resident tier "
                     f"({tiers['resident'].why_not}); task vectors are formed per chunk")
        return False
    return True


def _limit_notes(limits: WorkerLimits) -> list[str]:
    """A note for each limit that is unknown (and therefore counted as fitting)."""
    unknown = []
    if limits.device == "cuda" and limits.device_bytes is None:
        unknown.append("the GPU's memory (EVOMERGE_WORKER_DEVICE_MEMORY)")
    if (limits.host_bytes if limits.device == "cuda" else limits.cpu_budget) is None:
        unknown.append("the host's memory (EVOMERGE_WORKER_HOST_MEMORY)")
    return [f"unknown here: {' and '.join(unknown)}; counted as fitting, the worker checks the plan again at "
            "start with its own numbers"] if unknown else []


def _choose(tier: str, tiers: Mapping[str, TierFit], limits: WorkerLimits, z: _Sizes, dtype: str) -> str:
    if tier != "auto":
        if not tiers[tier].fits:
            msg = f"the {tier} tier does not fit a {_worker_text(limits)}: it {tiers[tier].why_not}"
            raise DoesNotFit(msg, _fix(limits, z, dtype, forced=tier, tiers=tiers), tiers)
        return tier
    for name in TIERS:
        if tiers[name].fits:
            return name
    per_tier = "; ".join(f"{name} {t.why_not}" for name, t in tiers.items()
                         if not (name == "streamed" and limits.device == "cpu"))
    raise DoesNotFit(f"no memory tier fits a {_worker_text(limits)}: {per_tier}",
                     _fix(limits, z, dtype, forced=None, tiers=tiers), tiers)


def _worker_text(limits: WorkerLimits) -> str:
    if limits.device == "cpu":
        return f"CPU worker with {gb(limits.cpu_budget)} of memory"
    return (f"GPU worker with {gb(limits.device_bytes)} of GPU memory and {gb(limits.host_bytes)} of host "
            "memory")


def _fix(limits: WorkerLimits, z: _Sizes, dtype: str, *, forced: str | None,
         tiers: Mapping[str, TierFit]) -> str:
    ways = []
    if forced == "streamed" and limits.device == "cpu":
        ways.append("use worker.tier: resident (or mapped, or auto) on a CPU worker")
    elif forced is not None:
        ways.append("set worker.tier: auto to take the fastest tier that fits")
    ways.append("a worker with more memory (a bigger GPU, more host memory)" if limits.device == "cuda"
                else "a worker with more host memory, or a GPU worker")
    if dtype == "float32":
        ways.append("worker.dtype: bfloat16 (the candidate in half the bytes)")
    ways.append("fewer or smaller sources")
    smallest = min(t.device_bytes for t in tiers.values())
    if z.evaluation > smallest / 4:
        ways.append(f"a smaller evaluation.batch_size (the evaluation is estimated at {gb(z.evaluation)})")
    settings = ("EVOMERGE_WORKER_DEVICE_MEMORY / EVOMERGE_WORKER_HOST_MEMORY" if limits.device == "cuda"
                else "EVOMERGE_WORKER_HOST_MEMORY")
    ways.append(f"if these numbers are not what one worker has, set {settings}")
    return "; ".join(ways)


def plan_json(plan: MemoryPlan) -> dict[str, Any]:
    """The plan as a JSON-ready dict (what the API stores and serves)."""
    return plan.model_dump(mode="json")

