"""PEFT LoRA adapters as sources (issue 18, part 2).

Tiny adapters are made here with ``peft`` on the tiny families of ``conftest.family``, and
peft's own ``merge_and_unload`` writes the full model each one stands for. A merge over the
adapters must equal the same merge over those full models (task_arithmetic and TIES, in
``evomerge merge`` and in the in-memory candidates of every memory tier); validation refuses
bad adapters with a 422 that says why; a study over two adapters runs through the service,
exports and downloads the merged full model.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from search_spaces.recipe import Recipe
from tests import api_fixtures as fx
from workers.model_io import LazyModel

api, db_url, llama = fx.api, fx.db_url, fx.llama  # fixtures


# ---- adapters made with peft ----------------------------------------------------------------------
def make_adapter(base: Path, out: Path, seed: int, *, tweak: bool = False, **config) -> Path:
    """A trained-looking adapter (random A and B) saved by peft, and beside it (``<out>-merged``)
    the full model peft's merge_and_unload makes of it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                           LoraConfig(init_lora_weights=False, **config))
    if tweak:  # trained biases and modules_to_save: change them as training would
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad and "lora_" not in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(out))
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(out))
    full.merge_and_unload().save_pretrained(str(merged_of(out)))
    return out


def merged_of(adapter: Path) -> Path:
    return adapter.parent / f"{adapter.name}-merged"


@pytest.fixture(scope="module")
def loras(family, model_root):
    """``loras(arch)`` -> (base, [two adapters]) over the tiny ``arch`` base: plain LoRA on
    attention and MLP; rsLoRA with per-module rank and alpha; for qwen2 (biases, untied head)
    also trained biases (bias='lora_only') and a head in modules_to_save."""
    made: dict[str, tuple[Path, list[Path]]] = {}

    def get(arch: str):
        if arch not in made:
            base, _ = family(arch)
            root = model_root / f"lora-{arch}"
            if arch == "gpt2":  # Conv1D weights: peft's fan_in_fan_out
                conv = {"fan_in_fan_out": True}
                a1 = make_adapter(base, root / "adapter-1", 1, r=4, lora_alpha=8, target_modules=["c_attn"],
                                  **conv)
                a2 = make_adapter(base, root / "adapter-2", 2, r=2, lora_alpha=5,
                                  target_modules=["c_proj", "c_fc"], **conv)
                made[arch] = (base, [a1, a2])
                return made[arch]
            extra = {"bias": "lora_only", "modules_to_save": ["lm_head"]} if arch == "qwen2" else {}
            a1 = make_adapter(base, root / "adapter-1", 1, r=4, lora_alpha=8,
                              target_modules=["q_proj", "v_proj", "up_proj"], tweak=bool(extra), **extra)
            a2 = make_adapter(base, root / "adapter-2", 2, r=8, lora_alpha=4, use_rslora=True,
                              target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
                              rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.o_proj": 3})
            made[arch] = (base, [a1, a2])
        return made[arch]

    return get


def recipe(method: str, base: Path, a: Path, b: Path) -> Recipe:
    extra = {"density": 0.6} if method == "ties" else {}
    return Recipe.model_validate({
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": 0.7, **extra}},
                   {"model": str(b), "parameters": {"weight": [0.3, 0.9], **extra}}]})


def assert_equal_models(ours: Path, theirs: Path) -> None:
    a, b = LazyModel(str(ours)), LazyModel(str(theirs))
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        assert torch.equal(a.get(name), b.get(name)), name


