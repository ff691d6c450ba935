"""`evomerge merge` end to end on tiny models of several architectures: the output
loads with transformers and generates; stacking renumbers layers and applies scales;
bad input gets a message that says what is wrong."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from search_spaces.recipe import Recipe
from service.cli import main as cli
from workers.merge import merge
from workers.methods.base import MergeError
from workers.model_io import LazyModel, ModelNotFoundError

ARCHS = ["llama", "qwen2", "gemma2", "phi3", "gpt2", "mistral"]

METHOD_PARAMS = {
    "linear": ({"weight": 0.6}, {}),
    "task_arithmetic": ({"weight": 0.8}, {}),
    "ties": ({"weight": 1.0, "density": 0.4}, {}),
    "dare_ties": ({"weight": 1.0, "density": 0.5}, {}),
    "dare_linear": ({"weight": 0.7, "density": 0.5}, {}),
    "breadcrumbs": ({"weight": 1.0, "density": 0.6, "gamma": 0.05}, {}),
    "breadcrumbs_ties": ({"weight": 1.0, "density": 0.6, "gamma": 0.05}, {}),
    "della": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
    "della_linear": ({"weight": 1.0, "density": 0.5, "epsilon": 0.1}, {}),
    "slerp": ({}, {"t": [0.2, 0.8]}),
    "model_stock": ({}, {}),
    "nuslerp": ({"weight": 0.5}, {}),
    "multislerp": ({"weight": 0.5}, {}),
    "karcher": ({}, {}),
}


def ps_recipe(method: str, base: Path, experts: list[Path], **extra) -> dict:
    per_model, global_params = METHOD_PARAMS[method]
    used = experts[:1] if method == "slerp" else experts
    models = [{"model": str(e), "parameters": dict(per_model)} for e in used]
    if method == "linear":
        models.append({"model": str(base), "parameters": {"weight": 0.4}})
    return {"merge_method": method, "base_model": str(base), "models": models,
            "parameters": dict(global_params), **extra}


def load(path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def generates(path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(path))
    model = load(path)
    ids = tok("12+3=", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4


def logits(path_or_model, ids=None) -> torch.Tensor:
    model = load(path_or_model) if isinstance(path_or_model, Path) else path_or_model
    ids = ids if ids is not None else torch.tensor([[1, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_ties_merge_of_each_architecture_loads_and_generates(family, tmp_path, arch):
    base, experts = family(arch)
    recipe = Recipe.from_dict(ps_recipe("ties", base, experts))
    merge(recipe, tmp_path / "out")
    generates(tmp_path / "out")
    merged = LazyModel(str(tmp_path / "out"))
    source = LazyModel(str(base))
    assert set(merged.tensors) == set(source.tensors)


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_method_on_tied_llama_and_biased_qwen2(family, tmp_path, method, arch):
    base, experts = family(arch)
    recipe = Recipe.from_dict(ps_recipe(method, base, experts, seed=7))
    merge(recipe, tmp_path / "out")
    out = logits(tmp_path / "out")
    assert torch.isfinite(out).all()
    # the merge changed something relative to the base, but stays close to it
    diff = (out - logits(base)).abs().max().item()
    assert 0 < diff < 10


def test_qwen2_biases_are_merged(family, tmp_path):
    base, experts = family("qwen2")
    merge(Recipe.from_dict(ps_recipe("task_arithmetic", base, experts)), tmp_path / "out")
    name = "model.layers.0.self_attn.q_proj.bias"
    b, e0, e1 = (LazyModel(str(p)).get(name) for p in (base, *experts))
    got = LazyModel(str(tmp_path / "out")).get(name)
    assert torch.allclose(got, b + 0.8 * (e0 - b) + 0.8 * (e1 - b), atol=1e-6)


def test_tied_embeddings_stay_tied(family, tmp_path):
    base, experts = family("llama")
    merge(Recipe.from_dict(ps_recipe("ties", base, experts)), tmp_path / "out")
    merged = LazyModel(str(tmp_path / "out"))
    assert "lm_head.weight" not in merged.tensors
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"]


def test_random_methods_are_deterministic_given_the_seed(family, tmp_path):
    base, experts = family("llama")
    for i, seed in enumerate([3, 3, 4]):
        merge(Recipe.from_dict(ps_recipe("dare_ties", base, experts, seed=seed)), tmp_path / f"o{i}")
    a, b, c = (LazyModel(str(tmp_path / f"o{i}")) for i in range(3))
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(a.get(name), b.get(name))
    assert not torch.equal(a.get(name), c.get(name))


def test_sharded_output_with_index_and_dtype(family, tmp_path):
    base, experts = family("llama")
    recipe = Recipe.from_dict(ps_recipe("ties", base, experts, out_dtype="bfloat16"))
    merge(recipe, tmp_path / "out", shard_size="20KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    merged = LazyModel(str(tmp_path / "out"))
    assert all(i.dtype == torch.bfloat16 for i in merged.tensors.values())
    generates(tmp_path / "out")


def test_reads_sharded_safetensors_and_pytorch_bin(tmp_path):
    from workers.synthetic import make_model

    base = make_model("llama", tmp_path / "base", seed=1, shard_size="30KB")
    assert (base / "model.safetensors.index.json").exists()
    bin_model = make_model("llama", tmp_path / "bin", seed=2, base=base, safe=False)
    assert (bin_model / "pytorch_model.bin").exists()
    recipe = Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": str(bin_model), "parameters": {"weight": 1.0}}],
    })
    merge(recipe, tmp_path / "out")
    # weight 1 task arithmetic reproduces the expert exactly
    assert torch.allclose(logits(tmp_path / "out"), logits(bin_model), atol=1e-5)


# ---- layer stacking ----------------------------------------------------------------
def test_passthrough_stacks_renumbers_and_scales(family, tmp_path):
    _, experts = family("llama")
    recipe = Recipe.from_dict({
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(experts[0]), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(experts[1]), "layer_range": [1, 2], "scale": 0.5}]},
        ],
    })
    merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    out = LazyModel(str(tmp_path / "out"))
    e1 = LazyModel(str(experts[1]))
    assert torch.equal(out.get("model.layers.2.self_attn.o_proj.weight"),
                       e1.get("model.layers.1.self_attn.o_proj.weight") * 0.5)
    assert torch.equal(out.get("model.layers.2.self_attn.q_proj.weight"),
                       e1.get("model.layers.1.self_attn.q_proj.weight"))
    generates(tmp_path / "out")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2", "phi3"])
def test_residual_scale_zero_makes_layers_identity(family, tmp_path, arch):
    """With scale 0 every layer adds nothing to the residual stream, so the model's
    hidden state after the layers equals the embeddings: checked against the layers
    of a stack of zero depth computed by hand."""
    base, _ = family(arch)
    n = LazyModel(str(base)).config.get("num_hidden_layers") or LazyModel(str(base)).config["n_layer"]
    recipe = Recipe.from_dict({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, n], "scale": 0.0}]}],
    })
    merge(recipe, tmp_path / "out")
    model = load(tmp_path / "out")
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output; each layer must leave it unchanged
    for h in hidden[1:-1]:
        assert torch.allclose(h, hidden[0], atol=1e-5)


def test_passthrough_base_model_owns_embeddings_and_head(family, tmp_path):
    base, experts = family("qwen2")
    recipe = Recipe.from_dict({
        "merge_method": "passthrough", "base_model": str(base),
        "slices": [{"sources": [{"model": str(experts[0]), "layer_range": [0, 2]}]}],
    })
    merge(recipe, tmp_path / "out")
    out, b = LazyModel(str(tmp_path / "out")), LazyModel(str(base))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(out.get(name), b.get(name))


# ---- errors --------------------------------------------------------------------------
def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_cli_merge_and_errors(family, tmp_path, capsys):
    base, experts = family("llama")
    good = ps_recipe("ties", base, experts)
    assert cli(["merge", str(write(tmp_path, good)), str(tmp_path / "out"), "-q"]) == 0
    assert "wrote" in capsys.readouterr().out

    cases = [
        ({**good, "merge_method": "tie"}, "Did you mean ties"),
        ({**good, "base_model": str(tmp_path / "nope")}, "not found"),
        ({**good, "models": [{"model": str(experts[0]), "parameters": {"weight": 1, "density": 1.5}}]},
         "density.*above the maximum 1.0"),
        ({**good, "models": [{"model": str(experts[0]), "parameters": {"density": 0.5}}]},
         "parameter 'weight' is missing for model"),
        ({**good, "parameters": {"densty": 0.5}}, "did you mean density"),
        ({**good, "parameters": {"normalize": "yes"}}, "expected true/false"),
    ]
    for data, message in cases:
        code = cli(["merge", str(write(tmp_path, data)), str(tmp_path / "bad"), "-q"])
        err = capsys.readouterr().err
        assert code != 0 and __import__("re").search(message, err), (message, err)
        assert not (tmp_path / "bad").exists()


def test_mis_shaped_and_missing_tensors(family, tmp_path):
    base, experts = family("llama")
    other, _ = family("qwen2")
    with pytest.raises(MergeError, match=r"has no tensor|shapes differ|different layer"):
        merge(Recipe.from_dict(ps_recipe("ties", base, [experts[0], other])), tmp_path / "o")
    from workers.synthetic import make_model

    wide = make_model("llama", tmp_path / "wide", hidden=48)
    with pytest.raises(MergeError, match="shapes differ"):
        merge(Recipe.from_dict(ps_recipe("ties", base, [experts[0], wide])), tmp_path / "o")


def test_nan_in_a_source_is_refused_naming_model_and_tensor(family, tmp_path):
    from safetensors.torch import load_file, save_file

    base, experts = family("llama")
    bad = tmp_path / "nan"
    import shutil

    shutil.copytree(experts[0], bad)
    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"nan'?, tensor model.layers.1.mlp.up_proj.weight: contains NaN"):
        merge(Recipe.from_dict(ps_recipe("ties", base, [bad, experts[1]])), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_model_not_found_names_the_reference(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not found"):
        LazyModel(str(tmp_path / "missing"))


def test_hub_ids_resolve_through_huggingface_hub(family, tmp_path, monkeypatch):
    """A hub id is resolved by huggingface_hub (here from its cache, offline); an
    unknown one fails with a message that says what to do."""
    import shutil

    base, experts = family("llama")
    cache = tmp_path / "hub"
    snap = cache / "models--tiny-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(experts[0], snap)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    recipe = Recipe.from_dict({
        "merge_method": "task_arithmetic", "base_model": str(base),
        "models": [{"model": "tiny-org/tiny-llama", "parameters": {"weight": 1.0}}],
    })
    merge(recipe, tmp_path / "out")
    assert torch.allclose(logits(tmp_path / "out"), logits(experts[0]), atol=1e-5)
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor downloadable"):
        LazyModel("some-org/some-model")


def test_console_script_shows_progress(family, tmp_path):
    base, experts = family("llama")
    exe = Path(sys.executable).parent / "evomerge"
    proc = subprocess.run([str(exe), "merge", str(write(tmp_path, ps_recipe("ties", base, experts))),
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "merging" in proc.stderr and "100%" in proc.stderr


def test_stacking_patches_per_layer_config_lists(family, tmp_path):
    base, _ = family("qwen2")
    recipe = Recipe.from_dict({
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(base), "layer_range": [0, 2]}]}],
    })
    merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    if "layer_types" in config:
        assert len(config["layer_types"]) == 4
    generates(tmp_path / "out")
