"""The merge-method interface.

A method's facts — its parameters (global ones, and per-model ones), whether it needs a
base, whether it is random or chunked — are its torch-free declaration's
(``search_spaces.merge_methods``); its class here merges one tensor at a time from a
:class:`MergeInputs`. Everything else — which tensors exist, which parameter value
applies to which tensor, reading and writing — is the engine's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch

# Torch-free, shared with the API process: re-exported so that imports from here work.
from search_spaces.method_declaration import REQUIRED, MergeError, MethodDeclaration, ParamSpec

V = TypeVar("V")


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


class _Declared(Generic[V]):
    """A method's fact, read from its class's ``declaration`` (never written on the class)."""

    def __init__(self, field_name: str) -> None:
        self.field_name = field_name

    def __get__(self, obj: object, owner: type) -> V:
        declaration = getattr(owner, "declaration", None)
        if declaration is None:
            raise AttributeError(f"{owner.__qualname__} has no declaration: decorate it with "
                                 "@workers.methods.implements(name)")
        return getattr(declaration, self.field_name)


class MergeMethod(ABC):
    """One merge method's arithmetic. Its facts (name, parameters, whether it needs a
    base, is random, chunked, fused…) are its :class:`MethodDeclaration`'s, bound by
    ``@workers.methods.implements(name)``; subclasses implement ``merge`` (and, when
    chunked, may implement ``prepare`` and ``merge_chunk``)."""

    declaration: ClassVar[MethodDeclaration | None] = None
    name: _Declared[str] = _Declared("name")
    description: _Declared[str] = _Declared("description")
    reference: _Declared[str] = _Declared("reference")
    needs_base: _Declared[bool] = _Declared("needs_base")
    base_is_input: _Declared[bool] = _Declared("base_is_input")
    min_models: _Declared[int] = _Declared("min_models")  # non-base inputs
    max_models: _Declared[int | None] = _Declared("max_models")
    is_random: _Declared[bool] = _Declared("random")
    # merged a block of rows at a time (workers.tensor_merge), see MethodDeclaration.chunked
    chunked: _Declared[bool] = _Declared("chunked")
    # one fused kernel per chunk: big chunks (CHUNK_ELEMENTS), else EAGER_CHUNK_ELEMENTS
    fused: _Declared[bool] = _Declared("fused")
    global_params: _Declared[tuple[ParamSpec, ...]] = _Declared("global_params")
    model_params: _Declared[tuple[ParamSpec, ...]] = _Declared("model_params")

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
        assert self.declaration is not None
        return self.declaration.describe()


__all__ = ["REQUIRED", "MergeError", "MergeInputs", "MergeMethod", "MethodDeclaration", "ParamSpec",
           "tensor_generator"]
