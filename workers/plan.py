"""Planning a merge: which output tensors exist, where each one's inputs come from, and
which parameter values apply to it. A plan is computed from file headers only (no
weights are read), so every error — unknown method, missing or mis-shaped tensor, bad
parameter — is found before any work is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from search_spaces.lora_adapter import is_adapter_folder
from search_spaces.recipe import ModelEntry, Recipe, Slice, SliceSource
from workers import methods, params
from workers.architecture import ModelLayout, find_layout, layer_count_keys
from workers.lora import mergekit_lora_ref, open_model
from workers.methods.base import MergeError, MergeMethod
from workers.model_io import LazyModel, dtype_from_name, tensor_nbytes
from workers.plan_params import check_input_count, check_known_params, resolve_tensor_params


@dataclass(frozen=True)
class TensorSource:
    model: str  # model reference as written in the recipe
    name: str  # tensor name in that model
    alias_of: str | None = None  # served by another tensor (tied embeddings)


@dataclass
class TensorTask:
    """One output tensor: its inputs and resolved parameters."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    base: TensorSource | None
    inputs: list[TensorSource]
    model_params: list[dict[str, Any]]
    global_params: dict[str, Any]
    residual_scale: float | None = None
    unit_offset: bool = False
    layer: int | None = None  # output layer index, None for non-layer tensors

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass
class MergePlan:
    recipe: Recipe
    method: MergeMethod
    models: dict[str, LazyModel]
    layouts: dict[str, ModelLayout]
    tasks: list[TensorTask]
    config_source: str
    tokenizer_source: str
    num_layers: int
    out_dtype: torch.dtype
    read_dtype: torch.dtype | None
    layer_origins: list[tuple[str, int]] = field(default_factory=list)
    tied_head: bool = False


def dominant_dtype(model: LazyModel) -> torch.dtype:
    """The floating dtype that holds most of a model's bytes (float32 when it has none)."""
    counts: dict[torch.dtype, int] = {}
    for info in model.tensors.values():
        if info.dtype.is_floating_point:
            counts[info.dtype] = counts.get(info.dtype, 0) + info.nbytes
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def check_slice_sources(sl: Slice, layouts: dict[str, ModelLayout]) -> None:
    """Every source of a slice has the layers it names, laid out like the first source's."""
    ref0 = sl.sources[0].model
    suffixes = layouts[ref0].layer_suffixes
    for src in sl.sources:
        lay = layouts[src.model]
        if src.layer_range[1] > lay.num_layers:
            raise MergeError(
                f"slice source {src.model!r}: layer_range {list(src.layer_range)} goes "
                f"past its {lay.num_layers} layers"
            )
        if lay.layer_suffixes != suffixes:
            raise MergeError(
                f"models {ref0!r} and {src.model!r} have different layer structures "
                "and cannot be merged layer by layer"
            )


