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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

RESCALE_MODES = ("l1", "inverse_density")


class Workspace:
    """Reusable scratch tensors, one per role, dtype and device.

    A role's buffer grows to the largest request and is viewed at the shape asked for,
    so a merge of many tensor shapes holds one buffer per role, not one per shape.
    """

    def __init__(self, reuse: bool = True):
        self.reuse = reuse
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, role: str, like: torch.Tensor | tuple[int, ...], dtype: torch.dtype | None = None,
            device: torch.device | None = None) -> torch.Tensor:
        if isinstance(like, torch.Tensor):
            shape, dtype, device = tuple(like.shape), dtype or like.dtype, device or like.device
        else:
            shape = tuple(like)
        assert dtype is not None and device is not None
        if not self.reuse:
            return torch.empty(shape, dtype=dtype, device=device)
        n = 1
        for d in shape:
            n *= d
        key = (role, dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < n:
            buf = self._buffers[key] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return buf[:n].view(shape)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers.values())


_FRESH = Workspace(reuse=False)


_SAMPLE = 1 << 16


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a flat tensor, in about four linear passes.

    A fixed-seed sample brackets the answer; only the values inside the bracket are
    selected exactly. Falls back to a full selection when the bracket misses.
    """
    n = mag.numel()
    if n <= 4 * _SAMPLE:
        return torch.kthvalue(mag, n - k + 1).values
    g = torch.Generator(device="cpu").manual_seed(n)
    sample = mag[torch.randint(n, (_SAMPLE,), generator=g).to(mag.device)].float()
    keep = k / n
    margin = 5.0 * (keep * (1 - keep) / _SAMPLE) ** 0.5 + 1.0 / _SAMPLE
    qs = torch.tensor([max(0.0, 1 - keep - margin), min(1.0, 1 - keep + margin)], device=sample.device)
    lo, hi = (v.to(mag.dtype) for v in torch.quantile(sample, qs))
    above = int((mag > hi).sum())
    band = mag[(mag >= lo) & (mag <= hi)]
    need = k - above
    if 1 <= need <= band.numel():
        return torch.kthvalue(band, band.numel() - need + 1).values
    return torch.kthvalue(mag, n - k + 1).values


def rank_window_mask(delta: torch.Tensor, start: int, count: int, ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask (1.0 kept / 0.0 dropped, in ``delta``'s dtype) of the entries whose magnitude
    rank lies in ``[start, start + count)``, from the whole tensor at once.

    Ranks count from the largest magnitude (rank 0); equal magnitudes are ranked by
    position, first first (a stable descending sort). Two linear-time selections find
    the window's bounds. The reference for :class:`Window`, which the engine applies
    chunk by chunk. Masks are floats because mixing boolean and float tensors is
    several times slower than float arithmetic on CPUs.
    """
    mask = ws.get("mask", delta)
    if count <= 0:
        return mask.zero_()
    mag = torch.abs(delta, out=ws.get("mag", delta))
    flat_mag = mag.view(-1)
    lo = kth_largest(flat_mag, start + count)
    hi = kth_largest(flat_mag, start + 1) if start > 0 else lo
    torch.ge(mag, lo, out=mask)
    if start > 0:
        mask.mul_(torch.le(mag, hi, out=ws.get("mask2", delta)))
    if int(torch.count_nonzero(mask)) == count:
        return mask  # no run of equal magnitudes crosses the window's edges
    flat = mask.view(-1)
    scratch = ws.get("mask2", delta).view(-1)
    edges = [lo] if start == 0 else ([hi] if bool(hi == lo) else [hi, lo])
    for value in edges:
        ties = torch.nonzero(torch.eq(flat_mag, value, out=scratch)).squeeze(1)
        first_rank = int(torch.count_nonzero(torch.gt(flat_mag, value, out=scratch)))
        ranks = torch.arange(first_rank, first_rank + ties.numel(), device=ties.device)
        inside = (ranks >= start) & (ranks < start + count)
        flat[ties] = inside.to(flat.dtype)
    return mask


