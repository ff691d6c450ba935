"""The memory planner (workers.memory_plan): tiers, sizes, refusals, and its contract with the engine.

Headers only: the models here are lists of (name, shape, dtype), among them the shapes of
Qwen2.5-7B (hidden 3584, 28 layers, intermediate 18944, vocab 152064, 28 heads, 4 KV heads,
untied head), so real sizes are planned without a byte of weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workers.memory_plan import (
    CHUNK_ELEMENTS,
    DEFAULT_EVAL_TOKENS,
    HISTOGRAM_MAX_BYTES,
    HISTOGRAM_MIN_ELEMENTS,
    SLICE_ABOVE,
    DoesNotFit,
    EvalFacts,
    MemoryPlan,
    SourceFacts,
    WorkerLimits,
    detect_local_limits,
    eval_facts,
    facts_from_tensors,
    limits_from_settings,
    parse_size,
    plan_memory,
)

REPO = Path(__file__).resolve().parents[1]
GB = 10**9
QWEN_CONFIG = {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
               "intermediate_size": 18944, "vocab_size": 152064,
               "num_attention_heads": 28, "num_key_value_heads": 4,
               "max_position_embeddings": 32768, "tie_word_embeddings": False}


def qwen7b_tensors(dtype: str = "BF16") -> list[tuple[str, tuple[int, ...], str]]:
    """Qwen2.5-7B's tensors as its safetensors headers list them."""
    hidden, inter, vocab, kv = 3584, 18944, 152064, 4 * 128
    out = [("model.embed_tokens.weight", (vocab, hidden), dtype), ("lm_head.weight", (vocab, hidden), dtype),
           ("model.norm.weight", (hidden,), dtype)]
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.q_proj.bias": (hidden,),
              "self_attn.k_proj.weight": (kv, hidden), "self_attn.k_proj.bias": (kv,),
              "self_attn.v_proj.weight": (kv, hidden), "self_attn.v_proj.bias": (kv,),
              "self_attn.o_proj.weight": (hidden, hidden), "mlp.gate_proj.weight": (inter, hidden),
              "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter),
              "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    for i in range(28):
        out += [(f"model.layers.{i}.{name}", shape, dtype) for name, shape in shapes.items()]
    return out


def qwen7b(ref: str, dtype: str = "BF16") -> SourceFacts:
    return facts_from_tensors(ref, qwen7b_tensors(dtype), QWEN_CONFIG)


def three_7b() -> list[SourceFacts]:
    """A base and two fine-tunes of it."""
    return [qwen7b("base"), qwen7b("math"), qwen7b("code")]


def gpu(device_gb: float | None = 80, host_gb: float | None = 128) -> WorkerLimits:
    return WorkerLimits("cuda", None if device_gb is None else int(device_gb * GB),
                        None if host_gb is None else int(host_gb * GB))


def cpu(host_gb: float | None) -> WorkerLimits:
    host = None if host_gb is None else int(host_gb * GB)
    return WorkerLimits("cpu", host, host)


def plan(sources=None, *, method="ties", limits=None, evaluation=None, base="base", **kw) -> MemoryPlan:
    return plan_memory(sources=sources if sources is not None else three_7b(), base=base, method=method,
                       stacking_layers=kw.pop("stacking_layers", None), limits=limits or gpu(),
                       evaluation=evaluation, **kw)


# ---- facts -------------------------------------------------------------------------------
def test_facts_from_qwen_headers():
    f = qwen7b("q")
    assert f.numel == 7_615_616_512  # Qwen2.5-7B: 7.62 B parameters
    assert f.nbytes == 2 * f.numel and f.dtype == "bfloat16" and f.dtype_bytes == 2
    assert f.largest_numel == 152064 * 3584  # the embedding (and the untied head)
    assert f.num_layers == 28
    per_layer = 2 * (2 * 3584 * 3584 + 2 * 512 * 3584 + 3 * 18944 * 3584 + 3584 + 2 * 512 + 2 * 3584)
    assert f.layer_nbytes == per_layer


