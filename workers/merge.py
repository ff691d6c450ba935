"""Executing a merge plan: read, merge and write one tensor at a time.

Inputs of the next tensor are read on a background thread while the current one is
merged, and each merged tensor is streamed to its shard at once, so peak memory is a
few tensors, not a model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from search_spaces.recipe import Recipe
from search_spaces.tensor_names import COMPANION_FILES
from workers.methods.base import MergeError
from workers.plan import MergePlan, TensorTask, build_plan, patched_config
from workers.safetensors_writer import ShardedWriter, TensorSpec, parse_size
from workers.sparsify import Workspace
from workers.tensor_merge import TensorInputs, merge_into


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    files: list[str]


def apply_residual_scale(tensor: torch.Tensor, scale: float, unit_offset: bool) -> torch.Tensor:
    """Scale a layer's residual contribution through the tensor that ends it.

    An output projection (weight and bias) is multiplied by ``scale``; a post-sub-layer
    norm computed as ``x * (1 + w)`` gets ``w' = scale * (1 + w) - 1``.
    """
    if unit_offset:
        return scale * (1 + tensor) - 1
    return tensor * scale


def read_inputs(
    plan: MergePlan, task: TensorTask
) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """A task's inputs in their stored dtype (the recipe's ``dtype`` applies in the merge)."""
    base = plan.models[task.base.model].get(task.base.name) if task.base else None
    tensors = [plan.models[s.model].get(s.name) for s in task.inputs]
    return base, tensors


def merge_tensor(
    plan: MergePlan,
    task: TensorTask,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    device: torch.device | str = "cpu",
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Merge one tensor from its raw inputs; the result is in the task's dtype on CPU.

    The arithmetic is ``workers.tensor_merge.merge_into``'s, the in-memory candidate
    builder's too: what is written is what a worker scores.
    """
    everything = ([base] if base is not None else []) + tensors
    if not everything[0].dtype.is_floating_point:
        return everything[0].clone()  # integer buffers (e.g. position ids) are copied
    for src, t in zip(([task.base] if task.base else []) + task.inputs, everything):
        check_finite_source(src.model, src.name, t)
    device = torch.device(device)
    inputs = TensorInputs(
        name=task.name, shape=task.shape,
        base=base.to(device) if base is not None else None,
        tensors=[t.to(device) for t in tensors],
        model_params=task.model_params, global_params=task.global_params,
        seed=plan.recipe.seed, model_names=[s.model for s in task.inputs],
        read_dtype=plan.read_dtype,
    )
    out = torch.empty(task.shape, dtype=task.dtype, device=device)
    merge_into(plan.method, inputs, out, out_dtype=task.dtype, ws=workspace or Workspace(),
               residual_scale=task.residual_scale, unit_offset=task.unit_offset)
    return out.cpu()


def check_finite_source(model: str, name: str, t: torch.Tensor) -> None:
    """Refuse a source tensor with NaN (a sum is NaN when any entry is: a cheap first check)."""
    if torch.isnan(t.sum()) and torch.isnan(t).any():
        raise MergeError(f"model {model!r}, tensor {name}: contains NaN; refusing to merge it")


def write_side_files(plan: MergePlan, out_dir: Path) -> None:
    """config.json (patched), tokenizer files and generation config from the sources."""
    (out_dir / "config.json").write_text(json.dumps(patched_config(plan), indent=2) + "\n")
    tok_dir = plan.models[plan.tokenizer_source].path
    for fname in COMPANION_FILES:
        src = tok_dir / fname
        if src.exists():
            shutil.copyfile(src, out_dir / fname)
    if plan.recipe.chat_template:
        (out_dir / "chat_template.jinja").write_text(plan.recipe.chat_template)
    (out_dir / "evomerge_recipe.yaml").write_text(plan.recipe.to_yaml())


def run_plan(
    plan: MergePlan,
    out_dir: str | Path,
    *,
    shard_size: str | int = "5GB",
    device: str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> MergeResult:
    """Execute a plan into ``out_dir`` (written atomically: built beside it, then moved)."""
    from workers import kernels

    kernels.use_for(sum(max(1, t.nbytes // max(1, t.dtype.itemsize)) for t in plan.tasks))
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    specs = [TensorSpec(t.name, t.shape, t.dtype) for t in plan.tasks]
    writer = ShardedWriter(tmp, specs, parse_size(shard_size))
    workspace = Workspace()  # scratch buffers reused across tensors of the same shape
    try:
        # three stages overlap: read the next inputs, merge this tensor, write the last
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as out:
            pending = reader.submit(read_inputs, plan, plan.tasks[0]) if plan.tasks else None
            written = None
            for i, task in enumerate(plan.tasks):
                assert pending is not None
                base, tensors = pending.result()
                if i + 1 < len(plan.tasks):
                    pending = reader.submit(read_inputs, plan, plan.tasks[i + 1])
                merged = merge_tensor(plan, task, base, tensors, device, workspace)
                del base, tensors
                if written is not None:
                    written.result()
                written = out.submit(writer.write, task.name, merged)
                if progress:
                    progress(task.nbytes)
            if written is not None:
                written.result()
        writer.close()
        write_side_files(plan, tmp)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return MergeResult(
        out_dir=out_dir,
        tensors=len(plan.tasks),
        bytes_written=sum(s.nbytes for s in specs),
        files=writer.files,
    )


def merge(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    shard_size: str | int = "5GB",
    device: str = "cpu",
    show_progress: bool = False,
) -> MergeResult:
    """Plan and run a merge. All validation happens in planning, before any weight is read."""
    plan = build_plan(recipe)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for, but no CUDA device is available")
    if not show_progress:
        return run_plan(plan, out_dir, shard_size=shard_size, device=device)
    from tqdm import tqdm

    total = sum(t.nbytes for t in plan.tasks)
    with tqdm(total=total, unit="B", unit_scale=True, desc="merging") as bar:
        return run_plan(plan, out_dir, shard_size=shard_size, device=device, progress=bar.update)