def top_k_mask(delta: torch.Tensor, k: int, ws: Workspace = _FRESH) -> torch.Tensor:
    """Mask of the ``k`` largest-magnitude entries (ties: first by position)."""
    return rank_window_mask(delta, 0, k, ws)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row (0 = smallest; ties by position)."""
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    return torch.argsort(order, dim=1, stable=True).to(rows.dtype)


# ---- trimming a tensor merged in chunks ------------------------------------------------
@dataclass
class Window:
    """The entries whose magnitude rank lies in ``[start, start + count)``: rank 0 is the
    largest magnitude, and equal magnitudes are ranked by position, first first (the
    order :func:`rank_window_mask` uses).

    Found from the whole tensor by :class:`WindowSearch`, then applied chunk by chunk,
    in order: the ranks of entries tied at an edge value are counted across chunks, so
    the chunked mask equals the whole tensor's mask exactly.
    """

    start: int
    count: int
    n: int
    lo: torch.Tensor | None = None  # the (start + count)-th largest magnitude
    hi: torch.Tensor | None = None  # the (start + 1)-th largest (start > 0)
    edges: list[tuple[torch.Tensor, int]] = field(default_factory=list)  # (value, entries above it)
    _seen: list[int] = field(default_factory=list)

    def reset(self) -> None:
        """Start counting tied entries again (before another pass over the chunks)."""
        self._seen = [0] * len(self.edges)

    def mask(self, mag: torch.Tensor, ws: Workspace = _FRESH) -> torch.Tensor:
        """Mask (1.0 kept / 0.0 dropped) of one chunk's magnitudes; chunks in order."""
        out = ws.get("mask", mag)
        if self.count <= 0:
            return out.zero_()
        if self.lo is None:
            return out.fill_(1)
        torch.ge(mag, self.lo, out=out)
        if self.hi is not None:
            out.mul_(torch.le(mag, self.hi, out=ws.get("mask2", mag)))
        if not self.edges:
            return out
        flat, flat_mag = out.view(-1), mag.view(-1)
        scratch = ws.get("mask2", mag).view(-1)
        end = self.start + self.count
        for e, (value, above) in enumerate(self.edges):
            ties = torch.nonzero(torch.eq(flat_mag, value, out=scratch)).squeeze(1)
            if ties.numel() == 0:
                continue
            first = above + self._seen[e]
            ranks = torch.arange(first, first + ties.numel(), device=ties.device)
            flat[ties] = ((ranks >= self.start) & (ranks < end)).to(flat.dtype)
            self._seen[e] += ties.numel()
        return out


class WindowSearch:
    """Finds a :class:`Window`'s edge values exactly, without sorting or storing the
    magnitudes: a fixed-seed sample of the whole tensor brackets each edge, one pass
    over the chunks counts the entries above the bracket and keeps those inside it, and
    an exact selection inside the bracket finishes. Call :meth:`observe` with every
    chunk's magnitudes in order, then :meth:`finish`.
    """

    def __init__(self, n: int, start: int, count: int,
                 sample: Callable[[torch.Tensor], torch.Tensor]):
        self.n, self.start, self.count = n, start, count
        self.targets = [] if count <= 0 or (count >= n and start == 0) else (
            [start + count] + ([start + 1] if start > 0 else []))
        self.brackets: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        self.above = [0] * len(self.targets)
        self.bands: list[list[torch.Tensor]] = [[] for _ in self.targets]
        for k in self.targets:
            self.brackets.append(self._bracket(k, sample))

    def _bracket(self, k: int, sample: Callable[[torch.Tensor], torch.Tensor]):
        n = self.n
        if n <= 4 * _SAMPLE:
            return None, None  # small: every value is in the band
        g = torch.Generator(device="cpu").manual_seed(n)
        values = sample(torch.randint(n, (_SAMPLE,), generator=g)).float()
        keep = k / n
        margin = 5.0 * (keep * (1 - keep) / _SAMPLE) ** 0.5 + 1.0 / _SAMPLE
        qs = torch.tensor([max(0.0, 1 - keep - margin), min(1.0, 1 - keep + margin)], device=values.device)
        lo, hi = torch.quantile(values, qs)
        return lo, hi

    @property
    def needed(self) -> bool:
        return bool(self.targets)

    def observe(self, mag: torch.Tensor) -> None:
        flat = mag.reshape(-1)
        for t, (lo, hi) in enumerate(self.brackets):
            if lo is None:
                self.bands[t].append(flat.clone())
                continue
            self.above[t] += int(torch.count_nonzero(flat > hi.to(flat.dtype)))
            self.bands[t].append(flat[(flat >= lo.to(flat.dtype)) & (flat <= hi.to(flat.dtype))])

    def finish(self, whole: Callable[[], torch.Tensor]) -> Window:
        """The window; ``whole()`` gives every magnitude, flat, if a bracket missed."""
        window = Window(self.start, self.count, self.n)
        if not self.targets:
            window.count = min(self.count, self.n) if self.count > 0 else 0
            return window
        found: list[tuple[torch.Tensor, int, int]] = []  # (value, above, equal)
        full: torch.Tensor | None = None
        for t, k in enumerate(self.targets):
            band = torch.cat(self.bands[t]) if self.bands[t] else torch.empty(0)
            need = k - self.above[t]
            if 1 <= need <= band.numel():
                value = torch.kthvalue(band, band.numel() - need + 1).values
                above = self.above[t] + int(torch.count_nonzero(band > value))
                equal = int(torch.count_nonzero(band == value))
            else:  # the sample's bracket missed: select from every magnitude
                full = whole() if full is None else full
                value = torch.kthvalue(full, self.n - k + 1).values
                above = int(torch.count_nonzero(full > value))
                equal = int(torch.count_nonzero(full == value))
            found.append((value, above, equal))
        self.bands = []
        end = self.start + self.count
        (lo, lo_above, lo_equal) = found[0]
        window.lo = lo
        edges = []
        if lo_above < self.start or lo_above + lo_equal > end:
            edges.append((lo, lo_above))
        if self.start > 0:
            hi, hi_above, hi_equal = found[1]
            window.hi = hi
            if not bool(hi == lo) and (hi_above < self.start or hi_above + hi_equal > end):
                edges.append((hi, hi_above))
            elif bool(hi == lo) and not edges and (hi_above < self.start or hi_above + hi_equal > end):
                edges.append((lo, lo_above))
        window.edges = edges
        window.reset()
        return window


