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
        g = inputs.global_params
        rescale = g["rescale_mode"] if g["rescale"] else None
        weights = [p["weight"] for p in inputs.model_params]
        # weighted, sparsified task vectors; in place when the inputs are ours to modify
        weighted = []
        for i, (delta, params) in enumerate(zip(inputs.task_vectors(), inputs.model_params)):
            sorted_mag = inputs.sorted_magnitudes[i] if inputs.sorted_magnitudes is not None else None
            kept = self._sparsify(delta, params, rescale, sorted_mag, inputs, i)
            if kept is delta and not inputs.owned:
                kept = kept * weights[i]  # never scale a caller's tensor in place
            else:
                kept.mul_(weights[i])
            weighted.append(kept)
        if self.consensus is None:
            mixed = weighted[0]
            for other in weighted[1:]:
                mixed = mixed.add_(other) if inputs.owned else mixed + other
            divisor = sum(weights)
            if abs(divisor) < 1e-8:
                divisor = 1.0
        else:
            # elect a sign per entry: of the summed mass ("sum", TIES) or of the votes
            if self.consensus == "sum":
                elected = (torch.stack(weighted).sum(0) if len(weighted) > 1 else weighted[0]) >= 0
            else:
                elected = torch.stack([w.sign() for w in weighted]).sum(0) >= 0
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base)
            for w, kept in zip(weights, weighted):
                agree = torch.where(elected, kept > 0, kept < 0)
                mixed.add_(kept * agree)
                divisor.add_(agree, alpha=w)
            divisor[divisor == 0] = 1
        if g["normalize"]:
            mixed = mixed / divisor
        if g["lambda"] != 1:
            mixed = mixed * g["lambda"]
        return base + mixed

    def _sparsify(self, delta, params, rescale, sorted_mag, inputs: MergeInputs, index: int):
        kind = self.sparsification
        if kind is None:
            return delta
        density = params["density"]
        inplace = inputs.owned
        if kind == "magnitude":
            return sparsify.magnitude(delta, density, rescale, sorted_mag, inplace)
        if kind == "outliers":
            return sparsify.magnitude_outliers(
                delta, density, params["gamma"], rescale, sorted_mag, inplace
            )
        if kind == "random":
            return sparsify.random_drop(delta, density, inputs.generator(index), rescale, inplace)
        if kind == "della":
            try:
                return sparsify.della_magprune(
                    delta, density, params["epsilon"], inputs.generator(index), rescale
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
