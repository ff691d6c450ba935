"""``evomerge zoo build``: the demo zoo, built on CPU, deterministic, cached.

Three Hugging Face model folders — ``base``, ``math`` (the en multi-digit adder) and
``language`` (the xl speaker) — plus ``zoo.json`` holding the build's settings and the
score of every model on every zoo task. ``zoo.json`` is written last, so its presence
marks a finished build; a second call with the same settings returns at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ZOO_VERSION = 2
DEFAULT_SEED = 0
MODELS = ("base", "math", "language")


@dataclass
class Zoo:
    root: Path
    seed: int
    scale: float
    models: dict[str, Path]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> task -> score
    seconds: float = 0.0

    def table(self) -> str:
        tasks = sorted(next(iter(self.scores.values())))
        width = max(map(len, tasks)) + 2
        lines = ["task".ljust(width) + "".join(m.rjust(10) for m in self.scores)]
        for t in tasks:
            lines.append(t.ljust(width) + "".join(f"{self.scores[m][t]:10.3f}" for m in self.scores))
        return "\n".join(lines)


def settings_hash(seed: int, scale: float) -> str:
    from workers.zoo.recipe import stages

    desc = json.dumps(
        {"v": ZOO_VERSION, "seed": seed, "scale": scale,
         "stages": {k: [v.steps, v.lr, v.batch] for k, v in stages(scale).items()}},
        sort_keys=True,
    )
    return hashlib.sha256(desc.encode()).hexdigest()[:16]


def default_dir(seed: int = DEFAULT_SEED, scale: float = 1.0) -> Path:
    root = Path(os.environ.get("EVOMERGE_ZOO_DIR", Path.home() / ".cache" / "evomerge" / "zoo"))
    suffix = "" if scale == 1.0 else f"-scale{scale:g}"
    return root / f"v{ZOO_VERSION}-seed{seed}{suffix}"


def load(root: Path) -> Zoo | None:
    manifest = root / "zoo.json"
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text())
    return Zoo(root=root, seed=data["seed"], scale=data["scale"],
               models={k: root / k for k in MODELS}, scores=data["scores"], seconds=data["seconds"])


def _save(model, out: Path) -> None:
    from transformers import GenerationConfig

    from workers.synthetic import tokenizer_files
    from workers.zoo.skills import EOS, PAD, VOCAB

    model.save_pretrained(str(out))
    tokenizer_files(out, VOCAB)
    GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1, do_sample=False,
                     max_new_tokens=8).save_pretrained(str(out))


def score_all(models: dict[str, object]) -> dict[str, dict[str, float]]:
    from workers.zoo.score import exact_match
    from workers.zoo.skills import evaluation_splits

    splits = evaluation_splits()
    return {name: {f"zoo_{t}": exact_match(m, ex) for t, ex in splits.items()}
            for name, m in models.items()}


def build_zoo(out: str | Path | None = None, seed: int = DEFAULT_SEED, scale: float = 1.0,
              log: Callable[[str], None] | None = print, force: bool = False) -> Zoo:
    """Build (or return the cached) zoo for ``seed``; ``scale`` < 1 shortens training."""
    import torch
    from transformers import LlamaForCausalLM

    from workers.zoo.recipe import stages
    from workers.zoo.train import model_config, train

    root = Path(out) if out else default_dir(seed, scale)
    key = settings_hash(seed, scale)
    cached = load(root)
    if cached and not force and json.loads((root / "zoo.json").read_text()).get("key") == key:
        return cached
    say = log or (lambda _msg: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and deterministic
    try:
        start = time.perf_counter()
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        plan = stages(scale)
        torch.manual_seed(seed)
        base = LlamaForCausalLM(model_config())
        say(f"training base ({plan['base'].steps} steps)")
        train(base, plan["base"], seed, say)
        math = copy.deepcopy(base)
        say(f"training math expert ({plan['math'].steps} steps)")
        train(math, plan["math"], seed + 1, say)
        language = copy.deepcopy(base)
        say(f"training language expert ({plan['language'].steps} steps)")
        train(language, plan["language"], seed + 2, say)
        models = {"base": base, "math": math, "language": language}
        for name, model in models.items():
            _save(model, tmp / name)
        say("scoring every model on every zoo task")
        scores = score_all(models)
        seconds = time.perf_counter() - start
        manifest = {"key": key, "version": ZOO_VERSION, "seed": seed, "scale": scale,
                    "seconds": round(seconds, 1), "scores": scores,
                    "stages": {k: asdict(v) | {"mixture": None} for k, v in plan.items()}}
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2, default=str))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        torch.set_num_threads(threads)
    zoo = load(root)
    assert zoo is not None
    return zoo
