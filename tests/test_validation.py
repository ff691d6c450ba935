"""Validating a study before any compute: every refusal, and the demo study that passes.

Models are the tiny random families of ``conftest.family`` and header-only fakes written
here (a config.json and a safetensors file of zeros): validation reads headers only.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from search_spaces.sources import StudyRef
from service.spec import DEMO_EXAMPLE, Problem, StudySpec, StudyValidationError
from service.validation import ValidatedStudy, validate_study

REPO = Path(__file__).resolve().parents[1]
ZOO = {"task_dirs": ["evomerge:zoo"], "include_defaults": False}


@dataclass
class Settings:
    """A stand-in for service.settings.Settings (the attributes validation reads)."""

    model_roots: list[Path]
    hub_allowlist: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    hub_cache_dir: Path | None = None


# ---- header-only fake models -------------------------------------------------------------
def llama_tensors(layers: int = 2, hidden: int = 32, inter: int = 64, vocab: int = 70) -> dict:
    out = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": [hidden, hidden],
            p + "self_attn.k_proj.weight": [hidden // 2, hidden],
            p + "self_attn.v_proj.weight": [hidden // 2, hidden],
            p + "self_attn.o_proj.weight": [hidden, hidden],
            p + "mlp.gate_proj.weight": [inter, hidden], p + "mlp.up_proj.weight": [inter, hidden],
            p + "mlp.down_proj.weight": [hidden, inter],
            p + "input_layernorm.weight": [hidden], p + "post_attention_layernorm.weight": [hidden],
        })
    return out


def write_safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def fake_model(folder: Path, *, layers: int = 2, hidden: int = 32, inter: int = 64, model_type: str = "llama",
               config: dict | None = None, weights: bool = True, tokenizer: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": layers,
           "intermediate_size": inter, "tie_word_embeddings": True, **(config or {})}
    (folder / "config.json").write_text(json.dumps(cfg))
    if weights:
        write_safetensors(folder / "model.safetensors", llama_tensors(layers, hidden, inter))
    if tokenizer:
        (folder / "tokenizer_config.json").write_text("{}")
    return folder


# ---- fixtures ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake_roots")
    fake_model(root / "base")
    fake_model(root / "a")
    fake_model(root / "b")
    fake_model(root / "deep", layers=3)
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A model folder outside every root."""
    return fake_model(tmp_path_factory.mktemp("elsewhere") / "secret")


@pytest.fixture(scope="module")
def llama(family):
    return family("llama")


@pytest.fixture(scope="module")
def settings(model_root, fakes, llama) -> Settings:
    return Settings(model_roots=[model_root, fakes])


def demo_spec(llama, **changes) -> dict:
    """The demo study (per-layer TIES over two experts, optuna-cmaes, zoo_xl_add) on the tiny Llama."""
    base, (e0, e1) = llama
    data = copy.deepcopy(DEMO_EXAMPLE)
    data.update(sources=[str(e0), str(e1)], base_model=str(base))
    data["evaluation"]["options"] = dict(ZOO)
    data.update(changes)
    return data


def fake_spec(**changes) -> dict:
    data = copy.deepcopy(DEMO_EXAMPLE)
    data.update(sources=["a", "b"], base_model="base")
    data["evaluation"]["options"] = dict(ZOO)
    data.update(changes)
    return data


def refused(data, settings, **kw) -> list[Problem]:
    with pytest.raises(StudyValidationError) as info:
        validate_study(StudySpec.model_validate(data), settings, **kw)
    return info.value.problems


def at(problems: list[Problem], loc: list) -> Problem:
    found = [p for p in problems if p.loc == loc]
    assert found, f"no problem at {loc}: {[(p.loc, p.type, p.msg) for p in problems]}"
    return found[0]


