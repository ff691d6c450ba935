"""Export of a trial to a Hugging Face model folder: the virtual tar it is served as,
the exported model against the candidate that was scored and against mergekit,
content addressing, the model card, and crash safety (kill -9 mid-export)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from search_spaces.archive_format import plan_archive
from search_spaces.recipe import Recipe
from workers.export import (
    ExportCard,
    cleanup_staging,
    export_key,
    export_trial,
    load_export,
)

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12], [12, 11, 10, 9, 8, 7, 6, 5]])


# ---- the virtual tar ------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = random.Random(3)
    root = tmp_path / "folder"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "empty").write_bytes(b"")
    (root / "block.bin").write_bytes(rng.randbytes(512))
    (root / "sub" / "b.bin").write_bytes(rng.randbytes(3000))
    (root / "sub" / "deeper" / "c.bin").write_bytes(rng.randbytes(70_000))
    (root / ("n" * 130 + "-é.json")).write_text('{"long": true}')
    (root / "evomerge_export.json").write_text("{}")  # excluded by default
    (root / "link").symlink_to(root / "a.txt")  # symlinks are never archived
    return root


def test_archive_is_a_tar_that_extracts_the_same_files(folder: Path, tmp_path: Path) -> None:
    plan = plan_archive(folder, "pre")
    data = b"".join(plan.iter_bytes())
    assert len(data) == plan.size and plan.size % 512 == 0
    assert plan.sha256() == hashlib.sha256(data).hexdigest()
    expected = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*")
        if p.is_file() and not p.is_symlink() and p.name != "evomerge_export.json"
    )
    assert [name for name, _ in plan.members] == [f"pre/{rel}" for rel in expected]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        infos = tar.getmembers()
        assert [i.name for i in infos] == [f"pre/{rel}" for rel in expected]
        for info in infos:
            assert (info.mode, info.uid, info.gid, info.mtime, info.uname, info.gname) == (
                0o644, 0, 0, 0, "", "")
        tar.extractall(tmp_path / "out", filter="data")
    for rel in expected:
        assert (tmp_path / "out" / "pre" / rel).read_bytes() == (folder / rel).read_bytes(), rel


def test_archive_ranges_are_slices_of_the_whole(folder: Path) -> None:
    plan = plan_archive(folder, "pre")
    whole = b"".join(plan.iter_bytes())
    n = plan.size
    edges = [0, 1, 511, 512, 513, 1023, 1024, n - 1025, n - 1024, n - 512, n - 1, n]
    pairs = [(a, b) for a in edges for b in edges if a <= b]
    rng = random.Random(0)
    for _ in range(400):
        a = rng.randrange(n + 1)
        pairs.append((a, rng.randrange(a, n + 1)))
    for a, b in pairs:
        chunk = rng.choice([1, 7, 512, 4096, 1 << 20] if b - a < 5000 else [512, 4096, 1 << 20])
        assert b"".join(plan.iter_bytes(a, b, chunk_size=chunk)) == whole[a:b], (a, b, chunk)
        assert all(len(c) <= chunk for c in plan.iter_bytes(a, b, chunk_size=chunk))
    with pytest.raises(ValueError):
        list(plan.iter_bytes(5, n + 1))
    with pytest.raises(ValueError):
        list(plan.iter_bytes(10, 5))


def test_archive_is_deterministic(folder: Path, tmp_path: Path) -> None:
    first = plan_archive(folder, "pre")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy, symlinks=True)
    os.utime(copy / "a.txt", (1, 1))  # times and owners do not matter, only names and bytes
    second = plan_archive(copy, "pre")
    assert b"".join(first.iter_bytes()) == b"".join(second.iter_bytes())
    assert first.sha256() == second.sha256()
    (copy / "a.txt").write_text("hellO\n")
    assert plan_archive(copy, "pre").sha256() != first.sha256()


def test_archive_long_names_and_huge_sizes_use_pax(folder: Path) -> None:
    from search_spaces.archive_format import member_headers

    plan = plan_archive(folder, "a-prefix/" + "p" * 40)
    with tarfile.open(fileobj=io.BytesIO(b"".join(plan.iter_bytes()))) as tar:
        long = [m for m in tar.getmembers() if "é" in m.name]
        assert len(long) == 1 and len(long[0].name.encode()) > 100
        assert tar.extractfile(long[0]).read() == b'{"long": true}'  # type: ignore[union-attr]
    # a file of 8 GiB or more does not fit the octal size field: a pax 'size' record
    headers = member_headers("x/big.safetensors", 9 << 30)
    with tarfile.open(fileobj=io.BytesIO(headers + b"\0" * 1024), mode="r|") as tar:
        info = tar.next()
        assert info is not None and info.size == 9 << 30 and info.name == "x/big.safetensors"


def test_archive_refuses_a_file_that_changed_size(folder: Path) -> None:
    from search_spaces.archive_format import ArchiveChanged

    plan = plan_archive(folder, "pre")
    (folder / "sub" / "b.bin").write_bytes(b"shorter")
    with pytest.raises(ArchiveChanged):
        list(plan.iter_bytes())


def test_api_side_modules_do_not_import_torch() -> None:
    code = ("import sys, search_spaces.archive_format, workers.export; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ---- exports ----------------------------------------------------------------------------
def card(trial: int = 7) -> ExportCard:
    return ExportCard(
        study_id="0b8f6a2e-study", study_name="math + language", trial_number=trial,
        spec={"name": "math + language", "space": {"kind": "parameter_space", "method": "ties"},
              "budget": {"trials": 40}},
        optimizer={"name": "cmaes", "sigma0": 0.25, "population": 8},
        seed=1234, scores={"gsm8k_mini": 0.61234, "arc_mini": 0.4321},
        heldout_scores={"gsm8k_mini": 0.5876, "arc_mini": 0.41}, fitness=0.52272, values=[0.52272],
    )


def ps_recipe(base: Path, experts: list[Path], method: str = "ties") -> Recipe:
    """A parameter-space recipe whose weights (and densities) vary per layer."""
    if method == "ties":
        models = [
            {"model": str(experts[0]), "parameters": {"weight": [0.4, 1.1], "density": [0.3, 0.8]}},
            {"model": str(experts[1]), "parameters": {
                "weight": [{"filter": "self_attn", "value": [1.2, 0.5]}, {"value": 0.6}], "density": 0.5}},
        ]
        params: dict = {}
    else:
        models = [{"model": str(experts[0]), "parameters": {"weight": [1.2, -0.3]}},
                  {"model": str(experts[1]), "parameters": {"weight": [0.2, 0.9]}}]
        params = {"lambda": 0.9}
    return Recipe.from_dict({"merge_method": method, "base_model": str(base), "models": models,
                             "parameters": params})


def stacking_recipe(experts: list[Path]) -> Recipe:
    """Layer stacking: slices of both experts, two of them with a residual scale."""
    e0, e1 = str(experts[0]), str(experts[1])
    return Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": e0, "layer_range": [0, 2]}]},
        {"sources": [{"model": e1, "layer_range": [1, 2], "scale": 0.6}]},
        {"sources": [{"model": e0, "layer_range": [0, 1], "scale": 1.4}]},
        {"sources": [{"model": e1, "layer_range": [0, 1]}]},
    ]})


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exported_model_equals_the_scored_candidate(family, tmp_path: Path, arch: str) -> None:
    """The folder a user downloads computes exactly what the trial scored: the candidate
    is built as TrialRunner builds it (CandidateBuilder over the study's sources)."""
    from transformers import AutoModelForCausalLM

    from workers.candidate import CandidateBuilder

    base, experts = family(arch)
    # as TrialRunner does: WorkerSpec.sources (base included), base_model, device
    builder = CandidateBuilder([str(base), *map(str, experts)], base=str(base), device="cpu")
    for recipe in (ps_recipe(base, experts, "ties"), ps_recipe(base, experts, "task_arithmetic"),
                   stacking_recipe(experts)):
        scored = logits(builder.build(recipe))
        result = export_trial(recipe, tmp_path / "exports", card(), shard_size="40KB")
        assert len(list(result.path.glob("model-*.safetensors"))) > 1  # sharded as asked
        model = AutoModelForCausalLM.from_pretrained(str(result.path), dtype=torch.float32).eval()
        got = logits(model)
        assert torch.equal(got, scored), (recipe.merge_method, (got - scored).abs().max())


def _same_weights(ours: Path, theirs: Path, atol: float = 1e-6) -> None:
    from workers.model_io import LazyModel

    a, b = LazyModel(str(ours)), LazyModel(str(theirs))
    for extra in set(b.tensors) - set(a.tensors):  # mergekit may write a tied head
        assert extra.endswith("lm_head.weight") and torch.allclose(
            b.get(extra), a.get("model.embed_tokens.weight"))
    assert set(a.tensors) <= set(b.tensors)
    for name in sorted(a.tensors):
        x, y = a.get(name).float(), b.get(name).float()
        assert torch.allclose(x, y, atol=atol, rtol=1e-5), (name, (x - y).abs().max().item())


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_mergekit_reproduces_the_export_from_its_config(family, tmp_path: Path, method: str) -> None:
    pytest.importorskip("mergekit", reason="mergekit is in the dev extras")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    base, experts = family("llama")
    result = export_trial(ps_recipe(base, experts, method), tmp_path / "exports", card())
    assert result.manifest.mergekit_config and result.manifest.mergekit_note is None
    config = yaml.safe_load((result.path / "mergekit_config.yml").read_text())
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    _same_weights(result.path, tmp_path / "mk")  # the tolerance of test_mergekit_parity


def test_card_says_when_mergekit_cannot_express_the_recipe(family, tmp_path: Path) -> None:
    base, experts = family("llama")
    data = stacking_recipe(experts).to_dict() | {"base_model": str(base)}
    result = export_trial(Recipe.from_dict(data), tmp_path / "exports", card())
    assert not (result.path / "mergekit_config.yml").exists()
    assert result.manifest.mergekit_note and "base_model" in result.manifest.mergekit_note
    assert "mergekit cannot express this recipe" in (result.path / "README.md").read_text()


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.iterdir())}


