"""The ``evomerge`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_merge(args: argparse.Namespace) -> int:
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


def _cmd_methods(args: argparse.Namespace) -> int:
    from workers import methods

    for name in methods.names():
        m = methods.get(name)
        params = ", ".join(p.name for p in m.model_params + m.global_params)
        print(f"{name:18s} {m.description}  [{params}]")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from workers.zoo.build import build_zoo

    zoo = build_zoo(args.out, seed=args.seed, scale=args.scale, force=args.force,
                    log=None if args.quiet else print)
    print(f"zoo (seed {zoo.seed}) at {zoo.root}, built in {zoo.seconds:.0f} s")
    for name, path in zoo.models.items():
        print(f"  {name:9s} {path}")
    print("\nexact match of each source model on every zoo task "
          "(the target is zoo_xl_add / zoo_xl_add_heldout):")
    print(zoo.table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evomerge", description="Evolutionary search for model-merge recipes."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("merge", help="merge models from a recipe (YAML/JSON, mergekit's too)")
    p.add_argument("recipe", help="recipe file")
    p.add_argument("out", help="output folder (created; replaced if it exists)")
    p.add_argument("--dtype", help="dtype of the written model (float32, bfloat16, float16)")
    p.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 2GB (default 5GB)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] for the arithmetic")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.set_defaults(func=_cmd_methods)

    zoo = sub.add_parser("zoo", help="the demo zoo: tiny models to merge, built locally")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    p = zoo_sub.add_parser("build", help="build (or reuse) the demo zoo and print its scores")
    p.add_argument("--out", default=None, help="folder (default: ~/.cache/evomerge/zoo/...)")
    p.add_argument("--seed", type=int, default=0, help="zoo seed (default 0)")
    p.add_argument("--scale", type=float, default=1.0, help="shorten training (tests use < 1)")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cmd_zoo_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