# ---- the study that passes ---------------------------------------------------------------
def test_the_demo_study_validates_with_everything_derived(llama, settings):
    from workers.trial import WorkerSpec

    base, (e0, e1) = llama
    start = time.perf_counter()
    v = validate_study(StudySpec.model_validate(demo_spec(llama)), settings)
    assert time.perf_counter() - start < 10
    assert v.space_spec["num_layers"] == 2
    assert v.space_spec["models"] == [os.path.realpath(e0), os.path.realpath(e1)]
    assert v.space_spec["base_model"] == os.path.realpath(base)
    # per-layer TIES: (2 layers + embeddings) × 2 models × weight (the demo fixes density at 1)
    assert v.space["dimension"] == 8 and v.space["kind"] == "parameter"
    assert v.optimizer.seed == 0 and v.optimizer.directions == ["maximize"]
    assert v.evaluation.objectives[0].higher_is_better is True
    (held,) = v.heldout_evaluation.objectives
    assert held.task == "zoo_xl_add_heldout" and held.key == "zoo_xl_add/exact_match" and held.limit is None
    assert v.heldout_top_k == 3
    assert [m.origin for m in v.models] == ["local"] * 3 and v.models[0].model_type == "llama"
    worker = WorkerSpec.model_validate(v.worker_spec)
    assert worker.base_model == os.path.realpath(base) and worker.sources[0] == worker.base_model
    assert set(worker.sources) == {os.path.realpath(p) for p in (base, e0, e1)}
    recipe = v.build_space().decode(v.build_space().center())
    assert {m.model for m in recipe.models} <= set(worker.sources)
    assert ValidatedStudy.model_validate_json(v.model_dump_json()) == v  # storable as JSON


def test_paths_relative_to_a_root_and_a_start_recipe(fakes, settings):
    x0 = {"merge_method": "ties", "base_model": "base",
          "models": [{"model": "a", "parameters": {"weight": 0.3, "density": 0.5}},
                     {"model": "b", "parameters": {"weight": 0.6, "density": 0.5}}],
          "parameters": {"normalize": False}}  # as the space fixes it for a search of ties
    spec = fake_spec(optimizer={"name": "cma", "x0": x0},
                     space={"kind": "parameter", "method": "ties", "granularity": 1})  # densities searched
    v = validate_study(StudySpec.model_validate(spec), settings)
    assert v.space_spec["models"] == [str(fakes / "a"), str(fakes / "b")]
    assert v.optimizer.x0.base_model == str(fakes / "base")  # named as the space names it


def test_layer_stacking_allows_different_depths(fakes, settings):
    spec = fake_spec(sources=["a", "deep"], base_model=None,
                     space={"kind": "stacking", "repeats": 1, "layer_ranges": [None, [1, 3]],
                            "encoding": "threshold", "scales": {"search": True}})
    v = validate_study(StudySpec.model_validate(spec), settings)
    srcs = v.space_spec["sources"]
    assert [s["num_layers"] for s in srcs] == [2, 3] and srcs[1]["layer_range"] == [1, 3]
    assert v.space["dimension"] == 2 * 4  # 4 slots × (include, scale)
    assert v.worker_spec["base_model"] is None and v.worker_spec["tokenizer"] == str(fakes / "a")
    # a parameter space over the same models is refused
    problems = refused(fake_spec(sources=["a", "deep"]), settings)
    assert "model.layers.2" in at(problems, ["sources", 1]).msg


def test_a_multi_objective_study(llama, settings):
    spec = demo_spec(llama, multi_objective=True, optimizer={"name": "nsga2", "population_size": 8},
                     heldout=None)
    spec["evaluation"]["objectives"].append({"task": "zoo_en_add", "metric": "exact_match", "limit": 50})
    v = validate_study(StudySpec.model_validate(spec), settings)
    assert v.optimizer.directions == ["maximize", "maximize"] and v.worker_spec["multi_objective"] is True


# ---- models ------------------------------------------------------------------------------
def test_unknown_model_path_names_close_matches(settings):
    p = at(refused(fake_spec(sources=["a", "bb/x", "/nowhere/model"]), settings), ["sources", 1])
    assert p.type == "hub_not_allowed" and "not a folder under the model roots" in p.msg
    p = at(refused(fake_spec(sources=["a", "bas"]), settings), ["sources", 1])
    assert p.type == "model_not_found" and "Close matches: base" in p.msg
    p = at(refused(fake_spec(sources=["a", "/nowhere/model"]), settings), ["sources", 1])
    assert p.type == "path_outside_roots"


def test_paths_outside_the_roots_are_refused(settings, outside):
    p = at(refused(fake_spec(sources=["a", str(outside)]), settings), ["sources", 1])
    assert p.type == "path_outside_roots" and "is outside the allowed roots" in p.msg
    p = at(refused(fake_spec(base_model="../../etc"), settings), ["base_model"])
    assert p.type == "path_outside_roots"