# ---- the weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_an_adapter_reads_as_the_model_merge_and_unload_makes(loras, arch):
    from workers.lora import AdapterModel

    base, adapters = loras(arch)
    full_base = LazyModel(str(base))
    for adapter in adapters:
        model, merged = AdapterModel(str(adapter), full_base), LazyModel(str(merged_of(adapter)))
        assert model.adapter.pairs and set(model.tensors) == set(full_base.tensors)
        changed = [n for n in model.tensors if model.changes(n)]
        assert changed and len(changed) < len(model.tensors)
        for name in merged.tensors:
            assert torch.equal(model.get(name), merged.get(name)), name
    if arch == "qwen2":  # trained biases and the saved head replace the base's
        replaced = AdapterModel(str(adapters[0]), full_base).adapter.replaced
        assert "lm_head.weight" in replaced and any(n.endswith("q_proj.bias") for n in replaced)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_a_merge_over_two_adapters_equals_the_merge_over_their_merged_models(loras, arch, method, tmp_path):
    from service.cli import main

    base, (a1, a2) = loras(arch)
    ours = recipe(method, base, a1, a2)
    (tmp_path / "recipe.yaml").write_text(ours.to_yaml())
    assert main(["merge", str(tmp_path / "recipe.yaml"), str(tmp_path / "lora")]) == 0  # evomerge merge
    from workers.merge import merge

    merge(recipe(method, base, merged_of(a1), merged_of(a2)), tmp_path / "full")
    assert_equal_models(tmp_path / "lora", tmp_path / "full")


@pytest.mark.parametrize("tier", ["resident", "mapped"])
def test_candidates_over_adapters_equal_the_written_merge_in_every_tier(loras, tier, tmp_path):
    from workers.candidate import CandidateBuilder
    from workers.merge import merge

    base, (a1, a2) = loras("qwen2")
    rec = recipe("ties", base, a1, a2)
    merge(recipe("ties", base, merged_of(a1), merged_of(a2)), tmp_path / "full")
    builder = CandidateBuilder([str(base), str(a1), str(a2)], base=str(base), tier=tier,
                               cache_task_vectors=tier == "resident")
    model = builder.build(rec)
    written = LazyModel(str(tmp_path / "full"))
    for name, p in model.named_parameters():
        assert torch.equal(p, written.get(name)), name
    held = builder.memory_bytes()
    adapters = sum((a / "adapter_model.safetensors").stat().st_size for a in (a1, a2))
    if tier == "resident":  # the base and the adapters at their own size, not three models
        base_bytes = sum(i.nbytes for i in LazyModel(str(base)).tensors.values())
        assert base_bytes < held["sources_host"] < base_bytes + adapters
    assert builder.build(rec) is model  # a second candidate reuses everything


def test_the_engine_refuses_an_adapter_without_a_base_or_as_the_base(loras, tmp_path):
    from workers.merge import merge
    from workers.methods.base import MergeError

    base, (a1, a2) = loras("llama")
    no_base = Recipe.model_validate({"merge_method": "linear",
                                     "models": [{"model": str(a1), "parameters": {"weight": 1.0}},
                                                {"model": str(a2), "parameters": {"weight": 1.0}}]})
    with pytest.raises(MergeError, match="LoRA adapter: name the model it was trained on"):
        merge(no_base, tmp_path / "x")
    with pytest.raises(MergeError, match="LoRA adapter"):
        merge(recipe("task_arithmetic", a1, base, a2), tmp_path / "y")