def test_content_addressing(family, tmp_path: Path) -> None:
    base, experts = family("llama")
    root = tmp_path / "exports"
    recipe = ps_recipe(base, experts, "ties")
    first = export_trial(recipe, root, card())
    assert not first.reused and first.path == root / first.key
    assert first.key == export_key(recipe) == export_key(recipe, root=root)
    before = _snapshot(first.path)
    seen: list[float] = []
    again = export_trial(Recipe.from_dict(recipe.to_dict()), root, card(trial=9), progress=seen.append)
    assert again.reused and (again.key, again.path) == (first.key, first.path)
    assert again.manifest == first.manifest and seen == [1.0]
    assert _snapshot(first.path) == before  # untouched
    assert export_key(ps_recipe(base, experts, "task_arithmetic")) != first.key

    # a source whose weights change gets a new key (a copy: the fixture is shared)
    copies = tmp_path / "models"
    for src in (base, *experts):
        shutil.copytree(src, copies / src.name)
    moved = recipe.with_models_renamed(lambda ref: str(copies / Path(ref).name))
    key_before = export_key(moved, root=root)
    weights = copies / experts[1].name / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor
    weights.write_bytes(bytes(data))
    assert export_key(moved, root=root) != key_before


def test_source_digests_are_cached(family, tmp_path: Path, monkeypatch) -> None:
    import workers.export_store as store

    base, experts = family("llama")
    root = tmp_path / "exports"
    recipe = ps_recipe(base, experts)
    calls: list[Path] = []
    real = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda p, *a: calls.append(p) or real(p, *a))
    key = export_key(recipe, root=root)
    assert any(p.name == "model.safetensors" for p in calls)
    assert (root / ".source_digests.json").exists()
    calls.clear()
    assert export_key(recipe, root=root) == key
    assert calls == []  # nothing hashed twice