class Planner:
    """Builds a :class:`MergePlan` from a recipe."""

    def __init__(self, recipe: Recipe, models: dict[str, LazyModel] | None = None):
        self.recipe = recipe
        self.method = methods.get(recipe.merge_method)
        self.models = models or {}
        self.layouts: dict[str, ModelLayout] = {}

    # ---- models ------------------------------------------------------------------
    def _load(self, ref: str) -> LazyModel:
        if ref not in self.models:
            pair = mergekit_lora_ref(ref)  # mergekit's base+adapter
            if pair is not None:
                self.models[ref] = open_model(pair[1], self._load(pair[0]), ref=ref)  # type: ignore[assignment]
            else:
                adapter = is_adapter_folder(Path(ref).expanduser())
                base = self._load(self._adapter_base(ref)) if adapter else None
                self.models[ref] = open_model(ref, base)  # type: ignore[assignment]
        model = self.models[ref]
        if ref not in self.layouts:
            self.layouts[ref] = find_layout(list(model.tensors), model.config, ref)
        return model

    def _adapter_base(self, ref: str) -> str:
        """The model a LoRA adapter of the recipe is composed onto: the recipe's base_model."""
        bases = {sl.base_model for sl in self.recipe.slices or [] if sl.base_model}
        base = self.recipe.base_model or (bases.pop() if len(bases) == 1 else None)
        if base is None or base == ref:
            raise MergeError(f"model {ref!r} is a PEFT LoRA adapter: name the model it was trained on as the "
                             "recipe's base_model (its weights are that base's plus B·A·alpha/r)")
        return base

    def _info(self, ref: str, name: str) -> TensorSource:
        """Where ``name`` lives in model ``ref``, following tied-embedding aliases."""
        model = self.models[ref]
        if name in model.tensors:
            return TensorSource(ref, name)
        layout = self.layouts[ref]
        if name.endswith(("lm_head.weight", "embed_out.weight")) and layout.embed_name:
            if layout.tied_head is not None or model.tie_word_embeddings:
                return TensorSource(ref, layout.embed_name, alias_of=name)
        raise MergeError(
            f"model {ref!r} has no tensor {name!r}; the models of a merge must share an "
            "architecture (check that every model is of the same family and size)"
        )

    # ---- plan --------------------------------------------------------------------
    def plan(self) -> MergePlan:
        recipe, method = self.recipe, self.method
        check_known_params(method, recipe)
        for ref in recipe.referenced_models():
            self._load(ref)
        slices = self._slices()
        base_ref = recipe.base_model
        if method.needs_base and not base_ref:
            raise MergeError(
                f"{method.name} needs a base_model: name the model the others were fine-tuned from"
            )
        if any(s.scale is not None for sl in slices for s in sl.sources) and method.name != "passthrough":
            raise MergeError("'scale' on a slice source is for passthrough (layer stacking) only")

        out_dtype = dtype_from_name(recipe.out_dtype or recipe.dtype)
        read_dtype = dtype_from_name(recipe.dtype)
        first_ref = base_ref or slices[0].sources[0].model
        if out_dtype is None:
            out_dtype = dominant_dtype(self.models[first_ref])

        tasks: list[TensorTask] = []
        origins: list[tuple[str, int]] = []
        first_sources = self._edge_sources(slices[0])
        last_sources = self._edge_sources(slices[-1])
        layout0 = self.layouts[first_ref]

        # tensors before the layers (embeddings)
        for name in layout0.pre_names:
            tasks.append(self._task(name, name, first_sources, slices[0], None, Fraction(0)))
        out_layer = 0
        for sl in slices:
            out_layer = self._add_slice_tasks(sl, out_layer, layout0.layer_prefix, tasks, origins)
        # tensors after the layers (final norm, head)
        post = list(layout0.post_names)
        head_from_alias = False
        if layout0.tied_head and any(
            self.layouts[r].tied_head is None for r, _n, _s in last_sources
        ):
            post.append(layout0.tied_head)  # some source has its own head: write one
            head_from_alias = True
        for name in post:
            tasks.append(self._task(name, name, last_sources, slices[-1], None, Fraction(0)))

        for task in tasks:
            if task.dtype.is_floating_point:
                task.dtype = out_dtype
        tok = recipe.tokenizer_source
        tok_ref = base_ref or first_ref if tok in (None, "base") else tok
        if tok_ref not in self.models:
            self._load(tok_ref)
        return MergePlan(
            recipe=recipe,
            method=method,
            models=self.models,
            layouts=self.layouts,
            tasks=tasks,
            config_source=first_ref,
            tokenizer_source=tok_ref,
            num_layers=out_layer,
            out_dtype=out_dtype,
            read_dtype=read_dtype,
            layer_origins=origins,
            tied_head=layout0.tied_head is not None and not head_from_alias,
        )

    def _add_slice_tasks(
        self,
        sl: Slice,
        out_layer: int,
        layer_prefix: str,
        tasks: list[TensorTask],
        origins: list[tuple[str, int]],
    ) -> int:
        """Append the tasks of one slice's layers (and where each output layer came from);
        return the index of the next output layer."""
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        ref0 = sl.sources[0].model
        suffixes = self.layouts[ref0].layer_suffixes
        check_slice_sources(sl, self.layouts)
        scale_targets = {}
        if any(s.scale is not None for s in sl.sources):
            scale_targets = dict(
                self.layouts[ref0].residual_scale_targets(self.models[ref0].model_type)
            )
        for offset in range(length):
            pos = params.layer_position(offset, length)
            out_prefix = f"{layer_prefix}.{out_layer}."
            for suffix in suffixes:
                srcs = [
                    (s.model, self.layouts[s.model].layer_name(s.layer_range[0] + offset, suffix), s)
                    for s in sl.sources
                ]
                task = self._task(out_prefix + suffix, suffix, srcs, sl, out_layer, pos)
                if suffix in scale_targets and sl.sources[0].scale is not None:
                    task.residual_scale = sl.sources[0].scale
                    task.unit_offset = scale_targets[suffix]
                tasks.append(task)
            origins.append((sl.sources[0].model, sl.sources[0].layer_range[0] + offset))
            out_layer += 1
        return out_layer

    def _slices(self) -> list[Slice]:
        """The recipe as slices: a ``models`` recipe is one slice over all layers."""
        recipe = self.recipe
        if recipe.slices is not None:
            return recipe.slices
        assert recipe.models is not None
        refs = [m.model for m in recipe.models]
        if recipe.base_model and recipe.base_model not in refs and not self.method.base_is_input:
            refs = [recipe.base_model, *refs]
        counts = {r: self.layouts[r].num_layers for r in refs}
        if len(set(counts.values())) > 1:
            raise MergeError(
                "the models have different layer counts "
                + ", ".join(f"{r}: {n}" for r, n in counts.items())
                + "; use 'slices' to say which layers to combine"
            )
        n = next(iter(counts.values()))
        return [Slice(sources=[SliceSource(model=r, layer_range=(0, n)) for r in refs])]

    def _entry(self, ref: str) -> ModelEntry | None:
        return next((m for m in self.recipe.models or [] if m.model == ref), None)

    def _edge_sources(self, sl: Slice) -> list[tuple[str, str, SliceSource | None]]:
        """Inputs of the non-layer tensors: the slice's sources, or for passthrough the
        base model when one is named (it then owns embeddings, final norm and head)."""
        if self.method.name == "passthrough" and self.recipe.base_model:
            return [(self.recipe.base_model, "", None)]
        return [(s.model, "", s) for s in sl.sources]

    def _task(
        self,
        out_name: str,
        lookup: str,
        sources: list[tuple[str, str, SliceSource | None]],
        sl: Slice,
        layer: int | None,
        pos: Fraction,
    ) -> TensorTask:
        method = self.method
        base_ref = sl.base_model or self.recipe.base_model
        base_src: TensorSource | None = None
        inputs: list[TensorSource] = []
        scopes: list[list[dict | None]] = []
        names: list[str] = []
        for ref, name, src in sources:
            ts = self._info(ref, name or lookup)
            entry = self._entry(ref)
            if ref == base_ref and not method.base_is_input:
                base_src = ts
                continue
            inputs.append(ts)
            names.append(ref)
            scopes.append([
                src.parameters if src else None,
                entry.parameters if entry else None,
                sl.parameters,
                self.recipe.parameters,
            ])
        if method.needs_base and base_src is None:
            raise MergeError(
                f"{method.name}: base_model {base_ref!r} must be one of the slice's sources"
                if self.recipe.slices
                else f"{method.name} needs a base_model"
            )
        check_input_count(method, len(inputs))
        model_params, global_params = resolve_tensor_params(
            method, scopes, [sl.parameters, self.recipe.parameters], out_name, pos, names
        )
        # shapes must agree
        all_srcs = ([base_src] if base_src else []) + inputs
        shapes = {s.model: self.models[s.model].tensors[s.name].shape for s in all_srcs}
        if len(set(shapes.values())) > 1:
            raise MergeError(
                f"tensor {out_name}: shapes differ between models: "
                + ", ".join(f"{m}: {list(s)}" for m, s in shapes.items())
            )
        first = all_srcs[0]
        info = self.models[first.model].tensors[first.name]
        return TensorTask(
            name=out_name,
            shape=info.shape,
            dtype=info.dtype,
            base=base_src,
            inputs=inputs,
            model_params=model_params,
            global_params=global_params,
            layer=layer,
        )


def build_plan(recipe: Recipe, models: dict[str, LazyModel] | None = None) -> MergePlan:
    return Planner(recipe, models).plan()


def patched_config(plan: MergePlan) -> dict[str, Any]:
    """The config of the merged model: layer count, dtype and tying patched."""
    import copy

    src = plan.models[plan.config_source]
    config = copy.deepcopy(src.config)
    for key in layer_count_keys(config):
        target = config
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = plan.num_layers
    # per-layer lists (e.g. layer_types) follow the layers they came from
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == src.config.get("num_hidden_layers", -1):
            new = []
            for ref, idx in plan.layer_origins:
                origin = plan.models[ref].config.get(key)
                new.append(origin[idx] if isinstance(origin, list) and idx < len(origin) else value[0])
            config[key] = new
    name = str(plan.out_dtype).removeprefix("torch.")
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    if any(t.name.endswith(("lm_head.weight", "embed_out.weight")) for t in plan.tasks):
        if config.get("tie_word_embeddings", False) and not plan.tied_head:
            config["tie_word_embeddings"] = False
    return config