def test_facts_count_every_tensor_in_bytes_but_only_floats_in_elements():
    tensors = [("model.embed_tokens.weight", (10, 4), "F32"), ("model.layers.0.w", (4, 4), "BF16"),
               ("model.layers.1.w", (4, 4), "torch.bfloat16"), ("model.layers.0.step", (2,), "I64"),
               ("model.layers.1.step", (2,), "int64")]
    f = facts_from_tensors("m", tensors, {"num_hidden_layers": 2})
    assert f.nbytes == 40 * 4 + 2 * 16 * 2 + 2 * 2 * 8
    assert f.numel == 40 + 32 and f.largest_numel == 40
    assert f.dtype == "float32"  # the dominant floating dtype by bytes
    assert f.num_layers == 2 and f.layer_nbytes == 16 * 2 + 2 * 8


def test_facts_take_the_layer_count_from_the_config_when_the_names_have_none():
    f = facts_from_tensors("m", [("w", (3, 3), "F16")], {"text_config": {"num_hidden_layers": 5}})
    assert (f.num_layers, f.layer_nbytes, f.dtype) == (5, 0, "float16")


def test_eval_facts_from_a_config():
    ev = eval_facts(QWEN_CONFIG, batch_size=8, max_length=None)
    assert ev == EvalFacts(batch_size=8, max_length=DEFAULT_EVAL_TOKENS, num_layers=28, kv_width=512,
                           vocab=152064, hidden=3584)
    parts = ev.parts(2)
    tokens = 8 * DEFAULT_EVAL_TOKENS
    assert parts["kv_cache"] == tokens * 28 * 2 * 512 * 2
    assert parts["logits"] == tokens * 152064 * 4
    assert ev.nbytes(2) == sum(parts.values())
    assert eval_facts({**QWEN_CONFIG, "max_position_embeddings": 256}, 8, None).max_length == 256
    assert eval_facts(QWEN_CONFIG, 8, 4096).max_length == 4096


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(max_length=0), dict(vocab=-1)])
def test_eval_facts_are_bounded(bad):
    base = dict(batch_size=1, max_length=1, num_layers=1, kv_width=1, vocab=1, hidden=1)
    with pytest.raises(ValueError):
        EvalFacts(**{**base, **bad})


def test_source_facts_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        SourceFacts("x", 1, 1, 1, "int8")
    with pytest.raises(ValueError, match="nbytes"):
        SourceFacts("x", -1, 1, 1, "float32")


@pytest.mark.parametrize("text, value", [
    ("80GB", 80 * 10**9), ("24GiB", 24 * 2**30), ("512 MB", 512 * 10**6), ("1.5TB", 15 * 10**11),
    ("123", 123), (4096, 4096), ("2g", 2 * 10**9)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "80 GBs", True, 2**61])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        parse_size(text)


# ---- tiers -------------------------------------------------------------------------------
def test_resident_when_the_device_holds_everything():
    p = plan(three_7b()[:2], limits=gpu(80))
    assert p.tier == "resident" and p.device == "cuda" and p.candidate_dtype == "bfloat16"
    b = p.breakdown
    assert p.device_bytes == b["sources"] + b["candidate"] + b["workspace"] + b["evaluation"]
    # a trimming method's magnitude histograms are host memory (at most 1.8 MB per big tensor)
    assert b["staging"] == 0 and p.page_cache_bytes == 0
    assert p.host_bytes == b["magnitude_histograms"] == 198 * HISTOGRAM_MAX_BYTES  # the expert's big tensors
    assert p.moved_bytes_per_candidate == b["sources"] + b["candidate"]  # read the sources, write one model
    assert p.summary() == (f"resident: {p.device_bytes / GB:.1f} GB on cuda, 0.4 GB host; moves "
                           f"{p.moved_bytes_per_candidate / GB:.1f} GB per candidate")


def test_the_worked_example_three_7b_bf16_on_one_80gb_gpu_is_streamed():
    """docs/workers.md's example: base + two fine-tunes of Qwen2.5-7B in bf16, TIES, the default
    evaluation (batches of 64 × 1024 tokens), one 80 GB GPU, 128 GB of host memory."""
    sources = three_7b()
    one = sources[0].nbytes
    ev = eval_facts(QWEN_CONFIG, batch_size=64, max_length=None)
    p = plan(sources, limits=gpu(80, 128), evaluation=ev)
    assert p.tier == "streamed"
    assert not p.tiers["resident"].fits and "80.0 GB available" in (p.tiers["resident"].why_not or "")
    b = p.breakdown
    assert b["candidate"] == one  # a bf16 candidate of the base's shapes
    # double-buffered inputs of the largest tensor staged whole (SLICE_ABOVE); the embeddings and
    # head (1.1 GB each) are staged a chunk of rows at a time
    assert b["staging"] == 2 * 3 * SLICE_ABOVE
    assert p.device_bytes == b["candidate"] + b["workspace"] + b["staging"] + b["evaluation"]
    assert p.host_bytes == 3 * one + b["magnitude_histograms"]  # the sources, pinned; the histograms
    # the GPU holds one model plus the staging, not the three sources: the goal is
    # device peak <= 1.3 x one model plus the evaluation
    assert p.device_bytes - b["evaluation"] <= 1.3 * one
    assert p.device_bytes <= 80 * GB
    assert p.moved_bytes_per_candidate == 3 * one + one + 3 * one  # read, written, copied from the host
    assert round(p.device_bytes / GB, 1) == 68.1 and round(p.host_bytes / GB, 1) == 46.4