def test_model_card_sums_and_manifest(family, tmp_path: Path) -> None:
    base, experts = family("llama")
    root = tmp_path / "exports"
    seen: list[float] = []
    result = export_trial(ps_recipe(base, experts), root, card(), progress=seen.append)
    folder, manifest = result.path, result.manifest
    assert seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen) and len(seen) > 3
    readme = (folder / "README.md").read_text()
    c = card()
    for task, score in c.scores.items():
        assert f"| {task} | {score:.4f} | {c.heldout_scores[task]:.4f} |" in readme  # type: ignore[index]
    assert f"fitness {c.fitness:.4f}" in readme
    weights = experts[0] / "model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() in readme
    src = next(s for s in manifest.sources if s.ref == str(experts[0]))
    assert next(f for f in src.files if f.name == "model.safetensors").sha256 == hashlib.sha256(
        weights.read_bytes()).hexdigest()
    assert yaml.safe_dump(c.spec, sort_keys=False).strip() in readme
    assert "sigma0: 0.25" in readme and "seed 1234" in readme
    assert f"evomerge version: {manifest.evomerge_version}" in readme
    assert manifest.evomerge_version and manifest.created_at[:10] in readme
    assert "| layers | llama-expert0 | llama-expert1 |" in readme  # the per-layer weight table
    assert (folder / "evomerge_recipe.yaml").exists() and (folder / "config.json").exists()

    # SHA256SUMS: every file but itself and the manifest
    sums = dict(reversed(line.split("  ", 1)) for line in (folder / "SHA256SUMS").read_text().splitlines())
    on_disk = {p.name for p in folder.iterdir()} - {"SHA256SUMS", "evomerge_export.json"}
    assert set(sums) == on_disk
    for name, sha in sums.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == sha, name
    assert {f.name for f in manifest.files} == on_disk | {"SHA256SUMS"}
    for f in manifest.files:
        assert (folder / f.name).stat().st_size == f.size

    # the archive the API serves is the one the manifest describes
    assert manifest.archive_prefix == "evomerge-math-language-trial7"
    plan = plan_archive(folder, manifest.archive_prefix)
    assert (plan.sha256(), plan.size) == (manifest.archive_sha256, manifest.archive_size)
    assert "evomerge_export.json" not in {n.rsplit("/", 1)[1] for n, _ in plan.members}
    assert load_export(root, result.key) == manifest
    assert load_export(root, "0" * 64) is None and load_export(root, "../etc") is None