def test_a_symlink_out_of_the_roots_is_refused(fakes, settings, outside):
    link = fakes / "link-out"
    if not link.exists():
        link.symlink_to(outside, target_is_directory=True)
    p = at(refused(fake_spec(sources=["a", "link-out"]), settings), ["sources", 1])
    assert p.type == "path_outside_roots" and "through a symlink" in p.msg and str(outside) not in p.msg
    # a weights file inside a model folder that links out
    folder = fakes / "file-link"
    if not folder.exists():
        fake_model(folder, weights=False)
        (folder / "model.safetensors").symlink_to(outside / "model.safetensors")
    p = at(refused(fake_spec(sources=["a", "file-link"]), settings), ["sources", 1])
    assert p.type == "path_outside_roots" and "model.safetensors" in p.msg
    # a link inside the roots is fine
    inner = fakes / "link-in"
    if not inner.exists():
        inner.symlink_to(fakes / "b", target_is_directory=True)
    v = validate_study(StudySpec.model_validate(fake_spec(sources=["a", "link-in"])), settings)
    assert v.space_spec["models"][1] == str(fakes / "b")


def test_folders_without_usable_weights(fakes, settings):
    fake_model(fakes / "no-weights", weights=False)
    bin_only = fake_model(fakes / "bin-only", weights=False)
    (bin_only / "pytorch_model.bin").write_bytes(b"not read")
    (fakes / "no-config").mkdir(exist_ok=True)
    broken = fake_model(fakes / "truncated")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-100])
    problems = refused(fake_spec(sources=["no-weights", "bin-only", "no-config", "truncated"]), settings)
    assert at(problems, ["sources", 0]).type == "model_no_weights"
    p = at(problems, ["sources", 1])
    assert p.type == "model_bin_only" and "pytorch_model.bin" in p.msg and "safetensors" in p.fix
    assert at(problems, ["sources", 2]).type == "model_no_config"
    assert "truncated" in at(problems, ["sources", 3]).msg


def test_config_and_weights_must_agree(fakes, settings):
    fake_model(fakes / "liar", config={"num_hidden_layers": 5})
    p = at(refused(fake_spec(sources=["a", "liar"]), settings), ["sources", 1])
    assert "config.json says 5 layers, the weights hold 2" in p.msg


def test_incompatible_shapes_name_the_tensors(fakes, settings):
    fake_model(fakes / "wide", inter=96)
    p = at(refused(fake_spec(sources=["a", "wide"]), settings), ["sources", 1])
    assert p.type == "models_incompatible"
    assert "model.layers.0.mlp.down_proj.weight [32, 96] vs [32, 64]" in p.msg and "more" in p.msg
    assert "kind: stacking" in p.fix
    # stacking needs one width
    fake_model(fakes / "wider", hidden=64)
    p = at(refused(fake_spec(sources=["a", "wider"], space={"kind": "stacking"}), settings), ["sources", 1])
    assert "hidden size 64" in p.msg


def test_different_architectures_are_refused(llama, family, settings):
    _, (q0, _) = family("qwen2")
    p = at(refused(demo_spec(llama, sources=[str(llama[1][0]), str(q0)]), settings), ["sources", 1])
    assert p.type == "models_incompatible" and "qwen2 model" in p.msg and "llama model" in p.msg


def test_base_and_sources_rules(settings):
    assert at(refused(fake_spec(base_model=None), settings), ["base_model"]).type == "missing_base_model"
    p = at(refused(fake_spec(sources=["a", "base"]), settings), ["sources", 1])
    assert p.type == "base_among_sources"
    assert at(refused(fake_spec(sources=["a", "a"]), settings), ["sources", 1]).type == "duplicate_model"
    p = at(refused(fake_spec(space={"kind": "parameter", "method": "slerp"}), settings), ["space"])
    assert "exactly one other model" in p.msg
    v = validate_study(StudySpec.model_validate(
        fake_spec(sources=["a"], space={"kind": "parameter", "method": "slerp"})), settings)
    assert v.space["dimension"] == 2  # t for the layers, t for embeddings / final norm / head


