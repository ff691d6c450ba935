"""Candidates built in memory: the search's inner loop, with no disk.

A :class:`CandidateBuilder` loads a study's sources once and keeps what every
candidate needs: each source's tensors, each task vector (source − base), and, for
the magnitude-trimming methods, each task vector's magnitudes sorted once (so that
trimming at any density is a look-up and a comparison, not a sort). It holds one
resident model:

- a **parameter-space** recipe is merged tensor by tensor straight into the resident
  model's parameters (``copy_``: no reallocation, nothing written to disk);
- a **stacking** recipe gets a model of the recipe's depth, built on the meta device,
  whose parameters *are* the sources' tensors (assigned, not copied); only the
  tensors a residual scale touches are new.

The arithmetic is the merge engine's (same plan, same methods, same per-tensor seeds,
same dtype round trip), so a candidate's logits equal those of ``evomerge merge`` of
the same recipe written to disk and reloaded — what was scored is what is downloaded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from search_spaces.recipe import Recipe
from workers.merge import apply_residual_scale
from workers.methods.base import MergeError, MergeInputs
from workers.model_io import LazyModel
from workers.plan import MergePlan, TensorTask, build_plan, patched_config

SORTED_METHODS = {"ties", "breadcrumbs", "breadcrumbs_ties"}


@dataclass
class BuildTimings:
    plan_s: float = 0.0
    merge_s: float = 0.0
    tensors: int = 0


@dataclass
class _Cache:
    tensors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    deltas: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)
    sorted: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)


class CandidateBuilder:
    """Builds candidates of one study's sources in memory.

    ``sources`` are model references (the study's models, base included). Task
    vectors are computed against ``base``; recipes naming another base still work
    (their task vectors are computed on first use and kept).
    """

    def __init__(self, sources: list[str], base: str | None = None, *, device: str = "cpu",
                 precompute: bool = True):
        if base is not None and base not in sources:
            sources = [base, *sources]
        self.refs = list(dict.fromkeys(sources))
        self.base = base
        self.device = torch.device(device)
        self.models = {ref: LazyModel(ref) for ref in self.refs}
        self.cache = _Cache()
        self.timings = BuildTimings()
        for ref, lazy in self.models.items():
            for name, info in lazy.tensors.items():
                t = lazy.get(name)
                if info.dtype.is_floating_point and info.dtype != torch.float64:
                    t = t.to(torch.float32)
                self.cache.tensors[(ref, name)] = t.to(self.device)
            lazy.close()
        if base is not None and precompute:
            for ref in self.refs:
                if ref != base:
                    for name in self.models[ref].tensors:
                        self._delta(ref, name, base, name)
        self._resident: torch.nn.Module | None = None
        self._resident_ref: str | None = None
        from workers.sparsify import Workspace

        self.workspace = Workspace()

    # ---- precomputed inputs ------------------------------------------------------
    def _tensor(self, ref: str, name: str) -> torch.Tensor:
        return self.cache.tensors[(ref, name)]

    def _delta(self, ref: str, name: str, base_ref: str, base_name: str) -> torch.Tensor:
        key = (ref, name, f"{base_ref}:{base_name}")
        if key not in self.cache.deltas:
            self.cache.deltas[key] = self._tensor(ref, name) - self._tensor(base_ref, base_name)
        return self.cache.deltas[key]

    def _sorted(self, ref: str, name: str, base_ref: str, base_name: str) -> torch.Tensor:
        from workers.sparsify import sorted_magnitudes

        key = (ref, name, f"{base_ref}:{base_name}")
        if key not in self.cache.sorted:
            self.cache.sorted[key] = sorted_magnitudes(self._delta(ref, name, base_ref, base_name))
        return self.cache.sorted[key]

    def precompute_sorted(self) -> None:
        """Sort every task vector's magnitudes now (TIES / Breadcrumbs studies)."""
        if self.base is None:
            return
        for ref in self.refs:
            if ref != self.base:
                for name in self.models[ref].tensors:
                    if self.models[ref].tensors[name].dtype.is_floating_point:
                        self._sorted(ref, name, self.base, name)

    def memory_bytes(self) -> dict[str, int]:
        size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        resident = size(self._resident.parameters()) if self._resident is not None else 0
        return {
            "sources": size(self.cache.tensors.values()),
            "task_vectors": size(self.cache.deltas.values()),
            "sorted_magnitudes": size(self.cache.sorted.values()),
            "candidate": resident,
            "scratch": self.workspace.nbytes(),
        }

    # ---- building ------------------------------------------------------------------
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
        model = self._stack(plan) if recipe.is_stacking() else self._merge_into_resident(plan)
        self.timings.merge_s = time.perf_counter() - start
        self.timings.tensors = len(plan.tasks)
        return model

    def resident(self, ref: str | None = None) -> torch.nn.Module:
        """The resident model, loaded once from ``ref`` (default: the base)."""
        ref = ref or self.base or self.refs[0]
        if self._resident is None:
            from transformers import AutoModelForCausalLM

            self._resident = AutoModelForCausalLM.from_pretrained(
                str(self.models[ref].path), dtype=torch.float32
            ).to(self.device).eval()
            self._resident.requires_grad_(False)
            self._resident_ref = ref
        return self._resident

    def _inputs(self, plan: MergePlan, task: TensorTask) -> MergeInputs:
        base = self._tensor(task.base.model, task.base.name) if task.base else None
        tensors = [self._tensor(s.model, s.name) for s in task.inputs]
        deltas = sorted_mags = None
        if task.base is not None and tensors and tensors[0].is_floating_point():
            b = task.base
            deltas = [self._delta(s.model, s.name, b.model, b.name) for s in task.inputs]
            if plan.method.name in SORTED_METHODS:
                sorted_mags = [self._sorted(s.model, s.name, b.model, b.name) for s in task.inputs]
        return MergeInputs(
            name=task.name, base=base, tensors=tensors, model_params=task.model_params,
            global_params=task.global_params, seed=plan.recipe.seed,
            model_names=[s.model for s in task.inputs], deltas=deltas,
            sorted_magnitudes=sorted_mags, owned=False, workspace=self.workspace,
        )

    def _merge_into_resident(self, plan: MergePlan) -> torch.nn.Module:
        model = self.resident(plan.config_source)
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        names = {t.name for t in plan.tasks}
        missing = [n for n in names if n not in params]
        if missing:
            raise MergeError(
                f"the recipe's output tensors do not match the resident model: {missing[:3]}"
            )
        with torch.no_grad():
            for task in plan.tasks:
                if not task.dtype.is_floating_point:
                    continue
                target = params[task.name]
                inputs = self._inputs(plan, task)
                if task.dtype == target.dtype and target.is_contiguous():
                    inputs.out = target  # merged straight into the resident parameter
                merged = plan.method.merge(inputs)
                if merged is not target:
                    target.copy_(merged.to(task.dtype).to(target.dtype))
                if not torch.isfinite(target.sum()):
                    raise MergeError(f"the candidate has NaN or inf in tensor {task.name}")
        return model

    def _stack(self, plan: MergePlan) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        config_dict = patched_config(plan)
        config_dict.pop("torch_dtype", None)
        config_dict.pop("dtype", None)
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        from accelerate import init_empty_weights

        # parameters on the meta device (they will be the sources' tensors); buffers
        # computed at init (rotary frequencies, embedding scales) are built for real
        with init_empty_weights(include_buffers=False):
            shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        state: dict[str, torch.Tensor] = {}
        for task in plan.tasks:
            src = task.inputs[0]
            t = self._tensor(src.model, src.name)
            scale = task.model_params[0].get("scale", 1.0)
            if scale != 1:
                t = t * scale
            if task.residual_scale is not None and task.residual_scale != 1:
                t = apply_residual_scale(t, task.residual_scale, task.unit_offset)
            if t.is_floating_point() and task.dtype != t.dtype:
                t = t.to(task.dtype).to(torch.float32)  # the disk round trip
            state[task.name] = t
        shell.load_state_dict(state, strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            shell.tie_weights()
        leftover = [n for n, p in shell.named_parameters() if p.is_meta]
        if leftover:
            raise MergeError(f"stacked candidate lacks tensors {leftover[:3]}")
        return shell.to(self.device).eval()
