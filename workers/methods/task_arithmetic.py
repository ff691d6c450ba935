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

    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        base = inputs.base
        if base is None:
            raise MergeError(f"{self.name} needs a base_model")
        if not inputs.tensors:
            return base
        ws = inputs.workspace or sparsify.Workspace(reuse=False)
        g = inputs.global_params
        rescale = g["rescale_mode"] if g["rescale"] else None
        weights = [p["weight"] for p in inputs.model_params]
        # weighted, sparsified task vectors, each in a buffer of its own
        weighted = []
        for i, (delta, params) in enumerate(zip(inputs.task_vectors(), inputs.model_params)):
            # an owned task vector (freshly read by the engine) is its own buffer
            buf = delta if inputs.owned else ws.get(f"kept{i}", delta)
            if self.sparsification is None:
                weighted.append(torch.mul(delta, weights[i], out=buf))
            else:
                self._sparsify(delta, params, rescale, buf, ws, inputs, i)
                weighted.append(buf.mul_(weights[i]))
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

    def _sparsify(self, delta, params, rescale, out, ws, inputs: MergeInputs, index: int):
        kind = self.sparsification
        if kind is None:
            return out.copy_(delta)
        density = params["density"]
        sorted_mag = inputs.sorted_magnitudes[index] if inputs.sorted_magnitudes is not None else None
        if kind == "magnitude":
            return sparsify.magnitude(delta, density, rescale, sorted_mag, out=out, ws=ws)
        if kind == "outliers":
            return sparsify.magnitude_outliers(
                delta, density, params["gamma"], rescale, sorted_mag, out=out, ws=ws
            )
        if kind == "random":
            return sparsify.random_drop(delta, density, inputs.generator(index), rescale, out=out, ws=ws)
        if kind == "della":
            try:
                return sparsify.della_magprune(
                    delta, density, params["epsilon"], inputs.generator(index), rescale, out=out, ws=ws
                )
            except ValueError as exc:
                model = inputs.model_names[index] if inputs.model_names else f"#{index}"
                raise MergeError(f"model {model}, tensor {inputs.name}: {exc}") from None
        raise AssertionError(kind)


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
