"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

All share one shape: per input, a task vector ``delta = model - base``, optionally
sparsified; weighted; optionally combined under a sign consensus (TIES); summed,
optionally normalised by the summed weights of what was kept; scaled by ``lambda``;
added to the base. Each variant's parameters and defaults (mergekit's) are in its
declaration (``search_spaces.merge_methods``); here is how it sparsifies and combines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from workers import sparsify
from workers.kernels import kernel
from workers.methods import implements
from workers.methods.base import MergeError, MergeInputs, MergeMethod
from workers.sparsify import Sparsifier
from workers.tensor_merge import ChunkOut, TensorInputs


class TaskVectorMethod(MergeMethod):
    sparsification: ClassVar[str | None] = None  # magnitude | random | outliers | della
    consensus: ClassVar[str | None] = None  # "sum" (TIES) | "count"

    def prepare(self, inputs: TensorInputs, ws: sparsify.Workspace) -> list[Sparsifier]:
        """How each input's task vector is sparsified in this tensor: trimming windows
        and L1 rescale factors need the whole task vector, read here chunk by chunk."""
        g = inputs.global_params
        rescale = g["rescale_mode"] if g["rescale"] else None
        plan = [Sparsifier.for_input(self.sparsification, params, rescale, inputs, i)
                for i, params in enumerate(inputs.model_params)]
        searches = {i: sp.search for i, sp in enumerate(plan) if sp.search is not None}
        wanted = {i: bins for i, search in searches.items() if (bins := search.unresolved_bins())}
        if wanted:  # one pass resolves the bins the thresholds lie in to exact values
            inputs.resolve_bins(wanted)
            for search in searches.values():
                search.lookup()
        if any(search.needs_pass for search in searches.values()):
            for r0, r1 in inputs.chunk_rows():
                for i, search in searches.items():
                    search.observe(lambda lo, hi, i=i, r0=r0, r1=r1: inputs.band(i, r0, r1, lo, hi))
        if searches:
            for i, search in searches.items():
                plan[i].window = search.finish(lambda i=i: inputs.whole_task_vector(i, ws).abs_().reshape(-1))
                plan[i].search = None
        l1 = [i for i, sp in enumerate(plan) if sp.rescale == "l1" and sp.kind not in (None, "zero")]
        if l1:  # the L1 norm of what is kept, against the whole's
            sums = {i: [0.0, 0.0] for i in l1}
            for i in l1:
                plan[i].start_pass()
            for r0, r1 in inputs.chunk_rows():
                base = inputs.base_chunk(r0, r1, ws)
                assert base is not None
                for i in l1:
                    delta = inputs.task_vector_chunk(i, r0, r1, base, ws, "tv")
                    sums[i][0] += float(delta.abs().sum(dtype=torch.float64))
                    kept = delta.mul_(plan[i].keep(delta, ws))
                    sums[i][1] += float(kept.abs().sum(dtype=torch.float64))
            for i in l1:
                plan[i].set_l1(*sums[i])
        for sp in plan:
            sp.start_pass()
        return _Prepared.of(plan, inputs, self)

    def merge_chunk(self, inputs: TensorInputs, state: _Prepared, j: int, r0: int, r1: int,
                    out: ChunkOut, ws: sparsify.Workspace) -> torch.Tensor:
        base = inputs.base
        if base is None:
            raise MergeError(f"{self.name} needs a base_model")
        g = inputs.global_params
        plan = state.sparsifiers
        keep: list[torch.Tensor | None] | None = None
        if state.drawn:  # masks drawn entry by entry, for some inputs
            base32 = inputs.base_chunk(r0, r1, ws)
            assert base32 is not None
            keep = []
            for i, sp in enumerate(plan):
                if not state.drawn[i]:
                    keep.append(None)
                    continue
                delta = inputs.task_vector_chunk(i, r0, r1, base32, ws, "tv")
                keep.append(sp.keep(delta, ws, f"keep{i}").reshape(-1))
        l1, inv, w, lam, divisor, lo, hi = state.constants
        return kernel("task_vectors")(
            inputs.flat_rows(base, r0, r1), [inputs.chunk_inputs(i, r0, r1) for i in range(len(plan))],
            keep, lo, hi, l1, inv, w, lam, divisor, out.target.reshape(-1), self.consensus,
            bool(g["normalize"]), state.rescaled, inputs.task_vectors is not None, state.trim,
            inputs.read_dtype, out.dtype)

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """One whole tensor in float32 (outside the engine: the same arithmetic)."""
        if inputs.base is None:
            raise MergeError(f"{self.name} needs a base_model")
        if not inputs.tensors and not inputs.deltas:
            return inputs.base
        ws = inputs.workspace or sparsify.Workspace(reuse=False)
        whole = _whole(inputs)
        result = torch.empty_like(inputs.base)
        state = self.prepare(whole, ws)
        self.merge_chunk(whole, state, 0, 0, whole.rows, ChunkOut(result, result.dtype), ws)
        return result


