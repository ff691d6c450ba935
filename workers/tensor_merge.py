"""Merging one output tensor: inputs in their stored dtype, arithmetic in float32 chunks.

The merge engine (``evomerge merge``, exports) and the in-memory candidate builder both
merge a tensor here, with the same chunks in the same order, so a candidate scored in
memory and the model written to disk are equal bit for bit, whatever memory tier the
worker's sources are in.

A *chunked* method (``MergeMethod.chunked``) sees the tensor a block of rows at a time,
each block converted to float32 in a reused workspace of ``CHUNK_ELEMENTS`` entries;
what needs the whole tensor (a trimming threshold, an L1 norm) it finds first in
``prepare``, also chunk by chunk. Other methods see the whole tensor in float32. Either
way the result is rounded to the output dtype as it is written into the target, so no
full-size float32 copy of anything is ever kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from workers.memory_plan import CHUNK_ELEMENTS, EAGER_CHUNK_ELEMENTS
from workers.methods.base import MergeError, MergeInputs, MergeMethod
from workers.sparsify import MagnitudeHistogram, Workspace


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


@dataclass
class TensorInputs:
    """One output tensor's inputs, in their stored dtype, on the compute device.

    ``read_dtype`` (the recipe's ``dtype``) rounds every input to that dtype before the
    arithmetic, as the inputs of a merge read in that dtype are. ``task_vectors`` are
    cached task vectors in the compute dtype, used instead of subtracting when given.
    """

    name: str
    shape: tuple[int, ...]
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    global_params: dict[str, Any]
    seed: int = 0
    model_names: list[str] = field(default_factory=list)
    read_dtype: torch.dtype | None = None
    task_vectors: list[torch.Tensor] | None = None
    # where a worker keeps each task vector's magnitude histogram across candidates
    histograms: dict | None = None
    histogram_keys: list | None = None
    chunk_elements: int | None = None  # default: CHUNK_ELEMENTS
    # the compute device (default: the first input's); an input held elsewhere (a big
    # tensor a GPU worker stages from the host) has its rows copied there chunk by chunk
    device: torch.device | None = None

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        first = self.base if self.base is not None else self.tensors[0]
        self.device = torch.device(self.device) if self.device is not None else first.device
        dtypes = [t.dtype for t in ([self.base] if self.base is not None else []) + self.tensors]
        if self.read_dtype is not None:
            dtypes = [self.read_dtype]
        self.compute_dtype = torch.float64 if torch.float64 in dtypes else torch.float32

    # ---- geometry ------------------------------------------------------------------
    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 2 else 1

    def chunk_rows(self, elements: int | None = None) -> Iterator[tuple[int, int]]:
        """Blocks of whole rows (row-local methods such as DELLA need whole rows)."""
        rows = self.rows
        per_row = max(1, self.numel // rows) if rows else 1
        step = max(1, (elements or self.chunk_elements or CHUNK_ELEMENTS) // per_row)
        for r0 in range(0, rows, step):
            yield r0, min(rows, r0 + step)

    def chunk_shape(self, r0: int, r1: int) -> tuple[int, ...]:
        return (r1 - r0, *self.shape[1:]) if len(self.shape) >= 2 else self.shape

    def rows_of(self, t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        rows = t[r0:r1] if len(self.shape) >= 2 else t
        if not _same_device(rows.device, self.device):  # a host tensor staged a chunk at a time
            rows = rows.to(self.device, non_blocking=rows.is_pinned())
        return rows

    # ---- float32 views of a chunk ------------------------------------------------------
    def _load(self, t: torch.Tensor, r0: int, r1: int, role: str, ws: Workspace) -> torch.Tensor:
        src = self.rows_of(t, r0, r1)
        if self.read_dtype is not None and src.dtype != self.read_dtype:
            src = src.to(self.read_dtype)
        return ws.get(role, self.chunk_shape(r0, r1), self.compute_dtype, self.device).copy_(src)

    def base_chunk(self, r0: int, r1: int, ws: Workspace) -> torch.Tensor | None:
        return None if self.base is None else self._load(self.base, r0, r1, "base", ws)

    def input_chunk(self, i: int, r0: int, r1: int, ws: Workspace, role: str | None = None) -> torch.Tensor:
        return self._load(self.tensors[i], r0, r1, role or f"in{i}", ws)

    def task_vector_chunk(self, i: int, r0: int, r1: int, base: torch.Tensor, ws: Workspace,
                          role: str | None = None) -> torch.Tensor:
        """``tensors[i] - base`` for one chunk (``base``: the chunk's float32 base)."""
        if self.task_vectors is not None:
            out = ws.get(role or f"in{i}", self.chunk_shape(r0, r1), self.compute_dtype, self.device)
            return out.copy_(self.rows_of(self.task_vectors[i], r0, r1))
        return self.input_chunk(i, r0, r1, ws, role).sub_(base)

    def flat_rows(self, t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``t`` as a flat view (no copy)."""
        return self.rows_of(t, r0, r1).reshape(-1)

    def _magnitudes(self, x: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.task_vectors is not None:
            return x.float().abs()
        assert b is not None
        return (self._f32(x) - self._f32(b)).abs_()

    def _f32(self, t: torch.Tensor) -> torch.Tensor:
        if self.read_dtype is not None and t.dtype != self.read_dtype:
            t = t.to(self.read_dtype)
        return t.to(self.compute_dtype)

    def chunk_inputs(self, i: int, r0: int, r1: int) -> torch.Tensor:
        """Input ``i``'s rows ``r0:r1``, flat: its cached task vector, else the source."""
        source = self.task_vectors[i] if self.task_vectors is not None else self.tensors[i]
        return self.flat_rows(source, r0, r1)

    def band(self, i: int, r0: int, r1: int, lo: float | None, hi: float | None) -> torch.Tensor:
        """Task vector ``i``'s magnitudes in rows ``r0:r1`` that lie in ``[lo, hi)`` (all
        of them for ``None``), flat. Blocks with none are skipped by a fused count."""
        from workers.kernels import BLOCK, kernel

        x = self.chunk_inputs(i, r0, r1)
        b = self.flat_rows(self.base, r0, r1) if self.base is not None else None
        if lo is None or hi is None:
            return self._magnitudes(x, b)
        n = x.numel()
        whole = n - n % BLOCK
        parts = []
        if whole:
            bounds = torch.tensor([lo, hi], dtype=torch.float32, device=x.device)
            counts = kernel("band_blocks")(b[:whole] if b is not None else x[:whole], x[:whole], bounds[0],
                                           bounds[1], self.task_vectors is not None, self.read_dtype)
            hit = torch.nonzero(counts).squeeze(1)
            if hit.numel():
                xs = x[:whole].view(-1, BLOCK)[hit].reshape(-1)
                bs = b[:whole].view(-1, BLOCK)[hit].reshape(-1) if b is not None else None
                a = self._magnitudes(xs, bs)
                parts.append(a[(a >= lo) & (a < hi)])
        if whole < n:
            a = self._magnitudes(x[whole:], b[whole:] if b is not None else None)
            parts.append(a[(a >= lo) & (a < hi)])
        return torch.cat(parts) if parts else torch.empty(0, dtype=self.compute_dtype, device=x.device)

    def resolve_bins(self, wanted: dict[int, list[int]]) -> None:
        """Resolve histogram bins to exact values, in one pass over the chunks:
        ``wanted`` maps an input to the bins (``MagnitudeHistogram`` indices) it needs."""
        from workers.kernels import kernel
        from workers.sparsify import BinDetail

        parts: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {
            (i, j): [] for i, bins in wanted.items() for j in bins}
        for r0, r1 in self.chunk_rows():
            b = self.flat_rows(self.base, r0, r1) if self.base is not None else None
            for i, j in parts:
                histogram = self.magnitude_histogram(i)
                size = 1 << histogram.shift
                x = self.chunk_inputs(i, r0, r1)
                ints = torch.tensor([j + histogram.first, histogram.shift, size - 1], dtype=torch.int32,
                                    device=x.device)
                index = kernel("sub_bins")(b if b is not None else x, x, ints[0], ints[1], ints[2],
                                           self.task_vectors is not None, self.read_dtype)
                counts = torch.bincount(index.reshape(-1).cpu(), minlength=size + 1)[:size]
                subs = torch.nonzero(counts).squeeze(1)
                parts[(i, j)].append((subs, counts[subs]))
        for (i, j), chunks in parts.items():
            self.magnitude_histogram(i).keep_detail(j, BinDetail.from_chunks(chunks))

    def magnitude_histogram(self, i: int) -> MagnitudeHistogram:
        """Task vector ``i``'s exact magnitude histogram (``workers.sparsify``), refined
        where its values are few; kept in ``histograms`` when the caller gives one."""
        key = self.histogram_keys[i] if self.histogram_keys is not None else None
        if self.histograms is not None and key in self.histograms:
            return self.histograms[key]
        histogram = MagnitudeHistogram()
        for r0, r1 in self.chunk_rows(EAGER_CHUNK_ELEMENTS):
            b = self.flat_rows(self.base, r0, r1) if self.base is not None else None
            histogram.add(self._magnitudes(self.chunk_inputs(i, r0, r1), b))
        histogram.compact()
        self._refine(histogram, i)
        if self.histograms is not None:
            self.histograms[key] = histogram
        return histogram

    def _refine(self, histogram: MagnitudeHistogram, i: int) -> None:
        """One more pass: the exact values of the histogram's bins of several values,
        unless there are more than ``MAX_REFINED`` of them (float32 task vectors)."""
        table = histogram.refine_table()
        if table is None:
            return
        table = table.to(self.device)
        bits = torch.empty(0, dtype=torch.int32)
        counts = torch.empty(0, dtype=torch.int64)
        for r0, r1 in self.chunk_rows(EAGER_CHUNK_ELEMENTS):
            b = self.flat_rows(self.base, r0, r1) if self.base is not None else None
            chunk = self._magnitudes(self.chunk_inputs(i, r0, r1), b).float().view(torch.int32).reshape(-1)
            index = ((chunk >> histogram.shift) - histogram.first).clamp_(0, histogram.bins - 1)
            values, n = torch.unique(chunk[table[index]].cpu(), return_counts=True)
            bits, inverse = torch.unique(torch.cat([bits, values]), return_inverse=True)
            counts = torch.zeros(bits.numel(), dtype=torch.int64).index_add_(
                0, inverse, torch.cat([counts, n]))
            if bits.numel() > histogram.MAX_REFINED:
                return
        histogram.refine(bits, counts)

    def whole_task_vector(self, i: int, ws: Workspace) -> torch.Tensor:
        """Task vector ``i`` of the whole tensor (a fallback: a full-size temporary)."""
        out = torch.empty(self.shape, dtype=self.compute_dtype, device=self.device)
        for r0, r1 in self.chunk_rows():
            base = self.base_chunk(r0, r1, ws)
            assert base is not None
            self.rows_of(out, r0, r1).copy_(self.task_vector_chunk(i, r0, r1, base, ws, "tv"))
        return out


@dataclass
class ChunkOut:
    """Where a chunk's result goes: rows of the target, rounded to ``dtype`` on the way,
    after the residual scale of a stacked layer's output projection, if any."""

    target: torch.Tensor
    dtype: torch.dtype
    residual_scale: float | None = None
    unit_offset: bool = False


def merge_chunk_eagerly(method: MergeMethod, inputs: TensorInputs, state: Any, r0: int, r1: int,
                        out: ChunkOut, ws: Workspace) -> torch.Tensor:
    """A chunk through the method's ``merge`` on float32 copies of its inputs (the way
    for methods without a fused kernel); returns the chunk's sum."""
    shape = inputs.chunk_shape(r0, r1)
    chunk = MergeInputs(
        name=inputs.name, base=inputs.base_chunk(r0, r1, ws),
        tensors=[inputs.input_chunk(i, r0, r1, ws) for i in range(len(inputs.tensors))],
        model_params=inputs.model_params, global_params=inputs.global_params,
        seed=inputs.seed, model_names=inputs.model_names, owned=True, workspace=ws,
        out=ws.get("out", shape, inputs.compute_dtype, inputs.device), state=state,
    )
    result = method.merge(chunk)
    return _finish(result.reshape(shape), out.target, out.dtype, out.residual_scale, out.unit_offset)


def _finish(result: torch.Tensor, target: torch.Tensor, out_dtype: torch.dtype,
            residual_scale: float | None, unit_offset: bool) -> torch.Tensor:
    """Write ``result`` into ``target`` rounded to ``out_dtype``; its sum, for the finite check."""
    if residual_scale is not None and residual_scale != 1:
        from workers.merge import apply_residual_scale

        result = apply_residual_scale(result, residual_scale, unit_offset)
    if target.dtype == out_dtype:
        target.copy_(result)
    else:
        target.copy_(result.to(out_dtype))
    return result.sum(dtype=torch.float64)


def merge_into(method: MergeMethod, inputs: TensorInputs, target: torch.Tensor, *,
               out_dtype: torch.dtype, ws: Workspace, residual_scale: float | None = None,
               unit_offset: bool = False) -> torch.Tensor:
    """Merge one tensor into ``target`` (any float dtype, the shape of the output).

    The result is rounded to ``out_dtype`` (the merged model's dtype) before it is
    stored, so a float32 target holds exactly what the written model holds. Raises
    :class:`MergeError` when the result has NaN or inf.
    """
    if target.shape != torch.Size(inputs.shape):
        raise MergeError(f"tensor {inputs.name}: the target has shape {tuple(target.shape)}, "
                         f"the merge gives {inputs.shape}")
    total = torch.zeros((), dtype=torch.float64, device=target.device)
    if inputs.chunk_elements is None:
        inputs.chunk_elements = CHUNK_ELEMENTS if method.fused else EAGER_CHUNK_ELEMENTS
    if method.chunked:
        state = method.prepare(inputs, ws)
        for j, (r0, r1) in enumerate(inputs.chunk_rows()):
            out = ChunkOut(inputs.rows_of(target, r0, r1), out_dtype, residual_scale, unit_offset)
            total += method.merge_chunk(inputs, state, j, r0, r1, out, ws).double()
    else:
        rows = inputs.rows
        base = inputs.base_chunk(0, rows, ws)
        tensors = [inputs.input_chunk(i, 0, rows, ws) for i in range(len(inputs.tensors))]
        whole = MergeInputs(
            name=inputs.name, base=base, tensors=tensors, model_params=inputs.model_params,
            global_params=inputs.global_params, seed=inputs.seed, model_names=inputs.model_names,
            owned=True, workspace=ws,
        )
        result = method.merge(whole)
        total += _finish(result.reshape(inputs.shape), target, out_dtype, residual_scale, unit_offset)
    if not bool(torch.isfinite(total)):
        raise MergeError(f"the merge has NaN or inf in tensor {inputs.name}: lower the weights, or "
                         "check the sources for NaN (evomerge refuses to write or score it)")
    return target