@dataclass
class Sparsifier:
    """How one input's task vector is sparsified in one tensor, chunk by chunk.

    Built by a task-vector method's ``prepare`` (which also finds the trimming window
    and the L1 rescale factor from the whole tensor); ``apply`` then sparsifies each
    chunk in place, in order. Random draws come from a generator seeded per tensor and
    input, drawn chunk after chunk, so they equal one draw of the whole tensor.
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

        def sample(index: torch.Tensor) -> torch.Tensor:
            return inputs.task_vector_at(i, index).abs()

        if kind == "magnitude":
            sp.search = WindowSearch(n, 0, max(1, int(density * n)), sample)
        elif kind == "outliers":
            keep_n, top_n = int(density * n), int(params["gamma"] * n)
            sp.search = WindowSearch(n, min(top_n, n - keep_n), keep_n, sample)
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
        """Before a pass over the chunks: restart the draws and the tie counts."""
        if self.make_generator is not None:
            self.generator = self.make_generator()
        if self.window is not None:
            self.window.reset()

    def set_l1(self, before: float, after: float, eps: float = 1e-7) -> None:
        """The L1 rescale: the kept entries' norm is scaled back to the whole's."""
        self.scale = None if before < eps or after < eps else before / after

    def _della_rows(self, delta: torch.Tensor) -> torch.Tensor:
        rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
        return rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows

    def _della_probs(self, rows: torch.Tensor) -> torch.Tensor:
        ncols = rows.shape[1]
        ranks = row_ranks(rows)
        rank_norm = ranks / (ncols - 1) if ncols > 1 else torch.zeros_like(ranks)
        return (self.density - self.epsilon) + rank_norm * (2 * self.epsilon)

    def keep(self, delta: torch.Tensor, ws: Workspace = _FRESH) -> torch.Tensor:
        """Drop, in place, the entries of this chunk that are not kept (no rescale)."""
        if self.kind is None:
            return delta
        if self.kind == "zero":
            return delta.zero_()
        if self.kind in ("magnitude", "outliers"):
            assert self.window is not None
            return delta.mul_(self.window.mask(torch.abs(delta, out=ws.get("mag", delta)), ws))
        assert self.generator is not None
        if self.kind == "random":
            cpu = delta if delta.device.type == "cpu" else delta.cpu()
            draw = torch.rand(delta.shape, generator=self.generator, out=ws.get("rand", cpu, torch.float32))
            return delta.mul_(torch.lt(draw, self.density, out=ws.get("keep", cpu)).to(delta.device))
        rows = self._della_rows(delta)
        probs = self._della_probs(rows)
        keep = torch.rand(rows.shape, generator=self.generator).to(delta.device) < probs
        rows.mul_(keep)
        if self.rescale == "inverse_density":
            rows.div_(probs)
        return delta

    def apply(self, delta: torch.Tensor, ws: Workspace = _FRESH) -> torch.Tensor:
        """Sparsify and rescale one chunk in place."""
        out = self.keep(delta, ws)
        if self.kind in (None, "zero") or self.rescale is None:
            return out
        if self.rescale == "l1":
            return out if self.scale is None else out.mul_(self.scale)
        if self.rescale == "inverse_density":
            return out if self.kind == "della" else out.div_(self.density)
        raise ValueError(f"unknown rescale mode {self.rescale!r}: use one of {RESCALE_MODES}")
