"""Task-vector methods: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA.

All share one shape: per input, a task vector ``delta = model - base``, optionally
sparsified; weighted; optionally combined under a sign consensus (TIES); summed,
optionally normalised by the summed weights of what was kept; scaled by ``lambda``;
added to the base. The defaults of each variant follow mergekit's.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from workers import sparsify
from workers.methods import register
from workers.methods.base import MergeError, MergeInputs, MergeMethod, ParamSpec
from workers.sparsify import Sparsifier
from workers.tensor_merge import TensorInputs

WEIGHT = ParamSpec("weight", float, help="scale of this model's task vector")
DENSITY = ParamSpec("density", float, 1.0, 0.0, 1.0, help="share of the task vector kept")
GAMMA = ParamSpec("gamma", float, 0.01, 0.0, 1.0, help="share of largest entries dropped")
EPSILON = ParamSpec("epsilon", float, 0.15, 0.0, 0.5, help="spread of keep probabilities")


def _shared(normalize: bool, rescale: bool) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("normalize", bool, normalize, help="divide by the summed weights"),
        ParamSpec("rescale", bool, rescale, help="restore the mass that sparsification drops"),
        ParamSpec(
            "rescale_mode",
            str,
            "l1",
            choices=sparsify.RESCALE_MODES,
            help="l1: match the L1 norm (mergekit); inverse_density: divide by the keep "
            "probability (the DARE / DELLA papers)",
        ),
        ParamSpec("lambda", float, 1.0, help="scale of the combined task vector"),
        ParamSpec("int8_mask", bool, False, help="accepted for mergekit compatibility"),
    )


class TaskVectorMethod(MergeMethod):
    sparsification: ClassVar[str | None] = None  # magnitude | random | outliers | della
    consensus: ClassVar[str | None] = None  # "sum" (TIES) | "count"
    chunked = True

    def prepare(self, inputs: TensorInputs, ws: sparsify.Workspace) -> list[Sparsifier]:
        """How each input's task vector is sparsified in this tensor: trimming windows
        and L1 rescale factors need the whole task vector, read here chunk by chunk."""
        g = inputs.global_params
        rescale = g["rescale_mode"] if g["rescale"] else None
        plan = [Sparsifier.for_input(self.sparsification, params, rescale, inputs, i)
                for i, params in enumerate(inputs.model_params)]
        searches = {i: sp.search for i, sp in enumerate(plan) if sp.search is not None}
        drawn = [i for i, sp in enumerate(plan) if sp.kind in ("random", "della") and sp.rescale == "l1"]
        if searches or drawn:
            sums = {i: [0.0, 0.0] for i in drawn}
            for i in drawn:
                plan[i].start_pass()
            for r0, r1 in inputs.chunk_rows():
                base = inputs.base_chunk(r0, r1, ws)
                assert base is not None
                for i in [*searches, *drawn]:
                    delta = inputs.task_vector_chunk(i, r0, r1, base, ws, "tv")
                    if i in searches:
                        searches[i].observe(torch.abs(delta, out=ws.get("mag", delta)))
                    if i in sums:
                        sums[i][0] += float(delta.abs().sum(dtype=torch.float64))
                        sums[i][1] += float(plan[i].keep(delta, ws).abs().sum(dtype=torch.float64))
            for i, search in searches.items():
                plan[i].window = search.finish(lambda i=i: inputs.whole_task_vector(i, ws).abs_().reshape(-1))
            for i in drawn:
                plan[i].set_l1(*sums[i])
        trimmed_l1 = [i for i, sp in enumerate(plan) if sp.window is not None and sp.rescale == "l1"]
        if trimmed_l1:  # the L1 norm of what a window keeps needs the window first
            sums = {i: [0.0, 0.0] for i in trimmed_l1}
            for r0, r1 in inputs.chunk_rows():
                base = inputs.base_chunk(r0, r1, ws)
                assert base is not None
                for i in trimmed_l1:
                    delta = inputs.task_vector_chunk(i, r0, r1, base, ws, "tv")
                    sums[i][0] += float(delta.abs().sum(dtype=torch.float64))
                    sums[i][1] += float(plan[i].keep(delta, ws).abs().sum(dtype=torch.float64))
            for i in trimmed_l1:
                plan[i].set_l1(*sums[i])
        for sp in plan:
            sp.start_pass()
        return plan

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        base = inputs.base
        if base is None:
            raise MergeError(f"{self.name} needs a base_model")
        if not inputs.tensors and not inputs.deltas:
            return base
        ws = inputs.workspace or sparsify.Workspace(reuse=False)
        plan = inputs.state
        if plan is None:  # called on a whole tensor, outside the engine
            plan = self.prepare(_whole(inputs), ws)
        g = inputs.global_params
        weights = [p["weight"] for p in inputs.model_params]
        # weighted, sparsified task vectors, each in a buffer of its own
        weighted = []
        for i, delta in enumerate(inputs.task_vectors()):
            # an owned task vector (freshly read by the engine) is its own buffer
            buf = delta if inputs.owned else ws.get(f"kept{i}", delta).copy_(delta)
            weighted.append(plan[i].apply(buf, ws).mul_(weights[i]))
        out = inputs.out if inputs.out is not None else torch.empty_like(base)
        if len(weighted) == 1:
            out.copy_(weighted[0])
        else:
            torch.add(weighted[0], weighted[1], out=out)
            for other in weighted[2:]:
                out.add_(other)  # the sum, added left to right
        if self.consensus is None:
            divisor: float | torch.Tensor = sum(weights)
            if abs(divisor) < 1e-8:
                divisor = 1.0
        else:
            # the elected sign of each entry, +1 or -1 (a zero sum elects +1)
            elected = ws.get("elected", base)
            if self.consensus == "sum":
                total = out
            else:
                total = ws.get("votes", base).zero_()
                for kept in weighted:
                    total.add_(torch.sign(kept, out=ws.get("part", base)))
            # ±1; a -0.0 total (all inputs zero there) elects -1, where nobody can agree
            torch.copysign(torch.ones((), dtype=base.dtype, device=base.device), total, out=elected)
            if self.consensus == "count":
                elected.masked_fill_(total == 0, 1)  # a tied vote elects +1
            out.zero_()
            divisor = ws.get("divisor", base).zero_()
            part = ws.get("part", base)
            agrees = ws.get("agrees", base)
            for w, kept in zip(weights, weighted):
                # kept·elected > 0 exactly where kept is nonzero with the elected sign
                torch.gt(torch.mul(kept, elected, out=part), 0, out=agrees)
                out.addcmul_(kept, agrees)  # kept × 1.0 or × 0.0: exact
                divisor.add_(agrees, alpha=w)
            divisor.add_(torch.eq(divisor, 0, out=agrees))  # nobody agrees: divide by 1
        if g["normalize"]:
            out.div_(divisor)
        if g["lambda"] != 1:
            out.mul_(g["lambda"])
        return out.add_(base)


def _whole(inputs: MergeInputs) -> TensorInputs:
    """A whole tensor's inputs as the engine would give them (for direct calls)."""
    assert inputs.base is not None
    return TensorInputs(
        name=inputs.name, shape=tuple(inputs.base.shape), base=inputs.base,
        tensors=list(inputs.tensors), model_params=inputs.model_params,
        global_params=inputs.global_params, seed=inputs.seed, model_names=inputs.model_names,
        task_vectors=inputs.deltas, chunk_elements=inputs.base.numel() or 1,
    )


