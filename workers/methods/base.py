"""The merge-method interface.

A method declares its parameters (global ones, and per-model ones) and merges one
tensor at a time from a :class:`MergeInputs`. Everything else — which tensors exist,
which parameter value applies to which tensor, reading and writing — is the engine's.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

REQUIRED = object()


class MergeError(ValueError):
    """A merge cannot proceed; the message names the model, tensor and parameter."""


@dataclass(frozen=True)
class ParamSpec:
    """A declared parameter: its type, default, valid range and meaning."""

    name: str
    kind: type
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """Coerce and validate one resolved value; ``where`` names model and tensor."""
        if self.kind is bool:
            if not isinstance(value, bool):
                raise MergeError(f"parameter {self.name!r} {where}: expected true/false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise MergeError(
                    f"parameter {self.name!r} {where}: {value!r} is not one of {list(self.choices or [])}"
                )
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise MergeError(f"parameter {self.name!r} {where}: expected a number, got {value!r}")
        value = self.kind(value)
        if not math.isfinite(value):
            raise MergeError(f"parameter {self.name!r} {where}: {value} is not a finite number")
        if self.minimum is not None and value < self.minimum:
            raise MergeError(
                f"parameter {self.name!r} {where}: {value} is below the minimum {self.minimum}"
            )
        if self.maximum is not None and value > self.maximum:
            raise MergeError(
                f"parameter {self.name!r} {where}: {value} is above the maximum {self.maximum}"
            )
        return value


@dataclass
class MergeInputs:
    """Everything a method needs to merge one tensor.

    ``base`` is the base model's tensor (None for methods without a base); ``tensors``
    are the other inputs in recipe order, with ``model_params`` resolved for each.
    All tensors are in the compute dtype. For a ``chunked`` method they are one block of
    rows of the tensor (``workers.tensor_merge``), and ``state`` is what the method's
    ``prepare`` found from the whole tensor. ``deltas`` may be supplied by a caller that
    cached the task vectors.
    """

    name: str
    base: torch.Tensor | None
    tensors: list[torch.Tensor]
    model_params: list[dict[str, Any]]
    global_params: dict[str, Any]
    seed: int = 0
    model_names: list[str] = field(default_factory=list)
    deltas: list[torch.Tensor] | None = None
    owned: bool = False  # the method may overwrite ``tensors`` (and ``deltas``) in place
    workspace: Any = None  # a workers.sparsify.Workspace of reusable scratch buffers
    out: torch.Tensor | None = None  # write the result here when the method can
    state: Any = None  # a chunked method's per-tensor facts, from its ``prepare``

    def task_vectors(self) -> list[torch.Tensor]:
        if self.deltas is not None:
            return self.deltas
        if self.base is None:
            raise MergeError(f"tensor {self.name}: this method needs a base_model")
        if self.owned:
            return [t.sub_(self.base) for t in self.tensors]
        return [t - self.base for t in self.tensors]


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator seeded by (recipe seed, tensor name, model index): a seed gives the
    same random masks on every device and in every memory tier."""
    import zlib

    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(f"{seed}/{name}/{index}".encode()) + (seed << 32))
    return g


class MergeMethod(ABC):
    """One merge method. Subclasses set the class attributes and implement ``merge``."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    needs_base: ClassVar[bool] = True
    base_is_input: ClassVar[bool] = False  # linear: the base, if listed, is an ordinary input
    min_models: ClassVar[int] = 1  # non-base inputs
    max_models: ClassVar[int | None] = None
    is_random: ClassVar[bool] = False
    # True when the output at each entry depends only on the inputs at that entry and on
    # per-tensor facts that ``prepare`` finds first: the engine then merges the tensor a
    # block of rows at a time, in a small float32 workspace (workers.tensor_merge).
    chunked: ClassVar[bool] = False
    # True when each chunk is one fused kernel (workers.kernels) whose temporaries stay in
    # registers: such a method takes big chunks (CHUNK_ELEMENTS); one that computes a chunk
    # eagerly (random draws, row ranks, residual scales) takes chunks that its float32
    # temporaries keep in the CPU's cache (EAGER_CHUNK_ELEMENTS)
    fused: ClassVar[bool] = False
    global_params: ClassVar[tuple[ParamSpec, ...]] = ()
    model_params: ClassVar[tuple[ParamSpec, ...]] = ()

    @abstractmethod
    def merge(self, inputs: MergeInputs) -> torch.Tensor:
        """Return the merged tensor (any float dtype; the engine casts it)."""

    def merge_chunk(self, inputs: Any, state: Any, j: int, r0: int, r1: int, out: Any,
                    ws: Any) -> torch.Tensor:
        """Merge chunk ``j`` (rows ``r0:r1``) of a chunked method's tensor into ``out`` (a
        ``workers.tensor_merge.ChunkOut``); return the chunk's float32 sum. By default
        ``merge`` runs on float32 copies of the chunk; a method with a fused kernel
        (``workers.kernels``) reads its inputs in their stored dtype instead."""
        from workers.tensor_merge import merge_chunk_eagerly

        return merge_chunk_eagerly(self, inputs, state, r0, r1, out, ws)

    def prepare(self, inputs: Any, ws: Any) -> Any:
        """A chunked method's per-tensor facts, found before the chunks are merged.

        ``inputs`` is a ``workers.tensor_merge.TensorInputs`` (the whole tensor's
        inputs, readable a chunk at a time); the result reaches ``merge`` as
        ``MergeInputs.state``. Most methods need nothing.
        """
        return None

    def describe(self) -> dict[str, Any]:
        def spec(p: ParamSpec) -> dict[str, Any]:
            return {
                "name": p.name,
                "type": p.kind.__name__,
                "default": None if p.required else p.default,
                "required": p.required,
                "range": [p.minimum, p.maximum],
                "help": p.help,
            }

        return {
            "name": self.name,
            "description": self.description,
            "reference": self.reference,
            "needs_base": self.needs_base,
            "random": self.is_random,
            "chunked": self.chunked,
            "global": [spec(p) for p in self.global_params],
            "per_model": [spec(p) for p in self.model_params],
        }

