"""``evomerge zoo build``: a zoo of the family, built on CPU, deterministic, cached.

One Hugging Face model folder per model of the variant (``base`` first, then the
experts) plus ``zoo.json`` holding the build's settings, the machine it was built on
and the score of every model on every task of the variant. ``zoo.json`` is written last,
so its presence marks a finished build; a second call with the same settings returns at
once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from workers.zoo.variant import ZOO_VERSION, ZooVariant
from workers.zoo.variants import DEFAULT, get_variant

__all__ = ["DEFAULT_SEED", "MODELS", "ZOO_VERSION", "Zoo", "build_zoo", "default_dir", "load",
           "settings_hash"]

DEFAULT_SEED = 0
MODELS = get_variant(DEFAULT).models  # the default zoo's


@dataclass
class Zoo:
    root: Path
    seed: int
    scale: float
    models: dict[str, Path]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> task -> score
    seconds: float = 0.0
    variant: str = DEFAULT
    machine: dict[str, str] = field(default_factory=dict)
    checks: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> unshipped split -> score

    def table(self) -> str:
        tasks = sorted(next(iter(self.scores.values())))
        checks = sorted(next(iter(self.checks.values()), {}))
        width = max(map(len, tasks + [f"{c} (check)" for c in checks])) + 2
        lines = ["task".ljust(width) + "".join(m.rjust(11) for m in self.scores)]
        for t in tasks:
            lines.append(t.ljust(width) + "".join(f"{self.scores[m][t]:11.3f}" for m in self.scores))
        for c in checks:  # scored like a task, but not shipped as one
            lines.append(f"{c} (check)".ljust(width)
                         + "".join(f"{self.checks[m][c]:11.3f}" for m in self.checks))
        return "\n".join(lines)


def _describe(maker: Any) -> str:
    """A training-data maker, stably named (a partial's arguments included; a set by its size)."""
    if isinstance(maker, partial):
        keywords = sorted(maker.keywords.items())
        args = [*map(_describe, maker.args), *(f"{k}={_describe(v)}" for k, v in keywords)]
        return f"{_describe(maker.func)}({', '.join(args)})"
    if isinstance(maker, (set, frozenset)):
        return f"<{len(maker)} pairs>"
    if callable(maker):
        return maker.__qualname__
    return repr(maker)


def settings_hash(seed: int, scale: float, variant: ZooVariant | str = DEFAULT) -> str:
    """The build's cache key. The first zoo keeps its key from before the family; the others'
    also cover the architecture and each stage's mixture, start and trained parameters."""
    v = get_variant(variant) if isinstance(variant, str) else variant
    plan = v.stages(scale)
    desc: dict[str, Any] = {"v": ZOO_VERSION, "seed": seed, "scale": scale,
                            "stages": {k: [s.steps, s.lr, s.batch] for k, s in plan.items()}}
    if not v.legacy:
        config = v.config().to_dict()
        config.pop("transformers_version", None)
        desc |= {"variant": v.name, "vocab": v.vocab, "config": config,
                 "recipes": {k: [s.warmup, s.start, s.trains, [[w, _describe(m)] for w, m in s.mixture],
                                 *([s.objective, s.depth] if s.objective != "answers" else [])]
                             for k, s in plan.items()}}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_dir(seed: int = DEFAULT_SEED, scale: float = 1.0, variant: str = DEFAULT) -> Path:
    root = Path(os.environ.get("EVOMERGE_ZOO_DIR", Path.home() / ".cache" / "evomerge" / "zoo"))
    suffix = "" if scale == 1.0 else f"-scale{scale:g}"
    return root / f"{get_variant(variant).folder_name(seed)}{suffix}"


def load(root: Path) -> Zoo | None:
    manifest = root / "zoo.json"
    if not manifest.exists():
        return None
    data = json.loads(manifest.read_text())
    variant = data.get("variant", DEFAULT)  # a zoo.json from before the family: the first zoo
    return Zoo(root=root, seed=data["seed"], scale=data["scale"],
               models={k: root / k for k in get_variant(variant).models}, scores=data["scores"],
               seconds=data["seconds"], variant=variant, machine=data.get("machine", {}),
               checks=data.get("checks", {}))


def machine() -> dict[str, str]:
    """What the floats of a build depend on beyond the seed: the same seed trains slightly
    different weights on another CPU (or torch), so merges score differently there."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _save(model, out: Path, variant: ZooVariant) -> None:  # type: ignore[no-untyped-def]
    from transformers import GenerationConfig

    from workers.synthetic import tokenizer_files
    from workers.zoo.vocab import BOS, EOS, PAD

    model.save_pretrained(str(out))
    tokenizer_files(out, list(variant.vocab))
    GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS, do_sample=False,
                     max_new_tokens=8).save_pretrained(str(out))


def score_all(models: dict[str, Any], variant: ZooVariant | str = DEFAULT,
              checks: bool = False) -> dict[str, dict[str, float]]:
    """Every model's exact match on every task of the variant (by task name), or with
    ``checks`` on the variant's unshipped checks (by split name)."""
    from workers.zoo.score import exact_match

    v = get_variant(variant) if isinstance(variant, str) else variant
    if checks:
        return {name: {c: exact_match(m, ex, v.tokens) for c, ex in v.checks().items()}
                for name, m in models.items()}
    return {name: {v.task(t): exact_match(m, ex, v.tokens) for t, ex in v.evaluation_splits().items()}
            for name, m in models.items()}


def train_models(variant: ZooVariant, seed: int, scale: float,
                 say: Callable[[str], None]) -> dict[str, Any]:
    """Every model of the variant, in memory: the base from a fresh initialisation, each
    other model from a copy of its stage's ``start``; stage ``i`` trains with seed ``seed + i``."""
    import torch

    from workers.zoo.architectures import model_for
    from workers.zoo.train import train

    plan = variant.stages(scale)
    trained = [n for n in plan if n in variant.models]
    if trained != list(variant.models) or next(iter(plan)) != variant.models[0]:
        raise ValueError(f"{variant.name}: the stages {tuple(plan)} do not train the models {variant.models} "
                         "in order, the base first (a stage not named as a model is an intermediate step)")
    models: dict[str, Any] = {}
    for i, (name, stage) in enumerate(plan.items()):
        if i == 0:
            torch.manual_seed(seed)
            model = model_for(variant.config())
        else:
            model = copy.deepcopy(models[stage.start])
        what = "base" if i == 0 else f"{name} expert"
        say(f"training {what} ({stage.steps} steps)")
        began = time.perf_counter()
        train(model, stage, seed + i, variant.tokens, say)
        say(f"  {name}: {time.perf_counter() - began:.0f} s")
        models[name] = model
    return {name: models[name] for name in variant.models}


def build_zoo(out: str | Path | None = None, seed: int = DEFAULT_SEED, scale: float = 1.0,
              log: Callable[[str], None] | None = print, force: bool = False,
              variant: str = DEFAULT) -> Zoo:
    """Build (or return the cached) zoo ``variant`` for ``seed``; ``scale`` < 1 shortens training."""
    import torch

    v = get_variant(variant)
    root = Path(out) if out else default_dir(seed, scale, v.name)
    key = settings_hash(seed, scale, v)
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
        say(f"zoo variant {v.name}: {v.summary}")
        models = train_models(v, seed, scale, say)
        for name, model in models.items():
            _save(model, tmp / name, v)
        say("scoring every model on every zoo task")
        scores = score_all(models, v)
        checked = score_all(models, v, checks=True) if v.checks() else {}
        seconds = time.perf_counter() - start
        manifest = {"key": key, "version": ZOO_VERSION, "variant": v.name, "seed": seed, "scale": scale,
                    "seconds": round(seconds, 1), "machine": machine(), "scores": scores,
                    **({"checks": checked} if checked else {}),
                    "stages": {k: asdict(s) | {"mixture": None} for k, s in v.stages(scale).items()}}
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2, default=str))
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    finally:
        torch.set_num_threads(threads)
    zoo = load(root)
    assert zoo is not None
    return zoo