def test_mapped_when_the_host_cannot_hold_the_sources_either():
    p = plan(limits=gpu(48, 32), evaluation=eval_facts(QWEN_CONFIG, 8, None))
    assert p.tier == "mapped"
    assert not p.tiers["streamed"].fits and "host memory" in (p.tiers["streamed"].why_not or "")
    assert p.page_cache_bytes == p.breakdown["sources"]
    # only the pinned staging buffers and the histograms are anonymous
    assert p.host_bytes == p.breakdown["staging"] + p.breakdown["magnitude_histograms"]
    assert any("page cache has room" in n for n in p.notes)  # 32 GB cannot cache 45.7 GB of sources
    sources, candidate = p.breakdown["sources"], p.breakdown["candidate"]
    # read on the device, written, copied from the page cache, and read from disk first
    assert p.moved_bytes_per_candidate == 3 * sources + candidate


def test_mapped_without_disk_reads_when_the_page_cache_holds_the_sources():
    p = plan(limits=gpu(80, 128), tier="mapped")
    assert p.tier == "mapped" and not any("page cache has room" in n for n in p.notes)


def test_a_cpu_worker_is_never_streamed():
    sources = three_7b()
    need = plan(sources, limits=cpu(None)).tiers
    assert not need["streamed"].fits and "GPU workers" in (need["streamed"].why_not or "")
    between = (need["resident"].device_bytes + need["mapped"].device_bytes) / 2 / GB
    p = plan(sources, limits=cpu(between))
    assert p.tier == "mapped" and p.breakdown["staging"] == 0 and p.host_bytes == 0
    # read from the page cache (no copy to a device), written, and read from disk: 38 GB cannot cache it
    sources_bytes, candidate = p.breakdown["sources"], p.breakdown["candidate"]
    assert p.moved_bytes_per_candidate == 2 * sources_bytes + candidate
    assert plan(sources, limits=cpu(1000)).tier == "resident"
    with pytest.raises(DoesNotFit) as info:
        plan(sources, limits=cpu(1000), tier="streamed")
    assert "GPU workers" in info.value.msg and "worker.tier: resident" in info.value.fix


def test_a_forced_tier():
    assert plan(limits=gpu(200, 256), tier="streamed").tier == "streamed"
    assert plan(limits=gpu(200, 256), tier="mapped").tier == "mapped"
    with pytest.raises(DoesNotFit) as info:
        plan(limits=gpu(40, 256), tier="resident")
    err = info.value
    assert err.msg.startswith("the resident tier does not fit a GPU worker with 40.0 GB of GPU memory")
    assert f"{err.tiers['resident'].device_bytes / GB:.1f} GB of GPU memory, 40.0 GB available" in err.msg
    assert "worker.tier: auto" in err.fix


def test_unknown_limits_fit_with_a_note():
    p = plan(limits=gpu(None, None))
    assert p.tier == "resident" and all(t.fits for t in p.tiers.values())
    assert any("EVOMERGE_WORKER_DEVICE_MEMORY" in n and "checks the plan again" in n for n in p.notes)
    p = plan(limits=cpu(None))
    assert p.tier == "resident" and any("EVOMERGE_WORKER_HOST_MEMORY" in n for n in p.notes)


# ---- the candidate, the workspace, the cache ---------------------------------------------
def test_the_candidate_dtype():
    assert plan(limits=gpu(None)).breakdown["candidate"] == three_7b()[0].numel * 2  # auto: the base's bf16
    p = plan(limits=gpu(None), candidate_dtype="float32")
    assert p.candidate_dtype == "float32" and p.breakdown["candidate"] == three_7b()[0].numel * 4
    f32 = [qwen7b(r, "F32") for r in ("base", "a")]
    assert plan(f32, limits=gpu(None)).candidate_dtype == "float32"
    with pytest.raises(ValueError, match="candidate dtype"):
        plan(limits=gpu(None), candidate_dtype="int8")


