"""Decoded recipes run through the real merge engine: every tensor gets the gene value
its label names, `evomerge merge` builds PS and DFS candidates that load, and a PS
study's model feeds a DFS space by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from search_spaces.recipe import Recipe
from search_spaces.registry import build_space
from search_spaces.sources import resolve_sources, study_refs
from service.cli import main as cli
from workers.architecture import category
from workers.model_io import LazyModel
from workers.plan import build_plan
from workers.synthetic import read_config

# the stacking space before the segments encoding became its default: an include bit and a
# scale per slot (what these tests exercise)
DFS0 = {"encoding": "threshold", "scales": {"search": True}}


def distinct_point(space) -> dict[str, float]:
    """Every gene a different value, so a value tells which gene it came from."""
    n = space.dimension
    return space.genes.denormalize([0.05 + 0.9 * i / max(1, n - 1) for i in range(n)])


def evomerge_merge(recipe: Recipe, tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    assert cli(["merge", str(path), str(tmp / name), "-q"]) == 0
    return tmp / name


def load_and_run(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([[1, 5, 6, 7, 8]])).logits
    assert torch.isfinite(out).all()
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_tensor_takes_the_gene_its_label_names(family, arch):
    base, experts = family(arch)
    layers = read_config(Path(base))["num_hidden_layers" if arch == "llama" else "n_layer"]
    space = build_space({
        "kind": "parameter", "method": "ties", "base_model": str(base),
        "models": [str(e) for e in experts], "num_layers": layers, "granularity": 1,
        "module_filters": ["attention", "mlp"],
    })
    values = space.genes.values(distinct_point(space))
    plan = build_plan(space.decode(distinct_point(space)))
    letters = {str(e): "AB"[i] for i, e in enumerate(experts)}
    checked = 0
    for task in plan.tasks:
        for src, params in zip(task.inputs, task.model_params):
            m = letters[src.model]
            if task.layer is None:  # embeddings, final norm, head
                scope = "emb"
            else:
                cat = category(task.name)
                group = f"L{task.layer}"
                scope = f"{group}.{cat}" if cat in ("attention", "mlp") else group
            for param in ("weight", "density"):
                assert params[param] == values[f"{m}.{scope}.{param}"], (task.name, param)
                checked += 1
    final_norms = [t for t in plan.tasks if t.layer is None and category(t.name) == "norms"]
    assert final_norms, "the final norm is planned"
    assert checked > 20


def test_decoded_ps_recipe_merges_with_evomerge_merge_and_loads(family, tmp_path):
    base, experts = family("llama")
    space = build_space({
        "kind": "parameter", "method": "dare_ties", "base_model": str(base),
        "models": [str(e) for e in experts], "num_layers": 2, "granularity": 1,
        "module_filters": ["attention", "mlp"], "merge_seed": 3,
    })
    recipe = space.decode(distinct_point(space))
    out = evomerge_merge(recipe, tmp_path, "ps")
    load_and_run(out)
    written = Recipe.from_dict(yaml.safe_load((out / "evomerge_recipe.yaml").read_text()))
    assert written.model_dump() == recipe.model_dump()


def test_decoded_dfs_recipe_merges_and_loads_with_its_depth_and_scales(family, tmp_path):
    base, experts = family("llama")
    space = build_space({
        "kind": "stacking", **DFS0, "repeats": 2, "min_depth": 3, "max_depth": 5, "base_model": str(base),
        "sources": [{"model": str(experts[0]), "num_layers": 2}, {"model": str(experts[1]), "num_layers": 2}],
    })
    point = distinct_point(space)
    recipe = space.decode(point)
    chosen = space.chosen_slots(space.genes.values(point))
    out = evomerge_merge(recipe, tmp_path, "dfs")
    load_and_run(out)
    assert read_config(out)["num_hidden_layers"] == len(chosen)
    merged = LazyModel(str(out))
    slots = space.slots()
    for i, k in enumerate(chosen):  # output layer i is slot k, scaled by its gene
        src = LazyModel(str(experts[slots[k].source]))
        name = "self_attn.o_proj.weight"
        scale = space.genes.values(point)[space.gene_name(k, "scale")]
        want = src.get(f"model.layers.{slots[k].layer}.{name}") * scale
        assert torch.allclose(merged.get(f"model.layers.{i}.{name}"), want, atol=1e-6)
        assert torch.equal(merged.get(f"model.layers.{i}.mlp.up_proj.weight"),
                           src.get(f"model.layers.{slots[k].layer}.mlp.up_proj.weight"))
    embed = "model.embed_tokens.weight"
    assert torch.equal(merged.get(embed), LazyModel(str(base)).get(embed))


def test_ps_then_dfs_chains_through_a_study_reference(family, tmp_path):
    base, experts = family("llama")
    ps = build_space({"kind": "parameter", "method": "task_arithmetic", "base_model": str(base),
                      "models": [str(e) for e in experts], "num_layers": 2})
    ps_model = evomerge_merge(ps.decode(ps.center()), tmp_path, "ps-best")  # the PS study's best
    dfs = build_space({
        "kind": "stacking", **DFS0, "repeats": 1,
        "sources": [{"model": {"study": "ps-1", "trial": "best"}, "num_layers": 2},
                    {"model": str(experts[1]), "num_layers": 2}],
    })
    recipe = dfs.decode({**dfs.center(), **{f"s{k}.include": 0.9 for k in range(4)}})
    assert [r.placeholder() for r in study_refs(recipe)] == ["study:ps-1/best"]
    ready = resolve_sources(recipe, {"study:ps-1/best": str(ps_model)})
    out = evomerge_merge(ready, tmp_path, "dfs-on-ps")
    load_and_run(out)
    assert read_config(out)["num_hidden_layers"] == 4
    assert torch.equal(LazyModel(str(out)).get("model.embed_tokens.weight"),
                       LazyModel(str(ps_model)).get("model.embed_tokens.weight"))
