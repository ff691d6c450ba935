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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from search_spaces import merge_methods
from search_spaces.method_declaration import MethodDeclaration
from workers.memory_facts import (
    ACTIVATION_WIDTHS,
    CANDIDATE_DTYPES,
    DEFAULT_EVAL_TOKENS,
    DEVICES,
    DTYPE_BYTES,
    HISTOGRAM_MAX_BYTES,
    HISTOGRAM_MIN_ELEMENTS,
    MAX_BATCH_SIZE,
    MAX_BYTES,
    MAX_EVAL_TOKENS,
    EvalFacts,
    SourceFacts,
    dtype_name,
    eval_facts,
    facts_from_tensors,
    gb,
    parse_size,
)
from workers.memory_plan_result import DoesNotFit, MemoryPlan, TierFit
from workers.worker_limits import (
    WorkerLimits,
    detect_host_bytes,
    detect_local_limits,
    limits_from_settings,
)

__all__ = [
    "ACTIVATION_WIDTHS", "BAND_FRACTION", "CANDIDATE_DTYPES", "CHUNK_ELEMENTS", "DEFAULT_EVAL_TOKENS",
    "DEVICES", "DTYPE_BYTES", "EAGER_CHUNK_ELEMENTS", "HISTOGRAM_MAX_BYTES", "HISTOGRAM_MIN_ELEMENTS",
    "MAX_BATCH_SIZE", "MAX_BYTES", "MAX_EVAL_TOKENS", "SLICE_ABOVE", "TIERS", "DoesNotFit", "EvalFacts",
    "MemoryPlan", "SourceFacts", "TierFit", "WorkerLimits", "detect_host_bytes", "detect_local_limits",
    "dtype_name", "eval_facts", "facts_from_tensors", "gb", "limits_from_settings", "parse_size",
    "plan_json", "plan_memory",
]

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

# What the planner needs of a method is its declaration's (search_spaces.merge_methods):
# ``chunked`` methods are merged a chunk at a time (their workspace is a few chunks, not a
# few copies of the largest tensor; the others convert each full input tensor to float32);
# ``forms_task_vectors`` ones are the only ones a task-vector cache helps;
# ``trims_by_magnitude`` ones keep a magnitude histogram per task vector
# (workers.sparsify.MagnitudeHistogram, host memory) and, where its bins' values are not known
# exactly, find a threshold among the entries of one bin, gathered in float32 only when the bin
# holds at most BAND_FRACTION of the tensor.
BAND_FRACTION = 1 / 1024
CHUNK_BUFFERS = 8  # float32 chunk buffers of a chunked merge besides one per non-base input
WHOLE_TENSOR_BUFFERS = 5  # float32 full-tensor buffers of a whole-tensor merge besides its inputs
STAGING_SLOTS = 2  # double buffering: the next tensor's inputs arrive while this one merges
# A GPU worker that stages its sources copies a tensor bigger than this a chunk of rows
# at a time (workers.sources.Sources.for_merge), so staging holds at most this per input.
SLICE_ABOVE = 256 * 2**20
# A resident stacking candidate assigns the sources' tensors; residual scales fold into the
# output projections (o_proj, down_proj), about a third of a layer's bytes, which are new.
STACKING_NEW_FRACTION = 1 / 3
TIERS: tuple[str, ...] = ("resident", "streamed", "mapped")
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


def _inputs(declared: MethodDeclaration, sources: Sequence[SourceFacts], base: str | None) -> tuple[int, int]:
    """(non-base inputs, models feeding one output tensor) of a method over these sources."""
    if declared.base_is_input and declared.max_models == 1:  # passthrough: one source per tensor
        return 1, 1
    non_base = sum(1 for s in sources if s.ref != base)
    has_base = any(s.ref == base for s in sources)
    return max(1, non_base), max(1, non_base + int(has_base))


def _workspace(declared: MethodDeclaration, non_base: int, feeding: int, largest_numel: int) -> int:
    if declared.chunked:
        band = int(BAND_FRACTION * largest_numel) * 4 if declared.trims_by_magnitude else 0
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
    declared = merge_methods.get(method)
    non_base, feeding = _inputs(declared, sources, base)
    largest_numel = max(s.largest_numel for s in sources)
    largest_bytes = max(s.largest_numel * s.dtype_bytes for s in sources)
    # bigger tensors are staged a chunk of rows at a time (workers.sources.Sources.for_merge),
    # a chunk being much smaller than SLICE_ABOVE
    staged_bytes = min(largest_bytes, SLICE_ABOVE)
    total = sum(s.nbytes for s in sources)
    full, resident = _candidate(owner, dtype_bytes, stacking_layers)
    uses_tv = declared.forms_task_vectors and base is not None
    tv = sum(s.numel for s in sources if s.ref != base) * 4 if uses_tv else 0
    read = total if stacking_layers is None else min(total, int(full / dtype_bytes * owner.dtype_bytes))
    # LoRA adapters: each one's changed tensor composed in its dtype, through two float32 chunks
    composing = sum(s.composed_numel * s.dtype_bytes for s in sources)
    composing += 2 * CHUNK_ELEMENTS * 4 if composing else 0
    return _Sizes(
        sources=total, candidate=full, candidate_resident=resident,
        workspace=_workspace(declared, non_base, feeding, largest_numel) + composing,
        staging=STAGING_SLOTS * feeding * staged_bytes if limits.device == "cuda" else 0,
        host_staging=STAGING_SLOTS * len(sources) * staged_bytes if limits.device == "cuda" else 0,
        evaluation=evaluation.nbytes(dtype_bytes) if evaluation is not None else 0,
        task_vectors=tv, read=read,
        histograms=(sum(s.histogram_bytes for s in sources if s.ref != base)
                    if declared.trims_by_magnitude else 0),
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
    if method not in merge_methods.METHODS:
        raise ValueError(f"merge method {method!r} is not one of {', '.join(merge_methods.names())}")
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