def test_workspace_of_chunked_and_whole_tensor_methods():
    largest = 152064 * 3584
    chunk = plan(method="task_arithmetic", limits=gpu(None)).breakdown["workspace"]
    assert chunk == (2 + 8) * CHUNK_ELEMENTS * 4  # two non-base inputs
    ties = plan(method="ties", limits=gpu(None)).breakdown["workspace"]
    assert ties == chunk + int(largest / 1024) * 4  # the trimming band
    whole = plan(three_7b()[:2], method="slerp", limits=gpu(None)).breakdown["workspace"]
    assert whole == (2 + 5) * largest * 4  # slerp: base and one model, each converted to float32


def test_the_task_vector_cache_only_when_there_is_room():
    sources = three_7b()
    cache = 2 * sources[1].numel * 4  # two non-base sources in float32
    p = plan(sources, limits=gpu(200), cache_task_vectors=True)
    assert p.tier == "resident" and p.cache_task_vectors and p.breakdown["task_vector_cache"] == cache
    without = plan(sources, limits=gpu(200))
    assert p.device_bytes == without.device_bytes + cache and not without.cache_task_vectors
    p = plan(sources, limits=gpu(100), cache_task_vectors=True)  # resident fits, the cache does not
    assert p.tier == "resident" and not p.cache_task_vectors and p.breakdown["task_vector_cache"] == 0
    assert any("no room for the 60.9 GB cache" in n for n in p.notes)
    p = plan(sources, method="linear", limits=gpu(200), cache_task_vectors=True)
    assert not p.cache_task_vectors and any("forms no task vectors" in n for n in p.notes)
    p = plan(sources, limits=gpu(60, 128), cache_task_vectors=True)
    assert p.tier == "streamed" and not p.cache_task_vectors


def test_stacking_counts_the_layers_it_can_have():
    src = [qwen7b("a"), qwen7b("b")]
    a = src[0]
    outside = a.nbytes - 28 * a.layer_nbytes  # embeddings, final norm, head
    p = plan(src, method="passthrough", base="a", stacking_layers=40, limits=gpu(None))
    assert p.tier == "resident"
    # resident: the layers are the sources' own tensors; only the scaled output projections are new
    assert abs(p.breakdown["candidate"] - 40 * a.layer_nbytes / 3) <= 1
    assert p.breakdown["workspace"] == (1 + 8) * CHUNK_ELEMENTS * 4
    assert any("assigns the sources' tensors" in n for n in p.notes)
    p = plan(src, method="passthrough", base="a", stacking_layers=40, limits=gpu(None), tier="streamed")
    assert p.breakdown["candidate"] == outside + 40 * a.layer_nbytes  # a full model of 40 layers
    assert p.breakdown["staging"] == 2 * 1 * SLICE_ABOVE  # one input per output tensor
    p = plan(src, method="passthrough", base="a", stacking_layers=40, limits=gpu(None),
             candidate_dtype="float32")
    assert p.breakdown["candidate"] == 2 * (outside + 40 * a.layer_nbytes)  # converted: every tensor is new


# ---- refusals ----------------------------------------------------------------------------
def test_the_refusal_names_the_numbers_and_the_fix():
    with pytest.raises(DoesNotFit) as info:
        plan(limits=gpu(24, 16), candidate_dtype="float32", evaluation=eval_facts(QWEN_CONFIG, 64, None))
    err = info.value
    assert isinstance(err, ValueError)
    assert err.msg.startswith("no memory tier fits a GPU worker with 24.0 GB of GPU memory and 16.0 GB of "
                              "host memory: resident needs")
    for tier in ("resident", "streamed", "mapped"):
        need = err.tiers[tier].device_bytes / GB
        assert f"{tier} needs {need:.1f} GB of GPU memory, 24.0 GB available" in err.msg
    # streamed: the pinned sources and the histograms
    assert "46.4 GB of host memory, 16.0 GB available" in err.msg
    assert "a bigger GPU" in err.fix and "worker.dtype: bfloat16" in err.fix
    assert "fewer or smaller sources" in err.fix and "evaluation.batch_size" in err.fix
    assert "EVOMERGE_WORKER_DEVICE_MEMORY / EVOMERGE_WORKER_HOST_MEMORY" in err.fix
    assert str(err) == f"{err.msg}. Fix: {err.fix}"


