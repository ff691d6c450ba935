"""Sparsification of task vectors: magnitude (TIES), random (DARE), magnitude with
outliers removed (Model Breadcrumbs) and magnitude-ranked random (DELLA).

``rescale`` restores the dropped mass: ``l1`` matches the kept tensor's L1 norm to the
original's (mergekit's rule); ``inverse_density`` divides each kept entry by its keep
probability (the DARE and DELLA papers' rule, unbiased in expectation).

A tensor is sparsified a chunk at a time (``workers.tensor_merge``): a
:class:`Sparsifier` per input carries what needs the whole tensor — the magnitude
window of a trim (:class:`WindowSearch` finds it exactly, with no sorted copy), the L1
rescale factor, the random generator — and applies it chunk after chunk. Temporaries
come from a :class:`Workspace`, so a search that merges thousands of candidates reuses
the same buffers instead of paying fresh allocations (and their page faults).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from search_spaces.merge_methods import RESCALE_MODES
from workers.magnitude_histogram import BinDetail, MagnitudeHistogram
from workers.trim_window import SAMPLE_SIZE, Window, WindowSearch, kth_largest, top_k_mask, window_mask
from workers.workspace import _FRESH, Workspace

__all__ = ["RESCALE_MODES", "SAMPLE_SIZE", "BinDetail", "MagnitudeHistogram", "Sparsifier", "Window",
           "WindowSearch", "Workspace", "kth_largest", "row_ranks", "top_k_mask", "window_mask"]


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest; ties by position)."""
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(rows.dtype)


@dataclass
class Sparsifier:
    """How one input's task vector is sparsified in one tensor, chunk by chunk.

    Built by a task-vector method's ``prepare``, which also finds what needs the whole
    tensor: the magnitude window of a trim, the L1 rescale factor. Per chunk it gives
    the merge kernel either bounds on the magnitude (``bounds``) or an explicit mask
    (``keep``: random draws, DELLA's ranks). Random draws come
    from a generator seeded per tensor and input, drawn chunk after chunk in order, so
    they equal one draw of the whole tensor.
    """

    kind: str | None  # None (keep all) | zero | magnitude | outliers | random | della
    density: float = 1.0
    rescale: str | None = None
    epsilon: float = 0.0
    search: WindowSearch | None = None
    window: Window | None = None
    scale: float | None = None
    make_generator: Callable[[], torch.Generator] | None = None
    generator: torch.Generator | None = None

    @classmethod
    def for_input(cls, kind: str | None, params: dict, rescale: str | None, inputs, i: int) -> Sparsifier:
        """``inputs``: a ``workers.tensor_merge.TensorInputs``; ``i``: the input's index."""
        density = float(params.get("density", 1.0))
        if kind is None or density >= 1:
            return cls(None)
        n = inputs.numel
        if density <= 0 or n == 0:
            return cls("zero")
        sp = cls(kind, density, rescale)

        def histogram() -> MagnitudeHistogram:
            return inputs.magnitude_histogram(i)

        if kind == "magnitude":
            sp.search = WindowSearch(n, 0, max(1, int(density * n)), histogram)
        elif kind == "outliers":
            keep_n, top_n = int(density * n), int(params["gamma"] * n)
            sp.search = WindowSearch(n, min(top_n, n - keep_n), keep_n, histogram)
        elif kind in ("random", "della"):
            if kind == "della":
                sp.epsilon = float(params["epsilon"])
                if density + sp.epsilon >= 1 or density - sp.epsilon <= 0:
                    from workers.methods.base import MergeError

                    model = inputs.model_names[i] if inputs.model_names else f"#{i}"
                    raise MergeError(
                        f"model {model}, tensor {inputs.name}: della needs 0 < density - epsilon "
                        f"and density + epsilon < 1; got density {density}, epsilon {sp.epsilon}: "
                        "lower epsilon or move density away from 0 and 1")
            from workers.methods.base import tensor_generator

            sp.make_generator = lambda: tensor_generator(inputs.seed, inputs.name, i)
        else:
            raise AssertionError(kind)
        if sp.search is not None and not sp.search.needed:
            sp.window, sp.search = sp.search.finish(lambda: torch.empty(0)), None
        return sp

    def start_pass(self) -> None:
        """Before a pass over the chunks: restart the draws."""
        if self.make_generator is not None:
            self.generator = self.make_generator()

    def set_l1(self, before: float, after: float, eps: float = 1e-7) -> None:
        """The L1 rescale: the kept entries' norm is scaled back to the whole's."""
        self.scale = None if before < eps or after < eps else before / after

    def bounds(self) -> tuple[float, float] | None:
        """The kept magnitudes' ``[lo, hi]``, the same in every chunk, or None where the
        mask is drawn entry by entry (``keep``)."""
        if self.kind is None:
            return -math.inf, math.inf
        if self.kind == "zero":
            return math.inf, math.inf
        if self.window is not None:
            return self.window.bounds()
        return None

    def keep(self, delta: torch.Tensor, ws: Workspace = _FRESH, role: str = "keep") -> torch.Tensor:
        """The next chunk's multiplier (0 dropped, 1 kept; DELLA with inverse-density
        rescale: 1 / the keep probability), for its float32 task vector ``delta``."""
        if self.kind is None:
            return torch.ones_like(delta)
        if self.kind == "zero":
            return torch.zeros_like(delta)
        if self.window is not None:
            mask = self.window.mask(torch.abs(delta, out=ws.get("mag", delta)), ws)
            return ws.get(role, mask).copy_(mask)
        assert self.generator is not None
        if self.kind == "random":
            cpu = delta if delta.device.type == "cpu" else delta.cpu()
            draw = torch.rand(delta.shape, generator=self.generator, out=ws.get("rand", cpu, torch.float32))
            keep = torch.lt(draw, self.density, out=ws.get(role, cpu))
            return keep if keep.device == delta.device else keep.to(delta.device)
        rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
        rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
        ncols = rows.shape[1]
        ranks = row_ranks(rows)
        rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
        probs = (self.density - self.epsilon) + rank_norm * (2 * self.epsilon)
        keep = (torch.rand(rows.shape, generator=self.generator).to(delta.device) < probs).to(delta.dtype)
        if self.rescale == "inverse_density":
            keep = keep / probs
        return keep.reshape(delta.shape)

    def factors(self) -> tuple[float, float]:
        """``(l1, inv)``: the kept entries are multiplied by ``l1`` and divided by ``inv``."""
        if self.kind in (None, "zero") or self.rescale is None:
            return 1.0, 1.0
        if self.rescale == "l1":
            return (self.scale if self.scale is not None else 1.0), 1.0
        if self.rescale == "inverse_density":
            return 1.0, (1.0 if self.kind == "della" else self.density)
        raise ValueError(f"unknown rescale mode {self.rescale!r}: use one of {RESCALE_MODES}")
