"""Each merge method's math on small tensors, against expectations worked out by hand
(not the same code run twice)."""

from __future__ import annotations

import math

import pytest
import torch

from workers import methods
from workers.methods.base import MergeError, MergeInputs


def run(method: str, base, tensors, model_params, global_params=None, seed=0, name="w"):
    m = methods.get(method)
    g = {p.name: p.default for p in m.global_params if not p.required}
    g.update(global_params or {})
    full = []
    for p in model_params:
        d = {s.name: s.default for s in m.model_params if not s.required}
        d.update(p)
        full.append(d)
    t = lambda x: None if x is None else torch.tensor(x, dtype=torch.float32)  # noqa: E731
    return m.merge(
        MergeInputs(name=name, base=t(base), tensors=[t(x) for x in tensors],
                    model_params=full, global_params=g, seed=seed)
    )


def close(a, b, tol=1e-6):
    return torch.allclose(a, torch.tensor(b, dtype=torch.float32), atol=tol)


# ---- linear ----------------------------------------------------------------------------
def test_linear_weighted_average():
    out = run("linear", None, [[1.0, 2.0], [5.0, -2.0]], [{"weight": 1}, {"weight": 3}])
    assert close(out, [(1 + 15) / 4, (2 - 6) / 4])


def test_linear_unnormalised_is_weighted_sum():
    out = run("linear", None, [[1.0, 2.0], [5.0, -2.0]], [{"weight": 1}, {"weight": 3}],
              {"normalize": False})
    assert close(out, [16.0, -4.0])


def test_linear_refuses_weights_summing_to_zero():
    with pytest.raises(MergeError, match="sum to 0"):
        run("linear", None, [[1.0], [2.0]], [{"weight": 1}, {"weight": -1}])


# ---- task arithmetic --------------------------------------------------------------------
def test_task_arithmetic():
    base = [1.0, 1.0, 1.0]
    out = run("task_arithmetic", base, [[2.0, 1.0, 0.0], [1.0, 3.0, 1.0]],
              [{"weight": 0.5}, {"weight": 2.0}], {"lambda": 2.0})
    # deltas (1,0,-1) and (0,2,0): 0.5*(1,0,-1) + 2*(0,2,0) = (0.5, 4, -0.5); times 2
    assert close(out, [2.0, 9.0, 0.0])


def test_task_arithmetic_weights_summing_to_zero_with_normalize_keeps_sum():
    # mergekit's rule: a divisor of ~0 is replaced by 1 rather than dividing by zero
    out = run("task_arithmetic", [0.0], [[1.0], [3.0]], [{"weight": 1}, {"weight": -1}],
              {"normalize": True})
    assert close(out, [-2.0])


# ---- TIES -------------------------------------------------------------------------------
def test_ties_trim_elect_merge_by_hand():
    base = [0.0, 0.0, 0.0, 0.0]
    m1 = [1.0, -2.0, 3.0, 0.5]  # keeps 3 and -2
    m2 = [-1.5, 1.0, 2.0, -3.0]  # keeps -3 and 2
    out = run("ties", base, [m1, m2], [{"weight": 1, "density": 0.5}] * 2)
    # trimmed: (0,-2,3,0), (0,0,2,-3); sum (0,-2,5,-3) elects (+,-,+,-);
    # agreeing entries: idx1 only m1, idx2 both, idx3 only m2; idx0 none
    assert close(out, [0.0, -2.0, 2.5, -3.0])


def test_ties_opposite_signs_keep_the_majority_mass():
    out = run("ties", [0.0, 0.0], [[1.0, -1.0], [-3.0, 0.5]], [{"weight": 1, "density": 1}] * 2)
    # idx0: sum -2 -> minus wins, only -3 kept; idx1: sum -0.5 -> minus wins, only -1
    assert close(out, [-3.0, -1.0])


def test_ties_a_sum_of_zero_elects_plus_as_mergekit_does():
    # the weighted task vectors cancel: + is elected (mergekit: sum >= 0), so only +2 counts
    out = run("ties", [0.0], [[2.0], [-2.0]], [{"weight": 1, "density": 1}] * 2)
    assert close(out, [2.0])


def test_ties_a_nan_that_the_election_drops_still_fails_the_merge():
    """A NaN in one task vector loses the sign election, but the merge must not pass it
    silently: the tensor is refused, as task arithmetic refuses it."""
    with pytest.raises(MergeError, match="NaN or inf"):
        from workers.tensor_merge import TensorInputs, merge_into

        m = methods.get("ties")
        g = {p.name: p.default for p in m.global_params if not p.required}
        params = [{"weight": 1.0, "density": 1.0}] * 3
        tensors = [torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), torch.tensor([float("nan"), 1.0])]
        inputs = TensorInputs(name="w", shape=(2,), base=torch.zeros(2), tensors=tensors,
                              model_params=params, global_params=g)
        from workers.sparsify import Workspace

        merge_into(m, inputs, torch.empty(2), out_dtype=torch.float32, ws=Workspace())