def test_lora_variants_and_odd_tensors_are_refused_from_the_headers():
    from search_spaces.lora_adapter import AdapterError, parse_adapter

    lora = {"m.q.lora_A.weight": ([4, 8], "F32"), "m.q.lora_B.weight": ([8, 4], "F32")}
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    assert parse_adapter("ok", config, lora).pairs["m.q.weight"].scale == 2.0
    assert parse_adapter("ok", {**config, "use_rslora": True}, lora).pairs["m.q.weight"].scale == 4.0
    refused = {
        "IA3 adapter": ({**config, "peft_type": "IA3"}, lora, "adapter_unsupported"),
        "DoRA": ({**config, "use_dora": True}, lora, "adapter_unsupported"),
        "aLoRA": ({**config, "alora_invocation_tokens": [1, 2]}, lora, "adapter_unsupported"),
        "regex pattern": ({**config, "rank_pattern": {"(a+)+$": 2}}, lora, "adapter_unsupported"),
        "embedding": (config, {"m.e.lora_embedding_A": ([4, 70], "F32")}, "adapter_unsupported"),
        "magnitude": (config, {**lora, "m.q.lora_magnitude_vector": ([8], "F32")}, "adapter_unsupported"),
        "conv": (config, {"m.c.lora_A.weight": ([4, 8, 1, 1], "F32"), "m.c.lora_B.weight": ([8, 4, 1, 1],
                                                                                             "F32")},
                 "adapter_unsupported"),
        "no lora_B": (config, {"m.q.lora_A.weight": ([4, 8], "F32")}, "adapter_invalid"),
        "integers": (config, {**lora, "m.q.lora_A.weight": ([4, 8], "I32")}, "adapter_unsupported"),
        "empty": (config, {}, "adapter_invalid"),
        "rank 0": ({**config, "r": 0}, lora, "adapter_invalid"),
        "alpha as text": ({**config, "lora_alpha": "8"}, lora, "adapter_invalid"),
    }
    for case, (cfg, tensors, kind) in refused.items():
        with pytest.raises(AdapterError) as err:
            parse_adapter("bad", cfg, tensors)
        assert err.value.kind == kind and err.value.fix, case
        assert "(a+)+" not in err.value.msg  # a file's odd values are not quoted


# ---- validation -----------------------------------------------------------------------------------
def spec(base: Path, sources: list[Path], **changes) -> dict:
    data = fx.spec_data((base, sources), space={"kind": "parameter", "method": "ties", "granularity": 2})
    data.update(changes)
    return data


def test_a_study_over_adapters_is_valid_and_planned_at_adapter_size(loras, model_root):
    from types import SimpleNamespace

    from service.validation import validate_study

    settings = SimpleNamespace(model_roots=[model_root], hub_allowlist=[], trust_remote_code=False)
    base, (a1, a2) = loras("llama")
    study = validate_study(spec(base, [a1, a2]), settings)
    adapters = [m for m in study.models if m.adapter_of is not None]
    assert [m.ref for m in adapters] == [str(a1.resolve()), str(a2.resolve())]
    assert all(m.adapter_of == str(base.resolve()) for m in adapters)
    sources = study.memory_plan["breakdown"]["sources"]
    base_bytes = sum(i.nbytes for i in LazyModel(str(base)).tensors.values())
    own = sum(os.path.getsize(a / "adapter_model.safetensors") for a in (a1, a2))
    assert base_bytes < sources < base_bytes + own
    assert study.worker_spec["sources"][0] == str(base.resolve())
    from workers.trial import WorkerSpec, worker_plan

    plan = worker_plan(WorkerSpec.model_validate(study.worker_spec))  # the worker plans the same sizes
    assert plan.breakdown["sources"] == sources


def copy_adapter(src: Path, dst: Path) -> Path:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def bad_adapters(loras, root: Path) -> dict[str, tuple[Path, str, str]]:
    """case -> (adapter folder, problem type, words of the message)"""
    base, (a1, _) = loras("llama")
    out: dict[str, tuple[Path, str, str]] = {}
    folder = copy_adapter(a1, root / "wrong-name")
    edit_config(folder, base_model_name_or_path="someone/another-model")
    out["wrong base (name)"] = (folder, "adapter_base_mismatch", "was trained on 'someone/another-model'")
    from workers.synthetic import make_model  # a wider Llama: the same tensor names, other shapes

    other = root / "llama-wide"
    if not other.exists():
        make_model("llama", other, hidden=48)
    folder = make_adapter(other, root / "wrong-shapes", 3, r=4, lora_alpha=8, target_modules=["q_proj"])
    edit_config(folder, base_model_name_or_path=str(base))
    out["wrong base (shapes)"] = (folder, "adapter_shape_mismatch", "the base's weight is [32, 32]")
    folder = copy_adapter(a1, root / "no-weights")
    (folder / "adapter_model.safetensors").unlink()
    out["missing weights file"] = (folder, "adapter_no_weights", "has no adapter_model.safetensors")
    folder = copy_adapter(a1, root / "dora")
    edit_config(folder, use_dora=True)
    out["DoRA"] = (folder, "adapter_unsupported", "DoRA")
    folder = copy_adapter(a1, root / "no-alpha")
    edit_config(folder, lora_alpha=None)
    out["no lora_alpha"] = (folder, "adapter_invalid", "no numeric lora_alpha")
    folder = copy_adapter(a1, root / "wrong-rank")
    edit_config(folder, r=16)
    out["rank"] = (folder, "adapter_rank_mismatch", "rank 4")
    folder = copy_adapter(a1, root / "other-targets")
    edit_config(folder, target_modules=["c_attn"])
    out["target modules"] = (folder, "adapter_base_mismatch", "none of its target_modules")
    folder = copy_adapter(a1, root / "broken-config")
    (folder / "adapter_config.json").write_text("{not json: ")
    out["broken config"] = (folder, "adapter_invalid", "not a valid JSON object")
    return out


