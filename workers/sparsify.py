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


SAMPLE_SIZE = 1 << 16


def kth_largest(mag: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of a flat tensor, in about four linear passes.

    A fixed-seed sample brackets the answer; only the values inside the bracket are
    selected exactly. Falls back to a full selection when the bracket misses.
    """
    n = mag.numel()
    if n <= 4 * SAMPLE_SIZE:
        return torch.kthvalue(mag, n - k + 1).values
    g = torch.Generator(device="cpu").manual_seed(n)
    sample = mag[torch.randint(n, (SAMPLE_SIZE,), generator=g).to(mag.device)].float()
    keep = k / n
    margin = 5.0 * (keep * (1 - keep) / SAMPLE_SIZE) ** 0.5 + 1.0 / SAMPLE_SIZE
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
class _Edge:
    """Entries tied at one edge value of a window, and which of them the window keeps.

    The tied entries, in position order, have ordinals 0, 1, …; the window keeps those
    in ``[first, last)``. ``rules[j]`` says what chunk ``j`` does with its ties: keep
    them all, drop them all, or (at most a couple of chunks) pick by ordinal, starting
    from ``offsets[j]``.
    """

    value: torch.Tensor
    first: int
    last: int
    rules: list[str]
    offsets: list[int]
    at_lo: bool = True  # the window's lower edge (``lo``)
    at_hi: bool = False  # its upper edge (``hi``); both when they are equal


@dataclass
class Window:
    """The entries whose magnitude rank lies in ``[start, start + count)``: rank 0 is the
    largest magnitude, and equal magnitudes are ranked by position, first first (the
    order :func:`rank_window_mask` uses).

    Found from the whole tensor by :class:`WindowSearch`, then applied chunk by chunk,
    in the same order and with the same chunks: where entries tied at an edge value
    straddle the window's boundary, the search counted each chunk's ties, so each chunk
    knows whether it keeps its ties, drops them, or picks some by position. The
    chunked mask equals the whole tensor's mask exactly.
    """

    start: int
    count: int
    n: int
    lo: torch.Tensor | None = None  # the (start + count)-th largest magnitude
    hi: torch.Tensor | None = None  # the (start + 1)-th largest (start > 0)
    edges: list[_Edge] = field(default_factory=list)
    _chunk: int = 0

    def reset(self) -> None:
        """Back to the first chunk (before another pass over the chunks)."""
        self._chunk = 0

    def mask(self, mag: torch.Tensor, ws: Workspace = _FRESH) -> torch.Tensor:
        """Mask (1.0 kept / 0.0 dropped) of the next chunk's magnitudes."""
        j = self._chunk
        self._chunk += 1
        out = ws.get("mask", mag)
        if self.count <= 0:
            return out.zero_()
        if self.lo is None:
            return out.fill_(1)
        dropped = [e for e in self.edges if e.rules[j] == "drop"]
        lo_strict = any(e.at_lo for e in dropped)
        (torch.gt if lo_strict else torch.ge)(mag, self.lo, out=out)
        if self.hi is not None:
            hi_strict = any(e.at_hi for e in dropped)
            out.mul_((torch.lt if hi_strict else torch.le)(mag, self.hi, out=ws.get("mask2", mag)))
        fixes = [e for e in self.edges if e.rules[j] == "pick"]
        if not fixes:
            return out
        flat, flat_mag = out.view(-1), mag.view(-1)
        scratch = ws.get("mask2", mag).view(-1)
        for e in fixes:
            ties = torch.nonzero(torch.eq(flat_mag, e.value, out=scratch)).squeeze(1)
            first = e.offsets[j]
            ordinals = torch.arange(first, first + ties.numel(), device=ties.device)
            flat[ties] = ((ordinals >= e.first) & (ordinals < e.last)).to(flat.dtype)
        return out


class WindowSearch:
    """Finds a :class:`Window`'s edge values exactly, without sorting or storing the
    magnitudes.

    A sorted fixed-seed sample of the tensor's magnitudes (``sample()``, which a worker
    computes once per task vector and keeps: 256 KB) brackets each edge; one pass over
    the chunks counts the entries above the bracket and keeps those inside it (about
    2 % of them); an exact selection inside the bracket finishes. Call :meth:`observe`
    with every chunk's magnitudes in order, then :meth:`finish`.
    """

    def __init__(self, n: int, start: int, count: int,
                 sample: Callable[[], torch.Tensor] | None = None):
        self.n, self.start, self.count = n, start, count
        self.targets = [] if count <= 0 or (count >= n and start == 0) else (
            [start + count] + ([start + 1] if start > 0 else []))
        small = n <= 4 * SAMPLE_SIZE or sample is None
        self.brackets = [(None, None) if small else self._bracket(k, sample()) for k in self.targets]
        self.above = [0] * len(self.targets)
        self.bands: list[list[torch.Tensor]] = [[] for _ in self.targets]
        self.sizes: list[int] = []

    def _bracket(self, k: int, sorted_sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = sorted_sample.numel()
        keep = k / self.n
        margin = 5.0 * (keep * (1 - keep) / size) ** 0.5 + 1.0 / size
        lo = max(0, math.floor((1 - keep - margin) * (size - 1)))
        hi = min(size - 1, math.ceil((1 - keep + margin) * (size - 1)))
        return sorted_sample[lo], sorted_sample[hi]

    @property
    def needed(self) -> bool:
        return bool(self.targets)

    def observe(self, mag: torch.Tensor) -> None:
        flat = mag.reshape(-1)
        self.sizes.append(flat.numel())
        for t, (lo, hi) in enumerate(self.brackets):
            if lo is None or hi is None:
                self.bands[t].append(flat.clone())
                continue
            at_least = flat >= lo.to(flat.dtype)
            inside = at_least & (flat <= hi.to(flat.dtype))
            band = flat[inside]
            self.above[t] += int(torch.count_nonzero(at_least)) - band.numel()
            self.bands[t].append(band)

    def finish(self, whole: Callable[[], torch.Tensor]) -> Window:
        """The window; ``whole()`` gives every magnitude, flat, if a bracket missed."""
        window = Window(self.start, self.count, self.n)
        if not self.targets:
            window.count = min(self.count, self.n) if self.count > 0 else 0
            return window
        found: list[tuple[torch.Tensor, int, int, list[int]]] = []  # value, above, equal, per chunk
        full: torch.Tensor | None = None
        for t, k in enumerate(self.targets):
            band = torch.cat(self.bands[t]) if self.bands[t] else torch.empty(0)
            need = k - self.above[t]
            if 1 <= need <= band.numel():
                value = torch.kthvalue(band, band.numel() - need + 1).values
                above = self.above[t] + int(torch.count_nonzero(band > value))
                per_chunk = [int(torch.count_nonzero(piece == value)) for piece in self.bands[t]]
            else:  # the sample's bracket missed: select from every magnitude
                full = whole() if full is None else full
                value = torch.kthvalue(full, self.n - k + 1).values
                above = int(torch.count_nonzero(full > value))
                per_chunk = [int(torch.count_nonzero(piece == value))
                             for piece in torch.split(full, self.sizes)]
            found.append((value, above, sum(per_chunk), per_chunk))
        self.bands = []
        window.lo = found[0][0]
        if self.start > 0:
            window.hi = found[1][0]
        same = self.start > 0 and bool(found[1][0] == found[0][0])
        edges = [(found[0], True, same)] + ([(found[1], False, True)] if self.start > 0 and not same else [])
        end = self.start + self.count
        for (value, above, equal, per_chunk), at_lo, at_hi in edges:
            first, last = max(0, self.start - above), min(equal, end - above)
            if first == 0 and last == equal:
                continue  # every tie is inside the window: ``>=`` / ``<=`` keep them
            rules, offsets, seen = [], [], 0
            for c in per_chunk:
                offsets.append(seen)
                if c == 0 or (seen >= first and seen + c <= last):
                    rules.append("keep")
                elif seen + c <= first or seen >= last:
                    rules.append("drop")
                else:
                    rules.append("pick")
                seen += c
            window.edges.append(_Edge(value, first, last, rules, offsets, at_lo, at_hi))
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

        def sample() -> torch.Tensor:
            return inputs.magnitude_sample(i)

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
