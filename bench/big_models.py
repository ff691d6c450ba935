"""Large random benchmark models, written tensor by tensor (built once, then cached).

Three models of one shape — a base and two "experts" (the base plus small seeded
noise) — in bf16 safetensors, each with ``config.json`` and a small offline tokenizer,
ready for ``workers.candidate.CandidateBuilder`` and ``AutoModelForCausalLM``:

- ``llama_1b``: TinyLlama-1.1B-shaped (hidden 2048, 22 layers, intermediate 5632,
  vocab 32000, 32 heads, 4 KV heads, untied head): about 1.1B parameters, 2.2 GB each;
  cached under ``~/.cache/evomerge/bench/llama-1b-bf16/`` (the CPU memory bench);
- ``qwen_7b``: Qwen2.5-7B-shaped (hidden 3584, 28 layers, intermediate 18944, vocab
  152064, 28 heads, 4 KV heads, q/k/v biases, untied head): 7.6B parameters, 15.2 GB each;
- ``qwen_3b``: Qwen2.5-3B-shaped (hidden 2048, 36 layers, intermediate 11008, vocab
  151936, 16 heads, 2 KV heads, tied head): 3.1B parameters, 6.2 GB each
  (the GPU bench takes the 7B shape where disk and host memory allow, else the 3B one).

Weights are generated one tensor at a time (the base tensor in float32, then each
expert's tensor from it) and streamed into the three files with the project's
``ShardedWriter``, so peak memory is a few copies of the largest tensor, never a whole
model. Every tensor has its own seed (from its index), so the files do not depend on
the order they are written in. A marker file (``COMPLETE``, holding the shape) is
written last: an interrupted or differently-shaped build is redone from scratch.

    .venv/bin/python bench/big_models.py [--shape llama_1b|qwen_7b|qwen_3b|tiny_qwen|tiny_llama]
                                         [--root DIR] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

CACHE = Path.home() / ".cache" / "evomerge" / "bench"
MARKER = "COMPLETE"
NAMES = ("base", "expert0", "expert1")


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's shape (what ``workers.synthetic.make_config`` takes, and more)."""

    arch: str  # "llama" or "qwen2"
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool
    max_positions: int = 4096

    def config(self):
        """The transformers config (bf16, ``max_positions`` long)."""
        from workers.synthetic import make_config

        config = make_config(self.arch, hidden=self.hidden, layers=self.layers, vocab=self.vocab,
                             intermediate=self.intermediate, heads=self.heads)
        config.num_key_value_heads = self.kv_heads
        config.tie_word_embeddings = self.tied
        config.max_position_embeddings = self.max_positions
        config.dtype = torch.bfloat16
        return config

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every stored tensor's name and shape, in the model's order (no tied head)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config())
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if self.tied:
            shapes.pop("lm_head.weight", None)
        return shapes

    def nbytes(self) -> int:
        """One model's size in bf16."""
        return sum(2 * _numel(s) for s in self.tensor_shapes().values())


