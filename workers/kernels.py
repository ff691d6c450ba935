"""Fused per-chunk arithmetic of the chunked merge methods.

Each kernel is a plain function of one chunk of a tensor: the inputs in their stored
dtype (flat views of the sources, never copied), small tensors of coefficients, and
``out`` — the chunk of the target, written with the result rounded to the output dtype.
It returns the chunk's float32 sum (NaN or inf there means the merge has NaN or inf).

Run eagerly these are ordinary torch; compiled (``torch.compile``, inductor) each
becomes one loop over the chunk with every float32 intermediate in registers, which is
what makes a candidate cost about one read of the sources and one write of the
candidate. Inductor on a CPU does not contract multiply-adds, so both ways give the same
bits (``tests/test_kernels.py``). Coefficients are tensors, not Python numbers, so a new
candidate never recompiles; a kernel compiles once per shape of its argument lists.

Compiling (``EVOMERGE_COMPILE``: ``auto``, the default, ``1`` or ``0``) is on in
``auto`` for models of 50M elements and more where a C++ compiler is present; tiny
models (tests, the demo zoo) merge eagerly.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import torch

COMPILE_ENV = "EVOMERGE_COMPILE"
BLOCK = 256  # entries per block when a trim's band is gathered (see band_blocks)


def _float(x: torch.Tensor, read_dtype: torch.dtype | None) -> torch.Tensor:
    return (x.to(read_dtype) if read_dtype is not None and x.dtype != read_dtype else x).float()


def _write(r: torch.Tensor, out: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out.copy_(r if out.dtype == out_dtype else r.to(out_dtype))
    return r.sum()


def task_vectors_kernel(base: torch.Tensor, xs: list[torch.Tensor], keep: list[torch.Tensor | None] | None,
                        lo: torch.Tensor, hi: torch.Tensor, l1: torch.Tensor, inv: torch.Tensor,
                        w: torch.Tensor, lam: torch.Tensor, divisor: torch.Tensor, out: torch.Tensor,
                        consensus: str | None, normalize: bool, rescaled: bool, deltas: bool,
                        trim: str | None, read_dtype: torch.dtype | None,
                        out_dtype: torch.dtype) -> torch.Tensor:
    """Task arithmetic, TIES, DARE, Breadcrumbs and DELLA on one chunk.

    Input ``i``'s task vector ``d`` (``xs[i] - base``, or ``xs[i]`` itself when
    ``deltas``) is multiplied by ``keep[i]`` where given (random and DELLA masks), else
    keeps the entries whose magnitude ``a`` is at least ``lo[i]`` (``trim``: ``"lo"``)
    and at most ``hi[i]`` (``"window"``; None: no trim); then, when ``rescaled``,
    ``× l1[i] / inv[i]``; then ``× w[i]``. The kept vectors are summed (``consensus``
    None), or summed where their sign agrees with the elected one (``sum``: the sign of
    the weighted sum, + where it is 0, as in mergekit; ``count``: the majority), and
    divided by ``divisor`` (None) or by the summed weights of the agreeing inputs, when
    ``normalize``; then ``× lam + base``. A NaN in a task vector survives its trim
    (``a < lo`` is false for NaN), and the returned sum carries the summed task
    vectors' NaN or inf, so it shows even where the election drops it.
    """
    b = _float(base, read_dtype)
    kept = []
    for i, x in enumerate(xs):
        d = x.float() if deltas else _float(x, read_dtype) - b
        mask = keep[i] if keep is not None else None
        if mask is not None:
            d = d * mask
        elif trim is not None:
            a = d.abs()
            d = torch.where(a < lo[i], 0.0, d)
            if trim == "window":
                d = torch.where(a > hi[i], 0.0, d)
        if rescaled:
            d = (d * l1[i]) / inv[i]
        kept.append(d * w[i])
    s = kept[0]
    for k in kept[1:]:
        s = s + k
    if consensus is None:
        if normalize:
            s = s / divisor
        return _write(s * lam + b, out, out_dtype)
    if consensus == "sum":
        elected = torch.where(s >= 0, 1.0, -1.0)
    else:
        votes = torch.sign(kept[0])
        for k in kept[1:]:
            votes = votes + torch.sign(k)
        elected = torch.where(votes >= 0, 1.0, -1.0)
    agreeing = agreed = None
    for i, k in enumerate(kept):
        agrees = (k * elected) > 0
        part = torch.where(agrees, k, 0.0)
        agreeing = part if agreeing is None else agreeing + part
        if normalize:
            weight = torch.where(agrees, w[i], 0.0)
            agreed = weight if agreed is None else agreed + weight
    if agreed is not None:
        agreeing = agreeing / torch.where(agreed == 0, 1.0, agreed)
    r = agreeing * lam + b
    out.copy_(r if out.dtype == out_dtype else r.to(out_dtype))
    return (r + s * 0.0).sum()  # one reduction; ``s × 0`` is NaN where s is NaN or inf


def linear_kernel(xs: list[torch.Tensor], w: torch.Tensor, divisor: torch.Tensor, out: torch.Tensor,
                  read_dtype: torch.dtype | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``sum(w[i] × xs[i]) / divisor`` on one chunk."""
    s = _float(xs[0], read_dtype) * w[0]
    for i, x in enumerate(xs[1:], start=1):
        s = s + _float(x, read_dtype) * w[i]
    return _write(s / divisor, out, out_dtype)