def problems(r) -> dict:
    assert r.status_code == 422, r.text
    return {tuple(p["loc"]): p for p in r.json()["detail"]}


def test_bad_adapters_get_422_with_the_reason(api, loras, model_root):
    base, (a1, a2) = loras("llama")
    for case, (folder, kind, words) in bad_adapters(loras, model_root / "bad-adapters").items():
        found = problems(api.post("/studies", json=spec(base, [a1, folder])))
        assert set(found) == {("sources", 1)}, (case, found)
        problem = found[("sources", 1)]
        assert problem["type"] == kind and words in problem["msg"], (case, problem)
        assert problem["fix"], case
    # an adapter as the base, an adapter without a base, an adapter in a stacking study
    found = problems(api.post("/studies", json=spec(a1, [a2, base])))
    assert found[("base_model",)]["type"] == "model_is_adapter"
    data = spec(base, [a1, a2])
    data.pop("base_model")
    found = problems(api.post("/studies", json=data))
    assert found[("sources", 0)]["type"] == "adapter_needs_base"
    found = problems(api.post("/studies", json=spec(base, [a1, a2], space={"kind": "stacking"})))
    stacking = found[("sources", 0)]
    assert stacking["type"] == "adapter_unsupported" and "stacking" in stacking["msg"]


def test_adapter_files_outside_the_roots_are_refused_unread(api, loras, model_root, tmp_path):
    base, (a1, _) = loras("llama")
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"do not read")
    folder = copy_adapter(a1, model_root / "bad-adapters" / "link-out")
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.safetensors").symlink_to(outside)
    problem = problems(api.post("/studies", json=spec(base, [a1, folder])))[("sources", 1)]
    assert problem["type"] == "path_outside_roots" and "do not read" not in json.dumps(problem)


# ---- mergekit ---------------------------------------------------------------------------------------
def test_mergekit_yaml_names_an_adapter_over_its_base_and_mergekit_agrees(loras, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from search_spaces.mergekit_format import to_mergekit_dict
    from tests.test_mergekit_parity import assert_same_weights
    from workers.merge import merge

    base, (a1, a2) = loras("qwen2")
    rec = recipe("task_arithmetic", base, a1, a2)
    config = to_mergekit_dict(rec)
    assert [m["model"] for m in config["models"]] == [f"{base}+{a1}", f"{base}+{a2}"]
    merge(rec, tmp_path / "ours")
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "theirs"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                   lora_merge_cache=str(tmp_path / "cache")))
    assert_same_weights(tmp_path / "ours", tmp_path / "theirs")
    merge(Recipe.model_validate(config), tmp_path / "round-trip")  # evomerge reads base+adapter too
    assert_equal_models(tmp_path / "round-trip", tmp_path / "ours")


