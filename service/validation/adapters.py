"""LoRA adapters among a study's sources: read from their headers with the other models, then,
once the base is known, checked against it (:func:`search_spaces.lora_adapter.check_against_base`)
and made a :class:`~service.validation.models.Model` that stands for the full model peft's
``merge_and_unload`` would make: the base's config and tensors, the adapter's folder and files.
Everything after (compatibility, the space, the memory plan) sees that model; the memory plan
counts it at the adapter's size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from search_spaces.lora_adapter import AdapterError, LoraAdapter, check_against_base
from service.model_headers import ModelHeaders
from service.spec import StudySpec
from service.validation.problems import Loc, Problems, Refusal


@dataclass
class AdapterSource:
    """An adapter as read, before its base is known."""

    loc: Loc
    given: str
    path: Path  # the real folder
    adapter: LoraAdapter
    files: list[Path]


def _stacking(spec: StudySpec) -> bool:
    """Whether the study's space takes layers from whole models (no base of task vectors)."""
    from search_spaces.registry import SPACES

    kind = spec.space.kind  # type: ignore[union-attr]
    return kind in SPACES and not SPACES.get(kind).task_vector_base


def _as_model(src: AdapterSource, base):  # base: Model (a forward reference: models imports us)
    from service.validation.models import Model, ResolvedModel

    info, headers = base.info, base.headers
    names = [info.given, info.ref, *([str(headers.path)] if headers.path is not None else [])]
    try:
        check_against_base(src.adapter, {n: h.shape for n, h in headers.tensors.items()},
                           base_names=names, base_given=info.given)
    except AdapterError as err:
        raise Refusal(err.msg, err.fix, err.kind) from None
    view = ModelHeaders(ref=src.given, path=src.path, config=headers.config, tensors=headers.tensors,
                        files=src.files)
    resolved = ResolvedModel(loc=src.loc, given=src.given, ref=str(src.path), origin="local",
                             path=str(src.path), model_type=info.model_type, num_layers=info.num_layers,
                             hidden_size=info.hidden_size, num_tensors=info.num_tensors, adapter_of=info.ref)
    return Model(resolved, view, str(src.path), adapter=src.adapter)


def attach_adapters(spec: StudySpec, read: list, problems: Problems) -> list:
    """``read`` (the sources, then the base when the spec names one: a Model, an
    :class:`AdapterSource` or None each) with every adapter made a Model over the study's base,
    or None with a problem. An adapter as the base is refused."""
    out = list(read)
    base = out[len(spec.sources)] if spec.base_model is not None else None
    if isinstance(base, AdapterSource):
        problems.add(["base_model"], f"base_model {base.given!r} is a PEFT LoRA adapter, not a full model",
                     "give the model the adapter was trained on as base_model, and the adapter as a source",
                     "model_is_adapter")
        out[len(spec.sources)] = base = None
    for i, item in enumerate(out[: len(spec.sources)]):
        if not isinstance(item, AdapterSource):
            continue
        out[i] = None
        if spec.base_model is None:
            problems.add(item.loc, f"source {item.given!r} is a LoRA adapter, and the study names no "
                         "base_model",
                         "name the model the adapter was trained on as base_model (its weights are that "
                         "base's plus the adapter's B·A·alpha/r)", "adapter_needs_base")
        elif _stacking(spec):
            problems.add(item.loc, f"source {item.given!r} is a LoRA adapter: layer stacking takes layers "
                         "from full models", "use kind: parameter, or merge the adapter into its base first "
                         "(peft's merge_and_unload) and give the merged model", "adapter_unsupported")
        elif base is not None:  # else the base has its own problem
            try:
                out[i] = _as_model(item, base)
            except Refusal as err:
                problems.refusal(item.loc, err)
    return out