SHAPES: dict[str, Shape] = {
    "llama_1b": Shape("llama", hidden=2048, layers=22, intermediate=5632, vocab=32000,
                      heads=32, kv_heads=4, tied=False),
    "qwen_7b": Shape("qwen2", hidden=3584, layers=28, intermediate=18944, vocab=152064,
                     heads=28, kv_heads=4, tied=False, max_positions=32768),
    "qwen_3b": Shape("qwen2", hidden=2048, layers=36, intermediate=11008, vocab=151936,
                     heads=16, kv_heads=2, tied=True, max_positions=32768),
    # for plumbing checks: the same code path in a second
    "tiny_llama": Shape("llama", hidden=64, layers=4, intermediate=176, vocab=1000,
                        heads=4, kv_heads=2, tied=False),
    "tiny_qwen": Shape("qwen2", hidden=64, layers=4, intermediate=176, vocab=1000,
                       heads=4, kv_heads=2, tied=False),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _base_tensor(name: str, shape: tuple[int, ...], g: torch.Generator, device: str) -> torch.Tensor:
    """A plausible float32 tensor: norms near 1, biases and weights small."""
    if "norm" in name:
        return 1 + 0.05 * torch.randn(shape, generator=g, device=device)
    std = 0.02 if name.endswith("weight") else 0.05
    return std * torch.randn(shape, generator=g, device=device)


def build(shape: Shape, root: Path, *, seed: int = 0, noise: float = 0.002,
          device: str = "cpu", quiet: bool = False) -> tuple[Path, list[Path]]:
    """The base and the two experts of ``shape`` under ``root`` (built unless complete).

    ``device`` is where the random numbers are generated (``cuda`` is much faster for
    the 7B shape; the files then differ from a CPU build, both are seeded).
    """
    root = Path(root)
    paths = [root / n for n in NAMES]
    want = {**asdict(shape), "seed": seed, "noise": noise, "device": torch.device(device).type}
    marker = root / MARKER
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == want:
                return paths[0], paths[1:]
        except ValueError:
            pass
    # incomplete, or another shape: start over
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    marker.unlink(missing_ok=True)

    from workers.safetensors_writer import ShardedWriter, TensorSpec
    from workers.synthetic import tokenizer_files

    shapes = shape.tensor_shapes()
    config = shape.config()
    specs = [TensorSpec(k, s, torch.bfloat16) for k, s in shapes.items()]
    writers = []
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)
        writers.append(ShardedWriter(p, specs, shard_size=5 * 10**9))
    start = time.perf_counter()
    total = sum(_numel(s) for s in shapes.values())
    done = 0
    try:
        for i, (name, s) in enumerate(shapes.items()):
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            base = _base_tensor(name, s, g, device)
            writers[0].write(name, base.to(torch.bfloat16))
            for w in writers[1:]:
                expert = base + noise * torch.randn(s, generator=g, device=device)
                w.write(name, expert.to(torch.bfloat16))
                del expert
            del base
            done += _numel(s)
            if not quiet and (i % 20 == 0 or i == len(shapes) - 1):
                print(f"  {root.name}: {done / total:6.1%} of {total / 1e9:.2f}B parameters "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
        for w in writers:
            w.close()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    for p in paths:
        config.save_pretrained(str(p))
        tokenizer_files(p)
    marker.write_text(json.dumps(want))
    return paths[0], paths[1:]


def default_root(shape: str) -> Path:
    """Where ``shape``'s models are cached: ``~/.cache/evomerge/bench/<shape>-bf16``."""
    return CACHE / (shape.replace("_", "-") + "-bf16")


def llama_1b(root: Path | None = None, **kw) -> tuple[Path, list[Path]]:
    """The three 1.1B Llama-shaped bf16 models (CPU memory bench)."""
    return build(SHAPES["llama_1b"], Path(root) if root else default_root("llama_1b"), **kw)


def qwen_7b(root: Path | None = None, **kw) -> tuple[Path, list[Path]]:
    """The three Qwen2.5-7B-shaped bf16 models (GPU bench)."""
    return build(SHAPES["qwen_7b"], Path(root) if root else default_root("qwen_7b"), **kw)


def qwen_3b(root: Path | None = None, **kw) -> tuple[Path, list[Path]]:
    """The three Qwen2.5-3B-shaped bf16 models (GPU bench, when 7B does not fit)."""
    return build(SHAPES["qwen_3b"], Path(root) if root else default_root("qwen_3b"), **kw)


def model_bytes(path: Path) -> int:
    """A model's size on disk: its safetensors files."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama_1b", choices=sorted(SHAPES))
    parser.add_argument("--root", help="where the three models go (default under ~/.cache/evomerge/bench)")
    parser.add_argument("--device", default="cpu", help="where the random numbers are generated")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    root = Path(args.root) if args.root else default_root(args.shape)
    print(f"{args.shape}: {shape.nbytes() / 1e9:.2f} GB per model in bf16 -> {root}")
    base, experts = build(shape, root, device=args.device)
    for p in (base, *experts):
        print(f"  {p}: {model_bytes(p) / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
