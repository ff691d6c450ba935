"""``evomerge merge``, ``methods`` and ``zoo build`` / ``zoo list``: the merge engine run locally, no server.

These need the worker extra (torch, transformers); each imports it inside the command so
that ``evomerge --help`` and the client commands work on an API-only install.
"""

from __future__ import annotations

import argparse
import sys


def cmd_merge(args: argparse.Namespace) -> int:
    from search_spaces.recipe import Recipe
    from workers.merge import merge
    from workers.methods.base import MergeError
    from workers.model_io import ModelNotFoundError

    try:
        recipe = Recipe.from_file(args.recipe)
    except FileNotFoundError:
        print(f"error: recipe file {args.recipe} not found", file=sys.stderr)
        return 2
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        print(f"error: {args.recipe} is not a valid recipe:\n{exc}", file=sys.stderr)
        return 2
    if args.dtype:
        recipe = recipe.model_copy(update={"out_dtype": args.dtype})
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        result = merge(
            recipe,
            args.out,
            shard_size=args.shard_size,
            device=args.device,
            show_progress=not args.quiet,
        )
    except (MergeError, ModelNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) "
        f"in {len(result.files)} file(s) to {result.out_dir}"
    )
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from workers import methods

    for name in methods.names():
        m = methods.get(name)
        params = ", ".join(p.name for p in m.model_params + m.global_params)
        print(f"{name:18s} {m.description}  [{params}]")
    return 0


def cmd_zoo_build(args: argparse.Namespace) -> int:
    from workers.zoo.build import build_zoo
    from workers.zoo.variants import get_variant

    variant = get_variant(args.variant)
    zoo = build_zoo(args.out, seed=args.seed, scale=args.scale, force=args.force, variant=variant.name,
                    log=None if args.quiet else print)
    print(f"zoo {variant.name} (seed {zoo.seed}) at {zoo.root}, built in {zoo.seconds:.0f} s")
    for name, path in zoo.models.items():
        print(f"  {name:10s} {path}")
    print(f"\nexact match of each source model on every zoo task of evomerge:{variant.task_folder} "
          f"(the target is {variant.target_task} / {variant.heldout_task}):")
    print(zoo.table())
    return 0


def cmd_zoo_list(args: argparse.Namespace) -> int:
    from workers.zoo.variants import DEFAULT, VARIANTS

    for name, v in VARIANTS.items():
        print(f"{name}{' (default)' if name == DEFAULT else ''}: {v.summary}")
        print(f"  models: {', '.join(v.models)}")
        print(f"  target: {v.target_task} (held-out: {v.heldout_task}), tasks: evomerge:{v.task_folder}")
    return 0