@dataclass
class _Prepared:
    """A tensor's sparsifiers and the kernel's coefficients, made once per tensor."""

    sparsifiers: list[Sparsifier]
    constants: tuple[torch.Tensor, ...]  # l1, inv, weights, lambda, divisor, lo, hi
    rescaled: bool
    trim: str | None  # the kernel's magnitude bounds: None, "lo", "window"
    drawn: list[bool] | None  # per input, whether its mask is drawn (``keep``); None: none is

    @classmethod
    def of(cls, plan: list[Sparsifier], inputs: TensorInputs, method: TaskVectorMethod) -> _Prepared:
        weights = [p["weight"] for p in inputs.model_params]
        divisor = sum(weights)
        if abs(divisor) < 1e-8:
            divisor = 1.0
        factors = [sp.factors() for sp in plan]
        bounds = [sp.bounds() for sp in plan]
        drawn = [b is None for b in bounds]
        lo = [b[0] if b is not None else -math.inf for b in bounds]
        hi = [b[1] if b is not None else math.inf for b in bounds]
        trim = "window" if any(h != math.inf for h in hi) else (
            "lo" if any(v != -math.inf for v in lo) else None)
        f32 = dict(dtype=torch.float32, device=inputs.device)
        constants = (torch.tensor([f[0] for f in factors], **f32),
                     torch.tensor([f[1] for f in factors], **f32), torch.tensor(weights, **f32),
                     torch.tensor(float(inputs.global_params["lambda"]), **f32),
                     torch.tensor(float(divisor), **f32), torch.tensor(lo, **f32), torch.tensor(hi, **f32))
        return cls(plan, constants, any(f != (1.0, 1.0) for f in factors), trim,
                   drawn if any(drawn) else None)


def _whole(inputs: MergeInputs) -> TensorInputs:
    """A whole tensor's inputs as one chunk (for direct calls)."""
    assert inputs.base is not None
    return TensorInputs(
        name=inputs.name, shape=tuple(inputs.base.shape), base=inputs.base,
        tensors=list(inputs.tensors), model_params=inputs.model_params,
        global_params=inputs.global_params, seed=inputs.seed, model_names=inputs.model_names,
        task_vectors=inputs.deltas, chunk_elements=inputs.base.numel() or 1,
    )


@implements("task_arithmetic")
class TaskArithmetic(TaskVectorMethod):
    """No sparsification, no sign election."""


@implements("ties")
class Ties(TaskVectorMethod):
    sparsification = "magnitude"
    consensus = "sum"


@implements("dare_ties")
class DareTies(TaskVectorMethod):
    sparsification = "random"
    consensus = "sum"


@implements("dare_linear")
class DareLinear(TaskVectorMethod):
    sparsification = "random"


@implements("breadcrumbs")
class Breadcrumbs(TaskVectorMethod):
    sparsification = "outliers"


@implements("breadcrumbs_ties")
class BreadcrumbsTies(TaskVectorMethod):
    sparsification = "outliers"
    consensus = "sum"


@implements("della")
class Della(TaskVectorMethod):
    sparsification = "della"
    consensus = "sum"


@implements("della_linear")
class DellaLinear(TaskVectorMethod):
    sparsification = "della"
