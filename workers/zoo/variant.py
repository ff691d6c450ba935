"""``ZooVariant``: everything that makes one zoo of the family, declared once; ``Stage``:
how one of its models is trained.

The build, the shipped tasks, the scoring, the CLI and the docs table all read it. No
torch here: the CLI's parser lists the variants on an API-only install.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from workers.zoo.skills import Example
from workers.zoo.vocab import Vocab, vocab

ZOO_VERSION = 2

Splits = dict[str, list[Example]]


@dataclass(frozen=True)
class Stage:
    """One training run: a data mixture, a step count and a peak learning rate.

    ``start`` is the model it fine-tunes (a copy of it; the first model of a variant
    starts from a fresh initialisation instead), ``trains`` the parameters it updates
    (``fnmatch`` patterns of parameter names; ``None``: all)."""

    name: str
    mixture: Sequence[tuple[float, Callable[[random.Random], Example]]]
    steps: int
    lr: float
    batch: int = 128
    warmup: float = 0.05
    start: str = "base"
    trains: tuple[str, ...] | None = None
    # "answers": cross-entropy on the answer tokens of (prompt, answer) examples;
    # "embeddings": the mixture yields (text, same-length target text) pairs and the hidden
    # state after ``depth`` layers of the first learns the input embeddings of the second
    objective: str = "answers"
    depth: int = 0


def _no_checks() -> Splits:
    return {}


@dataclass(frozen=True)
class ZooVariant:
    name: str
    summary: str  # one line, for ``evomerge zoo list`` and the CLI's help
    vocab: tuple[str, ...]  # the first four: <pad> <s> </s> <unk>
    architecture: Callable[[int], Any]  # vocabulary size -> a transformers config
    models: tuple[str, ...]  # the base first
    stages: Callable[[float], dict[str, Stage]]  # scale -> model name -> how it is trained
    evaluation_splits: Callable[[], Splits]  # the shipped tasks: split -> (prompt, answer)s
    target: str  # the split no source can do and a merge should
    heldout: str  # the target's held-out split
    task_prefix: str = "zoo_"  # task name = prefix + split
    task_folder: str = "zoo"  # evaluators/tasks/<folder>, named evomerge:<folder>
    # what each expert must master (split names, from evaluation_splits or checks)
    skills: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # splits scored in zoo.json beside the tasks but not shipped (a harmful expert's own skill)
    checks: Callable[[], Splits] = _no_checks
    descriptions: Mapping[str, str] = field(default_factory=dict)  # split -> a task's comment line
    # the models a layer-stacking study composes, in slot order (empty: every expert)
    stack: tuple[str, ...] = ()
    # the first zoo keeps its cache folder (v2-seed0) and settings key from before the family
    legacy: bool = False

    @property
    def tokens(self) -> Vocab:
        return vocab(self.vocab)

    @property
    def target_task(self) -> str:
        return self.task_prefix + self.target

    @property
    def heldout_task(self) -> str:
        return self.task_prefix + self.heldout

    def task(self, split: str) -> str:
        return self.task_prefix + split

    def folder_name(self, seed: int) -> str:
        """The cache folder's name (before any ``-scale`` suffix)."""
        stem = f"v{ZOO_VERSION}" if self.legacy else f"v{ZOO_VERSION}-{self.name}"
        return f"{stem}-seed{seed}"

    def config(self):  # type: ignore[no-untyped-def]
        return self.architecture(len(self.vocab))