def test_the_memory_plan_counts_an_adapter_at_its_size_plus_what_it_composes():
    from workers.memory_facts import SourceFacts, adapter_facts
    from workers.memory_plan import CHUNK_ELEMENTS, WorkerLimits, plan_memory

    base = SourceFacts(ref="base", nbytes=2 * 10**9, numel=10**9, largest_numel=10**8, dtype="bfloat16",
                       layer_nbytes=10**7, num_layers=4)
    full = SourceFacts(**{**base.__dict__, "ref": "full"})
    lora = adapter_facts("lora", [("a.lora_A.weight", [16, 4096], "BF16"), ("a.lora_B.weight", [4096, 16],
                                                                               "BF16")], base, 4096 * 4096)
    assert lora.nbytes == 2 * 16 * 4096 * 2 and lora.numel == base.numel and lora.dtype == "bfloat16"
    limits = WorkerLimits(device="cpu", device_bytes=None, host_bytes=10**12)

    def plan(sources):
        return plan_memory(sources=[base, *sources], base="base", method="ties", stacking_layers=None,
                           limits=limits, cache_task_vectors=True)

    with_full, with_lora = plan([full]), plan([lora])
    assert with_lora.breakdown["sources"] == base.nbytes + lora.nbytes
    assert with_full.breakdown["sources"] == 2 * base.nbytes
    composing = with_lora.breakdown["workspace"] - with_full.breakdown["workspace"]
    assert composing == 4096 * 4096 * 2 + 2 * CHUNK_ELEMENTS * 4
    assert with_lora.breakdown["task_vector_cache"] == with_full.breakdown["task_vector_cache"]  # full-size


# ---- through the service ----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_study_over_two_adapters_runs_exports_and_downloads(loras, tmp_path, model_root, ray_local,
                                                             monkeypatch, capsys):
    import hashlib

    from service.api.client import Client
    from service.app import create_app
    from service.cli import main
    from tests.test_export_e2e import wait_for
    from workers.merge import merge

    for var in ("EVOMERGE_URL", "EVOMERGE_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    base, (a1, a2) = loras("llama")
    settings = fx.make_settings(f"sqlite:///{tmp_path / 'l.db'}", tmp_path, model_root, max_workers=2,
                                lease_seconds=60)
    data = spec(base, [a1, a2], optimizer={"name": "optuna-cmaes", "population_size": 4},
                budget={"max_trials": 4}, parallelism=2)
    with fx.LiveServer(create_app(settings, poll_seconds=0.05)) as url, Client(url) as client:
        sid = client.submit(json.dumps(data).encode(), "application/json")["id"]
        wait_for(lambda: client.study(sid)["status"] in ("completed", "failed"))
        assert client.study(sid)["status"] == "completed", client.study(sid)
        trials = client.request("GET", f"/studies/{sid}/trials", params={"limit": 10})["items"]
        assert len(trials) == 4 and all(t["state"] == "complete" for t in trials)
        best = client.best(sid)
        baselines = client.request("GET", f"/studies/{sid}/baselines")  # each adapter alone, averaged, added
        assert len(baselines) == 5 and all(b["state"] == "complete" for b in baselines), baselines
        out = tmp_path / "downloaded"
        code = main(["download", sid, str(out), "--url", url, "-q"])
        assert code == 0, capsys.readouterr().err
    # the download is the merged full model: the best recipe over the merge_and_unload models
    rec = Recipe.model_validate(best["recipe"])
    full = {str(a.resolve()): str(merged_of(a).resolve()) for a in (a1, a2)}
    assert set(full) <= set(rec.referenced_models())
    merge(rec.with_models_renamed(lambda m: full.get(m, m)), tmp_path / "expected")
    assert_equal_models(out, tmp_path / "expected")
    card = (out / "README.md").read_text()
    for adapter in (a1, a2):
        digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert digest in card
    assert card.count("A PEFT LoRA adapter (r ") == 2
    mergekit = (out / "mergekit_config.yml").read_text()
    assert f"{base.resolve()}+{a1.resolve()}" in mergekit