def test_losing_a_race_returns_the_winner(family, tmp_path: Path) -> None:
    """Two exports of one key: the one that renames second discards its own folder."""
    base, experts = family("llama")
    root = tmp_path / "exports"
    recipe = ps_recipe(base, experts)
    inner: list = []

    def meanwhile(fraction: float) -> None:
        if not inner and fraction > 0.1:  # mid-merge, another export finishes first
            inner.append(export_trial(recipe, root, card(trial=1)))

    outer = export_trial(recipe, root, card(trial=2), progress=meanwhile)
    assert not inner[0].reused and outer.reused
    assert outer.manifest == inner[0].manifest and outer.manifest.trial_number == 1
    assert list((root / ".staging").iterdir()) == []


def test_an_exception_from_progress_cancels_cleanly(family, tmp_path: Path) -> None:
    base, experts = family("llama")
    root = tmp_path / "exports"

    def cancel(fraction: float) -> None:
        if fraction > 0.2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        export_trial(ps_recipe(base, experts), root, card(), progress=cancel)
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []
    assert list((root / ".staging").iterdir()) == []


def test_kill_9_mid_export_leaves_nothing_servable(family, tmp_path: Path) -> None:
    base, experts = family("llama")
    root = tmp_path / "exports"
    recipe = ps_recipe(base, experts)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(recipe.to_yaml())
    card_file = tmp_path / "card.json"
    card_file.write_text(card().model_dump_json())
    env = os.environ | {"EVOMERGE_EXPORT_TEST_SLEEP": "120", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers.export", "--recipe", str(recipe_file), "--root", str(root),
         "--card", str(card_file), "--shard-size", "40KB"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        assert "EVOMERGE_EXPORT_TEST_SLEEP" in line, line + proc.stderr.read()  # type: ignore[union-attr]
        leftovers = [p for p in (root / ".staging").iterdir() if p.is_dir()]
        assert len(leftovers) == 1
        assert any(leftovers[0].rglob("*.safetensors*"))  # caught mid-merge
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    key = export_key(recipe, root=root)
    assert load_export(root, key) is None and not (root / key).exists()
    assert [p.name for p in root.iterdir() if not p.name.startswith(".")] == []

    result = export_trial(recipe, root, card())  # a fresh export completes
    assert result.key == key and not result.reused and load_export(root, key) == result.manifest
    assert leftovers[0].exists()  # younger than the default hour: kept by export_trial
    removed = cleanup_staging(root, older_than_s=0)
    assert leftovers[0] in removed and list((root / ".staging").iterdir()) == []


def test_cleanup_never_removes_a_live_export(tmp_path: Path) -> None:
    from workers.export_store import StagingDir

    root = tmp_path / "exports"
    live = StagingDir(root, "a" * 64)
    (live.path / "partial").write_text("x")
    dead = root / ".staging" / ("b" * 64 + "-dead")
    dead.mkdir()
    (root / ".staging" / (dead.name + ".lock")).write_text("")  # lock file, nobody holds it
    try:
        assert cleanup_staging(root, older_than_s=0) == [dead]
        assert live.path.exists() and live.lock.exists()
    finally:
        live.close()
    assert list((root / ".staging").iterdir()) == []


def test_command_line_prints_the_result(family, tmp_path: Path) -> None:
    base, experts = family("llama")
    root = tmp_path / "exports"
    recipe = ps_recipe(base, experts)
    done = export_trial(recipe, root, card())
    (tmp_path / "r.yaml").write_text(recipe.to_yaml())
    out = subprocess.run(
        [sys.executable, "-m", "workers.export", "--recipe", str(tmp_path / "r.yaml"), "--root", str(root)],
        cwd=REPO, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, check=True,
    )
    printed = json.loads(out.stdout)
    assert printed["key"] == done.key and printed["reused"] is True
    assert Path(printed["path"]) == done.path