def test_a_cpu_refusal_names_host_memory_only():
    with pytest.raises(DoesNotFit) as info:
        plan(limits=cpu(8))
    assert "CPU worker with 8.0 GB of memory" in info.value.msg and "streamed" not in info.value.msg
    assert "EVOMERGE_WORKER_HOST_MEMORY" in info.value.fix
    assert "EVOMERGE_WORKER_DEVICE_MEMORY" not in info.value.fix
    assert "worker.dtype: bfloat16" not in info.value.fix  # the candidate is bf16 already


@pytest.mark.parametrize("kw, match", [
    (dict(method="frankenmerge"), "merge method"), (dict(tier="swap"), "tier"),
    (dict(base="elsewhere"), "not among the sources"), (dict(sources=[]), "at least one source"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        plan(**{"limits": gpu(None), **kw})


# ---- limits and the plan as JSON ---------------------------------------------------------
def test_limits():
    here = detect_local_limits("cpu")
    assert here.device == "cpu" and here.host_bytes and here.host_bytes > 0
    measured = detect_local_limits("cuda").device_bytes  # None without a GPU (or without torch imported)
    assert measured is None or measured > 0
    assert limits_from_settings(num_gpus=1).device_bytes is None  # unknown unless set
    assert limits_from_settings(num_gpus=1, device_memory=5, host_memory=7) == WorkerLimits("cuda", 5, 7)
    assert limits_from_settings(num_gpus=0, host_memory=7) == WorkerLimits("cpu", 7, 7)
    assert limits_from_settings(num_gpus=0, remote=True) == WorkerLimits("cpu", None, None)
    one = limits_from_settings(num_gpus=0).host_bytes
    two = limits_from_settings(num_gpus=0, workers_per_host=2).host_bytes
    assert one and two and abs(one // 2 - two) <= 1
    with pytest.raises(ValueError, match="device"):
        WorkerLimits("tpu", None, None)


def test_the_plan_is_json_and_reads_back():
    import json

    p = plan(limits=gpu(80, 128), evaluation=eval_facts(QWEN_CONFIG, 64, None))
    data = json.loads(json.dumps(p.model_dump(mode="json")))
    assert data["limits"] == {"device": "cuda", "device_bytes": 80 * GB, "host_bytes": 128 * GB}
    assert set(data["breakdown"]) == {"sources", "candidate", "workspace", "staging", "evaluation",
                                      "task_vector_cache", "magnitude_histograms"}
    assert set(data["tiers"]) == {"resident", "streamed", "mapped"}
    assert MemoryPlan.model_validate(data) == p


def test_the_planner_imports_no_torch():
    code = "import sys, workers.memory_plan; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# ---- the contract with the merge engine --------------------------------------------------
def test_the_planner_sizes_each_method_by_its_declaration():
    """The planner reads each method's declaration (search_spaces.merge_methods), which the
    engine reads too: a ``chunked`` method's workspace is a few chunks, the others' a few
    float32 copies of the largest tensor; magnitude histograms only for ``trims_by_magnitude``;
    a task-vector cache only for ``forms_task_vectors``."""
    from search_spaces import merge_methods

    largest = 152064 * 3584
    for declared in merge_methods.declarations():
        sources = three_7b()[:2] if declared.max_models == 1 else three_7b()
        p = plan(sources, method=declared.name, limits=gpu(None), cache_task_vectors=True)
        workspace = p.breakdown["workspace"]
        if declared.chunked:
            assert workspace < largest * 4, declared.name
        else:
            assert workspace >= 2 * largest * 4, declared.name
        assert (p.breakdown["magnitude_histograms"] > 0) == declared.trims_by_magnitude, declared.name
        assert (p.breakdown["task_vector_cache"] > 0) == declared.forms_task_vectors, declared.name


def test_histogram_limits_are_the_sparsifiers():
    """The planner (torch-free) counts magnitude histograms with the sparsifier's limits."""
    from workers.sparsify import SAMPLE_SIZE, MagnitudeHistogram

    assert HISTOGRAM_MIN_ELEMENTS == 4 * SAMPLE_SIZE
    assert HISTOGRAM_MAX_BYTES == MagnitudeHistogram.MAX_OCCUPIED * 20 + MagnitudeHistogram.MAX_REFINED * 8