@register
class TaskArithmetic(TaskVectorMethod):
    name = "task_arithmetic"
    description = "base + lambda * sum(weight_i * (model_i - base))"
    reference = "https://arxiv.org/abs/2212.04089"
    global_params = _shared(normalize=False, rescale=False)
    model_params = (WEIGHT,)


@register
class Ties(TaskVectorMethod):
    name = "ties"
    description = "trim each task vector by magnitude, elect signs, average the agreeing part"
    reference = "https://arxiv.org/abs/2306.01708"
    sparsification = "magnitude"
    consensus = "sum"
    global_params = _shared(normalize=True, rescale=False)
    model_params = (WEIGHT, DENSITY)


@register
class DareTies(TaskVectorMethod):
    name = "dare_ties"
    description = "drop task-vector entries at random (seeded), rescale, TIES sign election"
    reference = "https://arxiv.org/abs/2311.03099"
    sparsification = "random"
    consensus = "sum"
    is_random = True
    global_params = _shared(normalize=False, rescale=True)
    model_params = (WEIGHT, DENSITY)


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    description = "drop task-vector entries at random (seeded), rescale, add"
    reference = "https://arxiv.org/abs/2311.03099"
    sparsification = "random"
    is_random = True
    global_params = _shared(normalize=False, rescale=True)
    model_params = (WEIGHT, DENSITY)


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    description = "drop the largest (gamma) and smallest task-vector entries, add"
    reference = "https://arxiv.org/abs/2312.06795"
    sparsification = "outliers"
    global_params = _shared(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY, GAMMA)


@register
class BreadcrumbsTies(TaskVectorMethod):
    name = "breadcrumbs_ties"
    description = "Model Breadcrumbs with TIES sign election"
    reference = "https://arxiv.org/abs/2312.06795"
    sparsification = "outliers"
    consensus = "sum"
    global_params = _shared(normalize=False, rescale=False)
    model_params = (WEIGHT, DENSITY, GAMMA)


@register
class Della(TaskVectorMethod):
    name = "della"
    description = "magnitude-ranked random drop (seeded), rescale, TIES sign election"
    reference = "https://arxiv.org/abs/2406.11617"
    sparsification = "della"
    consensus = "sum"
    is_random = True
    global_params = _shared(normalize=True, rescale=True)
    model_params = (WEIGHT, DENSITY, EPSILON)


@register
class DellaLinear(TaskVectorMethod):
    name = "della_linear"
    description = "magnitude-ranked random drop (seeded), rescale, add"
    reference = "https://arxiv.org/abs/2406.11617"
    sparsification = "della"
    is_random = True
    global_params = _shared(normalize=False, rescale=True)
    model_params = (WEIGHT, DENSITY, EPSILON)