def test_ties_density_zero_returns_base_and_one_keeps_all():
    base = [1.0, 2.0]
    assert close(run("ties", base, [[3.0, 5.0]], [{"weight": 1, "density": 0.0}]), base)
    assert close(run("ties", base, [[3.0, 5.0]], [{"weight": 1, "density": 1.0}]), [3.0, 5.0])


def test_ties_weights_normalise_over_agreeing_models():
    out = run("ties", [0.0], [[2.0], [4.0]], [{"weight": 1, "density": 1}, {"weight": 3, "density": 1}])
    assert close(out, [(2 + 12) / 4])


def test_ties_weights_summing_to_zero():
    # weighted deltas 1*2 and -1*4 = -4: minus wins; only model 2 agrees; divisor -1
    out = run("ties", [0.0], [[2.0], [4.0]], [{"weight": 1, "density": 1}, {"weight": -1, "density": 1}])
    assert close(out, [4.0])


# ---- DARE -------------------------------------------------------------------------------
def test_dare_is_deterministic_for_a_seed_and_changes_with_it():
    base = torch.zeros(1000).tolist()
    model = torch.linspace(0.1, 1, 1000).tolist()
    p = [{"weight": 1, "density": 0.3}]
    a = run("dare_linear", base, [model], p, seed=1)
    b = run("dare_linear", base, [model], p, seed=1)
    c = run("dare_linear", base, [model], p, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    kept = (a != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.06


def test_dare_inverse_density_rescale_divides_by_density():
    base = torch.zeros(200).tolist()
    model = torch.full((200,), 2.0).tolist()
    out = run("dare_linear", base, [model], [{"weight": 1, "density": 0.25}],
              {"rescale_mode": "inverse_density"})
    kept = out[out != 0]
    assert torch.allclose(kept, torch.full_like(kept, 8.0))


def test_dare_l1_rescale_preserves_l1_norm():
    base = torch.zeros(500).tolist()
    model = torch.linspace(-1, 1, 500).tolist()
    out = run("dare_linear", base, [model], [{"weight": 1, "density": 0.5}])
    assert math.isclose(out.abs().sum().item(), torch.tensor(model).abs().sum().item(), rel_tol=1e-5)


def test_dare_density_edges():
    base = [0.0, 0.0]
    assert close(run("dare_ties", base, [[1.0, 2.0]], [{"weight": 1, "density": 0}]), base)
    assert close(run("dare_ties", base, [[1.0, 2.0]], [{"weight": 1, "density": 1}]), [1.0, 2.0])


# ---- breadcrumbs ------------------------------------------------------------------------
def test_breadcrumbs_drops_outliers_and_small():
    values = [float(v) for v in range(1, 11)]
    out = run("breadcrumbs", [0.0] * 10, [values], [{"weight": 1, "density": 0.5, "gamma": 0.2}])
    # keep 5 entries, after dropping the 2 largest (9, 10): ranks 4..8
    assert close(out, [0, 0, 0, 4, 5, 6, 7, 8, 0, 0])


def test_breadcrumbs_ties_elects_signs():
    m1 = [1.0, 2.0, 3.0, 4.0]
    m2 = [-1.0, -2.0, -3.0, -40.0]
    out = run("breadcrumbs_ties", [0.0] * 4, [m1, m2],
              [{"weight": 1, "density": 0.5, "gamma": 0.25}] * 2)
    # each keeps 2 entries after dropping its largest one: m1 keeps 2,3; m2 keeps -2,-3
    # sums cancel at idx1, idx2 -> >= 0 elects plus; only m1 agrees
    assert close(out, [0.0, 2.0, 3.0, 0.0])


# ---- DELLA ------------------------------------------------------------------------------
def test_della_keeps_large_entries_more_often():
    torch.manual_seed(0)
    row = torch.arange(1, 1001, dtype=torch.float32)
    base = torch.zeros(1000).tolist()
    out = run("della_linear", base, [row.tolist()], [{"weight": 1, "density": 0.5, "epsilon": 0.4}],
              {"rescale": False})
    kept = out != 0
    low, high = kept[:200].float().mean().item(), kept[-200:].float().mean().item()
    # keep probability runs from 0.1 (smallest) to 0.9 (largest)
    assert low < 0.3 and high > 0.7


def test_della_refuses_density_epsilon_outside_unit_interval():
    with pytest.raises(MergeError, match="epsilon"):
        run("della", [0.0] * 4, [[1.0, 2, 3, 4]], [{"weight": 1, "density": 0.9, "epsilon": 0.2}])


def test_della_inverse_density_divides_by_each_keep_probability():
    row = [1.0, 2.0, 3.0]  # ranks 0, 0.5, 1 -> probs 0.3, 0.5, 0.7
    out = run("della_linear", [0.0] * 3, [row], [{"weight": 1, "density": 0.5, "epsilon": 0.2}],
              {"rescale_mode": "inverse_density"}, seed=3)
    expected = [1 / 0.3, 2 / 0.5, 3 / 0.7]
    for got, want in zip(out.tolist(), expected):
        assert got == 0 or math.isclose(got, want, rel_tol=1e-5)


# ---- SLERP ------------------------------------------------------------------------------
def test_slerp_orthogonal_unit_vectors():
    out = run("slerp", [1.0, 0.0], [[0.0, 1.0]], [{}], {"t": 0.5})
    assert close(out, [math.sqrt(0.5), math.sqrt(0.5)])


def test_slerp_endpoints_and_parallel_fallback():
    a, b = [3.0, 4.0], [0.0, 2.0]
    assert close(run("slerp", a, [b], [{}], {"t": 0.0}), a)
    assert close(run("slerp", a, [b], [{}], {"t": 1.0}), b)
    # parallel vectors: plain linear interpolation
    assert close(run("slerp", [1.0, 1.0], [[2.0, 2.0]], [{}], {"t": 0.25}), [1.25, 1.25])


def test_slerp_quarter_turn_angle():
    out = run("slerp", [1.0, 0.0], [[0.0, 1.0]], [{}], {"t": 1 / 3})
    assert close(out, [math.cos(math.pi / 6), math.sin(math.pi / 6)])


# ---- Model Stock ------------------------------------------------------------------------
def test_model_stock_orthogonal_offsets_return_base():
    out = run("model_stock", [1.0, 1.0], [[2.0, 1.0], [1.0, 2.0]], [{}, {}])
    assert close(out, [1.0, 1.0])


def test_model_stock_identical_offsets_return_average():
    out = run("model_stock", [0.0, 0.0], [[1.0, 2.0], [1.0, 2.0]], [{}, {}])
    assert close(out, [1.0, 2.0])


def test_model_stock_ratio_from_angle():
    # offsets (1,0) and (1,1): cos = 1/sqrt2; t = 2c / (1 + c)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = run("model_stock", [0.0, 0.0], [[1.0, 0.0], [1.0, 1.0]], [{}, {}])
    assert close(out, [t * 1.0, t * 0.5], tol=1e-5)


# ---- passthrough ------------------------------------------------------------------------
def test_passthrough_scale():
    assert close(run("passthrough", None, [[1.0, -2.0]], [{"scale": 0.5}]), [0.5, -1.0])


def test_unknown_method_suggests_close_names():
    with pytest.raises(MergeError, match="Did you mean ties"):
        methods.get("tie")


# ---- selection --------------------------------------------------------------------------
def chunked_window(delta: torch.Tensor, start: int, count: int, chunk: int = 70_001,
                   refine: bool = False) -> torch.Tensor:
    """The window found and applied a chunk at a time, as the merge engine does: an exact
    magnitude histogram names each edge's bin (``refine``: with the exact values of its
    bins of several values), the chunks give that bin's entries where it must."""
    from workers.sparsify import MagnitudeHistogram, WindowSearch

    flat = delta.reshape(-1)
    pieces = [flat[i:i + chunk] for i in range(0, flat.numel(), chunk)]
    histogram = MagnitudeHistogram()
    for piece in pieces:
        histogram.add(piece.abs())
    histogram.compact()
    if refine:
        bits, counts = torch.unique(flat.abs().view(torch.int32), return_counts=True)
        table = histogram.refine_table()
        index = ((bits >> histogram.shift) - histogram.first).clamp(0, histogram.bins - 1)
        chosen = table[index] if table is not None else torch.zeros_like(bits, dtype=torch.bool)
        histogram.refine(bits[chosen], counts[chosen])
    search = WindowSearch(flat.numel(), start, count, lambda: histogram)
    if refine:
        assert not search.needs_pass, "a refined histogram knows every edge"
    for piece in pieces:
        def extract(lo, hi, piece=piece):
            a = piece.abs()
            return a if lo is None else a[(a >= lo) & (a < hi)]

        search.observe(extract)
    window = search.finish(lambda: flat.abs())
    return torch.cat([window.mask(piece.abs()).clone() for piece in pieces]).bool()


def expected_window(delta: torch.Tensor, start: int, count: int) -> torch.Tensor:
    """By a full sort: every entry between the (start + count)-th and (start + 1)-th
    largest magnitudes, both included (ties with an edge are kept)."""
    ordered = torch.sort(delta.abs().reshape(-1), descending=True).values
    a = delta.abs()
    keep = a >= ordered[start + count - 1]
    if start > 0:
        keep &= a <= ordered[start]
    return keep


@pytest.mark.parametrize("density", [0.001, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_top_k_mask_keeps_the_k_largest_and_their_ties(density):
    from workers.sparsify import top_k_mask

    g = torch.Generator().manual_seed(1)
    # many exact ties: values on a coarse grid
    delta = (torch.randn(600_000, generator=g) * 50).round() / 50
    k = max(1, int(density * delta.numel()))
    mask = top_k_mask(delta, k).bool()
    kept, dropped = delta.abs()[mask], delta.abs()[~mask]
    assert int(mask.sum()) >= k
    if dropped.numel():
        assert kept.min() > dropped.max()  # ties with the k-th are kept, all of them
    assert int((delta.abs() > kept.min()).sum()) < k  # and nothing more: the k-th is the edge
    assert torch.equal(mask, expected_window(delta, 0, k))
    for refine in (False, True):
        assert torch.equal(chunked_window(delta, 0, k, refine=refine), mask)
    clean = torch.randn(600_000, generator=g)  # no ties: exactly k
    assert int(top_k_mask(clean, k).sum()) == k


@pytest.mark.parametrize("start,count", [(0, 1), (5, 100), (1000, 50_000), (0, 599_999), (599_999, 1)])
def test_window_mask_between_its_edges(start, count):
    from workers.sparsify import window_mask

    g = torch.Generator().manual_seed(2)
    delta = (torch.randn(600_000, generator=g) * 20).round() / 20  # heavy ties
    expected = expected_window(delta, start, count)
    assert torch.equal(window_mask(delta, start, count).bool(), expected)
    for refine in (False, True):
        assert torch.equal(chunked_window(delta, start, count, refine=refine), expected)
    clean = torch.randn(600_000, generator=g)  # no ties: exactly the ranks asked for
    order = torch.sort(clean.abs(), descending=True).indices
    exact = torch.zeros_like(clean, dtype=torch.bool)
    exact[order[start : start + count]] = True
    assert torch.equal(chunked_window(clean, start, count), exact)


def test_window_with_huge_runs_of_one_value():
    """A tensor with one huge run of a single value, the rest spread out: an edge that
    falls inside the run keeps all of it."""
    delta = torch.zeros(500_000)
    delta[::2] = 1.0
    delta[1::7] = torch.linspace(0.001, 0.5, delta[1::7].numel())
    for start, count in [(0, 250_001), (3, 249_990), (249_000, 5_000), (0, 10)]:
        expected = expected_window(delta, start, count)
        for refine in (False, True):
            assert torch.equal(chunked_window(delta, start, count, refine=refine), expected), (start, count)


def test_bf16_task_vectors_refine_to_exact_values():
    """Task vectors of bf16 sources hold few distinct values: a histogram refined in
    one pass knows every threshold, so no candidate needs a pass to find its trim."""
    from workers.tensor_merge import TensorInputs

    g = torch.Generator().manual_seed(3)
    base = (0.02 * torch.randn(700, 1000, generator=g)).bfloat16()
    expert = (base.float() + 0.002 * torch.randn(700, 1000, generator=g)).bfloat16()
    inputs = TensorInputs(name="w", shape=(700, 1000), base=base, tensors=[expert],
                          model_params=[{"weight": 1.0}], global_params={}, chunk_elements=100_000)
    histogram = inputs.magnitude_histogram(0)
    assert histogram.refined, "this task vector has bins of several values"
    delta = (expert.float() - base.float()).reshape(-1)
    values = torch.sort(delta.abs(), descending=True).values
    for density in (0.01, 0.2, 0.5, 0.77, 0.95):
        k = int(density * delta.numel())
        assert histogram.resolve(k) == float(values[k - 1]), density
    wide = TensorInputs(name="w", shape=(700, 1000), base=base.float(),
                        tensors=[base.float() + 0.002 * torch.randn(700, 1000, generator=g)],
                        model_params=[{"weight": 1.0}], global_params={}, chunk_elements=100_000)
    assert not wide.magnitude_histogram(0).refined, "float32 task vectors: too many values to keep"