def test_no_model_roots_means_no_local_models(fakes):
    p = at(refused(fake_spec(), Settings(model_roots=[])), ["sources", 0])
    assert p.type == "no_model_roots" and "EVOMERGE_MODEL_ROOTS" in p.fix


def test_missing_tokenizer(fakes, settings):
    fake_model(fakes / "no-tok", tokenizer=False)
    p = at(refused(fake_spec(base_model="no-tok"), settings), ["base_model"])
    assert p.type == "no_tokenizer"
    p = at(refused(fake_spec(space={"kind": "parameter", "method": "ties", "tokenizer_source": "zz"}),
                   settings), ["space", "tokenizer_source"])
    assert p.type == "unknown_model"


# ---- the hub -----------------------------------------------------------------------------
def test_hub_ids_need_the_allowlist(settings, fakes, tmp_path):
    p = at(refused(fake_spec(sources=["a", "meta-llama/Llama-3-8B"]), settings), ["sources", 1])
    assert p.type == "hub_not_allowed" and "EVOMERGE_HUB_ALLOWLIST" in p.msg and "meta-llama/*" not in p.msg
    allowing = Settings(model_roots=settings.model_roots, hub_allowlist=["org/*"], hub_cache_dir=tmp_path)
    p = at(refused(fake_spec(sources=["a", "org/absent"]), allowing), ["sources", 1])
    assert p.type == "model_not_found" and "HF_HUB_OFFLINE" in p.msg  # conftest makes the hub offline
    # a cached hub model is read from the cache
    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc"
    fake_model(snap)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc")
    v = validate_study(StudySpec.model_validate(fake_spec(sources=["a", "org/tiny"])), allowing)
    assert v.models[1].origin == "hub" and v.space_spec["models"][1] == "org/tiny"
    assert "org/tiny" in v.worker_spec["sources"]


# ---- study references (PS then DFS) ------------------------------------------------------
def test_study_references_need_the_controller(fakes, settings):
    spec = fake_spec(sources=[{"study": "ps-7"}, "deep"], base_model=None, space={"kind": "stacking"})
    assert at(refused(spec, settings), ["sources", 0]).type == "study_ref_unresolved"

    def resolver(ref: StudyRef) -> Path:
        if ref.study != "ps-7":
            raise LookupError(f"no study {ref.study!r}")
        return fakes / "a"

    v = validate_study(StudySpec.model_validate(spec), settings, resolve_study_ref=resolver)
    assert v.study_refs == [StudyRef(study="ps-7")]
    assert v.space_spec["sources"][0]["model"] == {"study": "ps-7", "trial": "best"}
    assert "study:ps-7/best" in v.worker_spec["sources"]
    assert v.build_space().describe()["base_model"] == "study:ps-7/best"
    spec["sources"][0] = {"study": "ps-8", "trial": 3}
    p = at(refused(spec, settings, resolve_study_ref=resolver), ["sources", 0])
    assert p.type == "study_ref_invalid" and "no study 'ps-8'" in p.msg


# ---- space -------------------------------------------------------------------------------
def test_layer_ranges_must_fit(settings):
    spec = fake_spec(sources=["a", "deep"], base_model=None,
                     space={"kind": "stacking", "layer_ranges": [[0, 5], None]})
    p = at(refused(spec, settings), ["space", "layer_ranges", 0])
    assert "num_layers (2)" in p.msg
    spec["space"]["layer_ranges"] = [None]
    assert at(refused(spec, settings), ["space", "layer_ranges"]).type == "layer_ranges_mismatch"
    spec["space"] = {"kind": "stacking", "repeats": 1, "max_depth": 99}
    assert "exceeds the 5 slots" in at(refused(spec, settings), ["space"]).msg


def test_unknown_method_in_the_space(settings):
    with pytest.raises(StudyValidationError) as info:
        StudySpec.from_data(fake_spec(space={"kind": "parameter", "method": "tie"}))
    p = at(info.value.problems, ["space", "method"])
    assert "did you mean ties" in p.msg