def band_blocks(base: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                deltas: bool, read_dtype: torch.dtype | None) -> torch.Tensor:
    """For each block of ``BLOCK`` entries of a chunk (its length a multiple of it), how
    many task-vector magnitudes lie in ``[lo, hi)``: the blocks a trim's band is
    gathered from."""
    d = x.float() if deltas else _float(x, read_dtype) - _float(base, read_dtype)
    a = d.abs()
    inside = ((a >= lo) & (a < hi)).float()
    return inside.view(-1, BLOCK).sum(1)


def sub_bins(base: torch.Tensor, x: torch.Tensor, bin_id: torch.Tensor, shift: torch.Tensor,
             low: torch.Tensor, deltas: bool, read_dtype: torch.dtype | None) -> torch.Tensor:
    """For each entry of a chunk whose magnitude lies in histogram bin ``bin_id`` (its
    float32 pattern shifted right by ``shift``), its low bits (``& low``: its exact value
    within the bin); ``low + 1`` for the others. Counting them resolves a bin to exact
    values without gathering entries."""
    d = x.float() if deltas else _float(x, read_dtype) - _float(base, read_dtype)
    bits = d.abs().view(torch.int32)
    return torch.where((bits >> shift) == bin_id, bits & low, low + 1)


KERNELS: dict[str, Callable[..., Any]] = {
    "task_vectors": task_vectors_kernel, "linear": linear_kernel, "band_blocks": band_blocks,
    "sub_bins": sub_bins,
}
_compiled: dict[str, Callable[..., Any]] = {}
_state: dict[str, bool | None] = {"on": None, "auto": False}
# ``auto`` compiles for models of at least this many elements: compiling costs seconds
# once per worker, a candidate of a tiny model costs milliseconds eagerly
AUTO_MIN_ELEMENTS = 50_000_000


def compiler_available() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None or shutil.which("cc") is not None


def compiling() -> bool:
    """Whether kernels run compiled: ``EVOMERGE_COMPILE`` 1 / 0, or (``auto``, the
    default) as :func:`use_for` last decided."""
    if _state["on"] is not None:
        return bool(_state["on"])
    mode = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if mode in ("1", "true", "yes", "on"):
        return True
    if mode in ("0", "false", "no", "off"):
        return False
    return bool(_state["auto"])


def use_for(elements: int) -> None:
    """Tell ``auto`` how big the models being merged are (elements of one model)."""
    _state["auto"] = elements >= AUTO_MIN_ELEMENTS and compiler_available()


def set_compiling(on: bool | None) -> None:
    """Turn compiling on or off for this process (None: back to ``EVOMERGE_COMPILE``)."""
    _state["on"] = on


def compiled_ok(name: str) -> bool:
    """Whether kernel ``name`` has run compiled (it falls back to eager on failure)."""
    return name in _compiled and _compiled[name] is not KERNELS[name]


def kernel(name: str) -> Callable[..., Any]:
    """The kernel ``name``, compiled when compiling is on (eager if compiling fails)."""
    fn = KERNELS[name]
    if not compiling():
        return fn
    if name not in _compiled:
        import torch._dynamo

        # one graph per combination of static arguments (consensus, dtypes, masks given or
        # not, the number of inputs): a study uses a few, a worker process a few dozen
        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, 64)
        config.accumulated_cache_size_limit = max(config.accumulated_cache_size_limit, 1024)
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)

        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return compiled(*args, **kwargs)
            except Exception as err:  # no compiler, an unsupported device: same bits eagerly
                warnings.warn(f"merge kernel {name!r} runs eagerly: compiling it failed ({err})",
                              stacklevel=2)
                _compiled[name] = fn
                return fn(*args, **kwargs)

        _compiled[name] = run
    return _compiled[name]
