"""The fused merge kernels give the same bits compiled (torch.compile, inductor) as run
eagerly, so a worker that compiles scores exactly what an export that does not writes;
and a whole candidate built with compiled kernels equals the engine's written model."""

from __future__ import annotations

import pytest
import torch

from workers import kernels

pytestmark = pytest.mark.slow


def chunk(n: int, seed: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    xs = [(base.float() + torch.randn(n, generator=g) * 0.002).to(dtype) for _ in range(3)]
    return base, xs


def tv_args(base, xs, *, keep=None, consensus="sum", normalize=True, rescaled=False,
            out_dtype=torch.bfloat16, lo=0.001, hi=float("inf"), trim="lo"):
    f32 = dict(dtype=torch.float32)
    n = len(xs)
    return (base, xs, keep, torch.full((n,), lo), torch.full((n,), hi), torch.full((n,), 1.3, **f32),
            torch.full((n,), 0.5, **f32), torch.tensor([0.7, -0.4, 1.2][:n]), torch.tensor(0.9),
            torch.tensor(1.5), torch.empty(base.numel(), dtype=out_dtype), consensus, normalize,
            rescaled, False, trim, None, out_dtype)


@pytest.fixture(scope="module")
def compiled():
    kernels.set_compiling(True)
    yield
    kernels.set_compiling(None)


CASES = {
    "ties": dict(),
    "task_arithmetic": dict(consensus=None, normalize=False, lo=-float("inf"), trim=None),
    "count_consensus_rescaled": dict(consensus="count", rescaled=True, hi=0.004, trim="window"),
    "float32_out": dict(out_dtype=torch.float32),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_task_vector_kernel_compiled_equals_eager(compiled, case):
    for n in (1 << 16, 100_003):  # a second size must not change anything (dynamic shapes)
        base, xs = chunk(n, seed=n)
        eager_args, compiled_args = tv_args(base, xs, **CASES[case]), tv_args(base, xs, **CASES[case])
        want = kernels.task_vectors_kernel(*eager_args)
        got = kernels.kernel("task_vectors")(*compiled_args)
        assert torch.equal(eager_args[10], compiled_args[10]), case
        assert bool(torch.isfinite(want)) == bool(torch.isfinite(got))  # sums: any order
    assert kernels.compiled_ok("task_vectors")


def test_masks_linear_and_band_kernels_compiled_equal_eager(compiled):
    base, xs = chunk(1 << 16, seed=3)
    keep = [(torch.rand(base.numel(), generator=torch.Generator().manual_seed(i)) < 0.5).float()
            for i in range(3)]
    keep[1] = None  # an input with bounds beside inputs with masks
    a, b = tv_args(base, xs, keep=keep), tv_args(base, xs, keep=keep)
    kernels.task_vectors_kernel(*a)
    kernels.kernel("task_vectors")(*b)
    assert torch.equal(a[10], b[10])
    w, div = torch.tensor([0.3, 0.9, -0.2]), torch.tensor(1.0)
    o1, o2 = torch.empty(base.numel(), dtype=torch.bfloat16), torch.empty(base.numel(), dtype=torch.bfloat16)
    kernels.linear_kernel(xs, w, div, o1, None, torch.bfloat16)
    kernels.kernel("linear")(xs, w, div, o2, None, torch.bfloat16)
    assert torch.equal(o1, o2)
    ints = torch.tensor([120_000 >> 3, 12, (1 << 12) - 1], dtype=torch.int32)
    assert torch.equal(kernels.sub_bins(base, xs[0], *ints, False, None),
                       kernels.kernel("sub_bins")(base, xs[0], *ints, False, None))
    lo, hi = torch.tensor(0.001), torch.tensor(0.002)
    assert torch.equal(kernels.band_blocks(base, xs[0], lo, hi, False, None),
                       kernels.kernel("band_blocks")(base, xs[0], lo, hi, False, None))
    assert all(kernels.compiled_ok(k) for k in ("task_vectors", "linear", "sub_bins", "band_blocks"))


def test_a_compiled_worker_scores_what_the_engine_writes(family, tmp_path, compiled):
    from transformers import AutoModelForCausalLM

    from search_spaces.recipe import Recipe
    from workers.candidate import CandidateBuilder
    from workers.merge import merge

    base, experts = family("llama", dtype=torch.bfloat16)
    builder = CandidateBuilder([str(base), *map(str, experts)], base=str(base))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    for method, params in (("ties", {"weight": 1.0, "density": 0.4}), ("task_arithmetic", {"weight": 0.7})):
        recipe = Recipe.from_dict({"merge_method": method, "base_model": str(base), "models": [
            {"model": str(e), "parameters": params} for e in experts]})
        with torch.no_grad():
            got = builder.build(recipe)(ids).logits
        kernels.set_compiling(False)  # the export runs eagerly: the same bits
        merge(recipe, tmp_path / method)
        kernels.set_compiling(True)
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path / method), dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, got), method