# ---- evaluation --------------------------------------------------------------------------
def test_unknown_task_and_metric_with_close_matches(settings):
    spec = fake_spec(heldout=None)
    spec["evaluation"]["objectives"] = [
        {"task": "zoo_xl_ad", "metric": "exact_match", "limit": 50},
        {"task": "zoo_en_add", "metric": "exact_mtch", "limit": 50},
        {"task": "zoo", "metric": "exact_match"},
    ]
    problems = refused(spec, settings)
    p = at(problems, ["evaluation", "objectives", 0, "task"])
    assert p.type == "unknown_task" and "Close matches: zoo_xl_add" in p.msg and "task_dirs" in p.fix
    p = at(problems, ["evaluation", "objectives", 1, "metric"])
    assert p.type == "unknown_metric" and "exact_match" in p.msg
    assert "is a tag" in at(problems, ["evaluation", "objectives", 2, "task"]).msg


def test_evaluation_settings(settings, outside):
    spec = fake_spec()
    spec["evaluation"] = {"evaluator": "lm-eval", "objectives": [{"task": "t", "metric": "m"}]}
    assert "Did you mean 'lm_eval'" in at(refused(spec, settings), ["evaluation", "evaluator"]).msg
    spec["evaluation"] = {"objectives": [{"task": "t", "metric": "m"}], "options": {"task_dir": ["x"]}}
    at(refused(spec, settings), ["evaluation", "options", "task_dir"])
    spec["evaluation"]["options"] = {"task_dirs": [str(outside.parent)]}
    assert at(refused(spec, settings), ["evaluation", "options", "task_dirs", 0]).type == "path_outside_roots"
    spec = fake_spec(heldout=None)
    spec["evaluation"]["objectives"] = [
        {"task": "zoo_xl_add", "metric": "exact_match", "limit": 10},
        {"task": "zoo_xl_add", "metric": "exact_match", "limit": 20, "name": "x"},
    ]
    assert "disagree" in at(refused(spec, settings), ["evaluation"]).msg


def test_heldout_rules(settings):
    spec = fake_spec(heldout={"tasks": {"zoo_xl_ad": "zoo_xl_add_heldout"}})
    problems = refused(spec, settings)
    assert "did you mean zoo_xl_add" in at(problems, ["heldout", "tasks", "zoo_xl_ad"]).msg
    assert at(problems, ["heldout", "tasks"]).type == "heldout_incomplete"
    spec = fake_spec(heldout={"tasks": {"zoo_xl_add": "zoo_xl_add_heldot"}})
    assert at(refused(spec, settings), ["heldout", "tasks", "zoo_xl_add"]).type == "unknown_task"
    spec = fake_spec(heldout={"tasks": {"zoo_xl_add": "zoo_xl_add"}})
    assert at(refused(spec, settings), ["heldout", "tasks", "zoo_xl_add"]).type == "heldout_same_task"
    spec = fake_spec(heldout={"top_k": 2})  # the limit-holdout needs a limit on every task
    spec["evaluation"]["objectives"][0].pop("limit")
    assert "needs a search `limit`" in at(refused(spec, settings), ["heldout"]).msg
    spec["evaluation"]["objectives"][0]["limit"] = 50
    v = validate_study(StudySpec.model_validate(spec), settings)
    assert v.heldout_evaluation.subset == "holdout" and v.heldout_top_k == 2


# ---- optimizer ---------------------------------------------------------------------------
def two_objectives(**changes) -> dict:
    spec = fake_spec(heldout=None, **changes)
    spec["evaluation"]["objectives"].append({"task": "zoo_en_add", "metric": "exact_match", "limit": 50})
    return spec


def test_multi_objective_needs_a_multi_objective_optimizer(settings):
    p = at(refused(two_objectives(multi_objective=True), settings), ["optimizer", "name"])
    assert p.type == "optimizer_single_objective" and "nsga2" in p.fix
    p = at(refused(fake_spec(multi_objective=True, optimizer={"name": "nsga2"}, heldout=None), settings),
           ["multi_objective"])
    assert "two or more objectives" in p.msg


def test_directions_must_match_the_objectives(settings):
    spec = two_objectives(multi_objective=True, optimizer={"name": "nsga2", "directions": ["maximize"] * 3})
    assert "3 entries for 2 objectives" in at(refused(spec, settings), ["optimizer", "directions"]).msg
    spec = two_objectives(optimizer={"name": "nsga2", "directions": ["maximize"] * 2})
    assert "multi_objective: true" in at(refused(spec, settings), ["optimizer", "directions"]).fix
    spec = fake_spec(optimizer={"directions": ["minimize"]})
    p = at(refused(spec, settings), ["optimizer", "directions"])
    assert p.type == "directions_minimize" and "higher_is_better" in p.fix


