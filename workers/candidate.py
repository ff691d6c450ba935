"""Candidates built in memory: the search's inner loop, with no disk.

A :class:`CandidateBuilder` opens a study's sources once, in their stored dtype, in one
of three memory tiers (``workers.sources``: on the device, streamed from host memory,
or mapped through the page cache), and holds one resident model:

- a **parameter-space** recipe is merged tensor by tensor straight into the resident
  model's parameters: each tensor's task vectors are formed chunk by chunk in a small
  float32 workspace (``workers.tensor_merge``) and the result is rounded to the
  candidate's dtype as it is written; nothing full-size is derived or stored;
- a **stacking** recipe gets a model of the recipe's depth, built on the meta device,
  whose parameters *are* the sources' tensors (assigned, not copied); only the
  tensors a residual scale touches are new.

The arithmetic is the merge engine's (same plan, same chunks, same per-tensor seeds,
same rounding), so a candidate's logits equal those of ``evomerge merge`` of the same
recipe written to disk and loaded in the candidate's dtype — what was scored is what is
downloaded, in every tier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from search_spaces.recipe import Recipe
from workers import kernels
from workers.lora import open_models
from workers.methods.base import MergeError
from workers.model_io import dtype_from_name
from workers.plan import MergePlan, TensorTask, build_plan, patched_config
from workers.sources import Key, Sources, open_sources
from workers.sparsify import Workspace
from workers.tensor_merge import TensorInputs, merge_into

CANDIDATE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def release_freed_memory(freed_bytes: int = 0, every: int = 256 << 20) -> None:
    """Give freed heap memory back to the system (glibc's ``malloc_trim``), once per
    ``every`` bytes of merged tensors (``freed_bytes``: this tensor's), and always when
    called with none.

    A merge frees chunk-sized temporaries by the thousand; glibc keeps such freed blocks
    in its heaps, where fragmentation can hold on to gigabytes of anonymous memory over
    a search. Trimming every few hundred MB keeps a worker's memory what its plan says;
    trimming after every tensor costs a millisecond each time on a large heap. A no-op
    where there is no glibc.
    """
    if freed_bytes:
        _SINCE_TRIM[0] += freed_bytes
        if _SINCE_TRIM[0] < every:
            return
    _SINCE_TRIM[0] = 0
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_SINCE_TRIM = [0]
_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        try:
            import ctypes

            _TRIM.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _TRIM.append(None)
    return _TRIM[0]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class BuildTimings:
    plan_s: float = 0.0
    merge_s: float = 0.0
    tensors: int = 0


class CandidateBuilder:
    """Builds candidates of one study's sources in memory.

    ``sources`` are model references (the study's models, base included); ``tier`` is
    where their tensors live (``workers.sources``); ``dtype`` is the candidate's:
    ``auto`` is the merged model's own (the recipe's ``out_dtype``, else the base's),
    so the scored candidate is the downloaded model; ``float32`` keeps a float32 copy
    of the same rounded values. ``cache_task_vectors`` keeps each float32 task vector
    on the device once formed (the memory plan turns it on only where there is room).
    """

    def __init__(self, sources: list[str], base: str | None = None, *, device: str = "cpu",
                 tier: str = "resident", dtype: str = "auto", cache_task_vectors: bool = False):
        if dtype not in CANDIDATE_DTYPES:
            raise ValueError(f"unknown candidate dtype {dtype!r}: use one of {', '.join(CANDIDATE_DTYPES)}")
        if base is not None and base not in sources:
            sources = [base, *sources]
        self.refs = list(dict.fromkeys(sources))
        self.base = base
        self.device = torch.device(device)
        self.dtype = dtype
        self.tier = tier
        self.models = open_models(self.refs, base)  # LoRA adapters over the base
        kernels.use_for(max(sum(_numel(i.shape) for i in m.tensors.values())
                            for m in self.models.values()))
        self.sources: Sources = open_sources(tier, self.models, self.device)
        self.cache_task_vectors = cache_task_vectors
        self.task_vectors: dict[tuple, torch.Tensor] = {}
        # each task vector's exact magnitude histogram (330 KB), for trimming thresholds
        self.histograms: dict[tuple, object] = {}
        self.timings = BuildTimings()
        self.workspace = Workspace()
        self._resident: torch.nn.Module | None = None
        self._resident_key: tuple[str, torch.dtype] | None = None

    # ---- what it holds ---------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        held = self.sources.nbytes()
        return {
            "sources_device": held["device"],
            "sources_host": held["host"],
            "task_vectors": size(self.task_vectors.values()),
            "magnitude_histograms": sum(h.nbytes for h in self.histograms.values()),
            "candidate": size(self._resident.parameters()) if self._resident is not None else 0,
            "scratch": self.workspace.nbytes(),
        }

    # ---- building ----------------------------------------------------------------------
    def build(self, recipe: Recipe) -> torch.nn.Module:
        """The candidate for ``recipe`` (the resident model, or a stacked one)."""
        start = time.perf_counter()
        unknown = [r for r in recipe.referenced_models() if r not in self.models]
        if unknown:
            raise MergeError(
                f"recipe names models outside this study's sources: {unknown}; "
                f"the sources are {self.refs}"
            )
        plan = build_plan(recipe, models=self.models)
        self.timings.plan_s = time.perf_counter() - start
        start = time.perf_counter()
        with torch.no_grad():
            model = self._stack(plan) if recipe.is_stacking() else self._merge_into_resident(plan)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timings.merge_s = time.perf_counter() - start
        self.timings.tensors = len(plan.tasks)
        return model

    def candidate_dtype(self, plan: MergePlan) -> torch.dtype:
        return plan.out_dtype if self.dtype == "auto" else dtype_from_name(self.dtype)  # type: ignore[return-value]

    def resident(self, ref: str | None = None, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The resident model, loaded once from ``ref`` (default: the base) in ``dtype``."""
        ref = ref or self.base or self.refs[0]
        if self._resident is None or self._resident_key != (ref, dtype):
            from transformers import AutoModelForCausalLM

            self._resident = None  # the old one goes before the new one comes
            kwargs = {"device_map": str(self.device)} if self.device.type != "cpu" else {}
            model = AutoModelForCausalLM.from_pretrained(str(self.models[ref].path), dtype=dtype, **kwargs)
            model.eval().requires_grad_(False)
            self._resident, self._resident_key = model, (ref, dtype)
        return self._resident

    def _inputs(self, plan: MergePlan, task: TensorTask) -> TensorInputs:
        base_key: Key | None = (task.base.model, task.base.name) if task.base else None
        keys: list[Key] = [(s.model, s.name) for s in task.inputs]
        cached = None
        if self.cache_task_vectors and base_key is not None:
            cached = [self._task_vector(plan, task, k, base_key) for k in keys]
        return TensorInputs(
            name=task.name, shape=task.shape,
            base=self.sources.for_merge(base_key) if base_key else None,
            tensors=[self.sources.for_merge(k) for k in keys], model_params=task.model_params,
            global_params=task.global_params, seed=plan.recipe.seed,
            model_names=[s.model for s in task.inputs], read_dtype=plan.read_dtype,
            task_vectors=cached, histograms=self.histograms,
            histogram_keys=[(k, base_key, plan.read_dtype, cached is not None) for k in keys],
            device=self.device,
        )

    def _task_vector(self, plan: MergePlan, task: TensorTask, key: Key, base_key: Key) -> torch.Tensor:
        """A float32 task vector, formed as the merge forms it and kept."""
        cache_key = (key, base_key, plan.read_dtype)
        if cache_key not in self.task_vectors:
            whole = TensorInputs(name=task.name, shape=task.shape, base=self.sources.get(base_key),
                                 tensors=[self.sources.get(key)], model_params=[{}], global_params={},
                                 read_dtype=plan.read_dtype)
            self.task_vectors[cache_key] = whole.whole_task_vector(0, self.workspace)
        return self.task_vectors[cache_key]

    @staticmethod
    def _keys(task: TensorTask) -> list[Key]:
        return [(s.model, s.name) for s in ([task.base] if task.base else []) + task.inputs]

    def _merge_into_resident(self, plan: MergePlan) -> torch.nn.Module:
        model = self.resident(plan.config_source, self.candidate_dtype(plan))
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        missing = [t.name for t in plan.tasks if t.name not in params]
        if missing:
            raise MergeError(
                f"the recipe's output tensors do not match the resident model: {missing[:3]}"
            )
        tasks = [t for t in plan.tasks if t.dtype.is_floating_point]
        for i, task in enumerate(tasks):
            if i + 1 < len(tasks):
                self.sources.prefetch(self._keys(tasks[i + 1]))
            target = params[task.name]
            merge_into(plan.method, self._inputs(plan, task), target, out_dtype=task.dtype,
                       ws=self.workspace, residual_scale=task.residual_scale, unit_offset=task.unit_offset)
            self.sources.release()
            release_freed_memory(target.numel() * target.element_size())
        release_freed_memory()
        return model

    def _stacked_tensor(self, plan: MergePlan, task: TensorTask, dtype: torch.dtype) -> torch.Tensor:
        """One tensor of a stacked candidate: the source's own where nothing changes it."""
        src = task.inputs[0]
        key: Key = (src.model, src.name)
        t = self.sources.keep(key)
        scale = task.model_params[0].get("scale", 1.0)
        plain = scale == 1 and task.residual_scale in (None, 1) and (
            plan.read_dtype is None or plan.read_dtype == t.dtype)
        if not t.is_floating_point() or plain:
            if t.is_floating_point() and t.dtype != task.dtype:
                t = t.to(task.dtype)  # the written model's rounding
            return t.to(dtype) if t.is_floating_point() else t
        target = torch.empty(task.shape, dtype=dtype, device=self.device)
        inputs = TensorInputs(name=task.name, shape=task.shape, base=None, tensors=[t],
                              model_params=task.model_params, global_params=task.global_params,
                              seed=plan.recipe.seed, model_names=[src.model], read_dtype=plan.read_dtype)
        return merge_into(plan.method, inputs, target, out_dtype=task.dtype, ws=self.workspace,
                          residual_scale=task.residual_scale, unit_offset=task.unit_offset)

    def _stack(self, plan: MergePlan) -> torch.nn.Module:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = self.candidate_dtype(plan)
        config_dict = patched_config(plan)
        config_dict.pop("torch_dtype", None)
        config_dict.pop("dtype", None)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        # parameters on the meta device (they will be the sources' tensors); buffers
        # computed at init (rotary frequencies, embedding scales) are built for real
        with init_empty_weights(include_buffers=False):
            shell = AutoModelForCausalLM.from_config(config, dtype=dtype)
        state = {task.name: self._stacked_tensor(plan, task, dtype) for task in plan.tasks}
        self.sources.release()
        shell.load_state_dict(state, strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            shell.tie_weights()
        leftover = [n for n, p in shell.named_parameters() if p.is_meta]
        if leftover:
            raise MergeError(f"stacked candidate lacks tensors {leftover[:3]}")
        return shell.to(self.device).eval()