def test_optimizer_options_seed_and_x0(settings):
    p = at(refused(fake_spec(optimizer={"name": "cma", "options": {"restart": "ipop"}}), settings),
           ["optimizer", "options", "restart"])
    assert "restarts" in p.fix
    spec = fake_spec(optimizer={"name": "cma", "options": {"restarts": "x"}})
    assert "must be none, ipop or bipop" in at(refused(spec, settings), ["optimizer"]).msg
    spec = fake_spec(seed=1, optimizer={"seed": 2})
    assert at(refused(spec, settings), ["optimizer", "seed"]).type == "two_seeds"
    spec = fake_spec(optimizer={"seed": 7})
    del spec["seed"]
    assert validate_study(StudySpec.model_validate(spec), settings).optimizer.seed == 7
    x0 = {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}
    p = at(refused(fake_spec(optimizer={"x0": x0}), settings), ["optimizer", "x0"])
    assert p.type == "x0_not_in_space" and "linear" in p.msg


# ---- server settings ---------------------------------------------------------------------
def test_trust_remote_code_is_off_unless_the_server_allows_it(settings, fakes):
    p = at(refused(fake_spec(trust_remote_code=True), settings), ["trust_remote_code"])
    assert p.type == "trust_remote_code_refused"
    allowing = Settings(model_roots=settings.model_roots, trust_remote_code=True)
    spec = StudySpec.model_validate(fake_spec(trust_remote_code=True))
    assert validate_study(spec, allowing).trust_remote_code
    fake_model(fakes / "custom", config={"auto_map": {"AutoModelForCausalLM": "x.Y"}})
    v = validate_study(StudySpec.model_validate(fake_spec(sources=["a", "custom"])), settings)
    assert any("auto_map" in w for w in v.warnings)


def test_every_problem_is_reported_at_once(settings):
    spec = fake_spec(sources=["a", "wide", "nope"], trust_remote_code=True,
                     optimizer={"options": {"x": 1}})
    spec["evaluation"]["objectives"][0]["task"] = "zoo_xl_ad"
    locs = [p.loc for p in refused(spec, settings)]
    for loc in (["trust_remote_code"], ["sources", 2], ["evaluation", "objectives", 0, "task"],
                ["optimizer", "options", "x"]):
        assert loc in locs, locs


def test_the_service_side_imports_no_torch(llama, settings, tmp_path):
    """Validating the demo imports neither torch, transformers nor ray (lm_eval.tasks, to read the
    task index, is the one heavy import, and only when validating)."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(demo_spec(llama)))
    roots = json.dumps([str(r) for r in settings.model_roots])
    code = (
        "import sys, json, types\n"
        "from pathlib import Path\n"
        "import service.spec, service.validation, service.model_headers\n"
        "heavy = ('torch', 'transformers', 'ray', 'lm_eval')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "spec = service.spec.StudySpec.from_file(sys.argv[1])\n"
        "s = types.SimpleNamespace(model_roots=[Path(r) for r in json.loads(sys.argv[2])], hub_allowlist=[],"
        " trust_remote_code=False)\n"
        "service.validation.validate_study(spec, s)\n"
        "print(','.join(m for m in heavy[:3] if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(spec_file), roots], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_the_documented_zoo_studies_validate(tmp_path):
    """docs/study-spec.md's examples over the zoo's layout (4-layer Llamas, header-only fakes here)."""
    import re

    for name in ("base", "math", "language"):
        fake_model(tmp_path / "v2-seed0" / name, layers=4, hidden=64, inter=256)
    settings = Settings(model_roots=[tmp_path])
    text = (REPO / "docs" / "study-spec.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
              if b.startswith("name:") and "v2-seed0" in b]
    assert len(blocks) == 3
    dims = []
    for block in blocks:
        spec = StudySpec.from_text(block)
        v = validate_study(spec, settings, resolve_study_ref=lambda ref: tmp_path / "v2-seed0" / "math")
        dims.append(v.space["dimension"])
    assert dims[0] == 8  # the demo: (all layers + embeddings) × 2 models × (weight, density)
