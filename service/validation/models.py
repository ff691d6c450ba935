"""The study's models: each reference resolved (a folder under the roots, an allowed hub id, or
another study's model), its headers read, and the models checked against one another."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Union

from pydantic import BaseModel, Field

from search_spaces.base import SearchSpace
from search_spaces.lora_adapter import LoraAdapter, is_adapter_folder
from search_spaces.sources import StudyRef
from service.adapter_headers import read_adapter_folder
from service.model_headers import ModelFormatError, ModelHeaders, read_hub_model, read_model_folder
from service.spec import StudySpec
from service.validation.adapters import AdapterSource, attach_adapters
from service.validation.paths import close_entries, real_roots, resolve_under_roots, roots_text
from service.validation.problems import Loc, Problems, Refusal

StudyResolver = Callable[[StudyRef], Union[str, Path]]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class SettingsLike(Protocol):
    """What validation needs from the server's settings (``service.settings``)."""

    model_roots: Sequence[Path]
    hub_allowlist: Sequence[str]
    trust_remote_code: bool


class ResolvedModel(BaseModel):
    """A model of the study as validation found it."""

    loc: Loc = Field(description="where the spec names it: ['sources', i] or ['base_model']")
    given: str = Field(description="as the spec wrote it (a study reference as its placeholder)")
    ref: str = Field(description="how recipes and workers name it: a real path, a hub id or a placeholder")
    origin: Literal["local", "hub", "study"]
    path: str | None = Field(description="the local folder read (hub: the cached snapshot, if any)")
    model_type: str
    num_layers: int
    hidden_size: int | None
    num_tensors: int
    adapter_of: str | None = Field(
        default=None, description="a PEFT LoRA adapter: the base it is composed onto (its ref); None: a "
        "model")


@dataclass
class Model:
    """A model as read: what validation reports of it, its headers, and how the space names it.
    A LoRA adapter's headers are its base's config and tensors (the full model it stands for)."""

    info: ResolvedModel
    headers: ModelHeaders
    spec_ref: Union[str, StudyRef]  # what the space spec names it by
    adapter: LoraAdapter | None = None


def _allowed_hub(repo_id: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(repo_id, p) for p in patterns)


def _resolve_model(loc: Loc, ref: Union[str, StudyRef], settings: SettingsLike, roots: list[Path],
                   resolve_study_ref: StudyResolver | None) -> Model | AdapterSource:
    if isinstance(ref, StudyRef):
        return _resolve_study(loc, ref, resolve_study_ref)
    text = ref
    path = Path(text)
    local = path.is_absolute() or any(os.path.lexists(r / path) for r in roots)
    if not local and _HUB_ID.match(text) and ".." not in text:
        allowlist = list(getattr(settings, "hub_allowlist", []) or [])
        if not _allowed_hub(text, allowlist):
            raise Refusal(
                f"{text!r} is not a folder under the model roots ({roots_text(roots)}), and as a hub id it "
                f"is not in the allowlist EVOMERGE_HUB_ALLOWLIST ({', '.join(allowlist) or 'empty'})."
                f"{close_entries(text, roots)}",
                "for a local model, check the path (relative paths are relative to a model root); for a hub "
                "model, ask an administrator to add it to EVOMERGE_HUB_ALLOWLIST (fnmatch patterns such "
                "as 'org/*')",
                "hub_not_allowed",
            )
        headers = read_hub_model(text, cache_dir=getattr(settings, "hub_cache_dir", None))
        info = _info(loc, text, text, "hub", headers)
        return Model(info, headers, text)
    real = resolve_under_roots(text, roots)
    if is_adapter_folder(real):  # its base is known later (attach_adapters)
        adapter, files = read_adapter_folder(real, text, allowed=roots)
        return AdapterSource(loc, text, real, adapter, files)
    headers = read_model_folder(real, ref=text, allowed=roots)  # each file checked before it is opened
    info = _info(loc, text, str(real), "local", headers)
    return Model(info, headers, str(real))


def _resolve_study(loc: Loc, ref: StudyRef, resolve_study_ref: StudyResolver | None) -> Model:
    placeholder = ref.placeholder()
    if resolve_study_ref is None:
        raise Refusal(
            f"{placeholder} names another study's model, which only the server's controller can resolve",
            "submit the study to the server (POST /studies), which knows the other studies",
            "study_ref_unresolved",
        )
    try:
        folder = Path(resolve_study_ref(ref))
    except (LookupError, ValueError, OSError) as err:
        raise Refusal(
            f"{placeholder} cannot be used: {err}",
            f"name a study that exists and is finished (its model exported); trial is 'best' or a trial "
            f"number of study {ref.study!r}",
            "study_ref_invalid",
        ) from None
    headers = read_model_folder(folder, ref=placeholder)
    return Model(_info(loc, placeholder, placeholder, "study", headers), headers, ref)


def _info(loc: Loc, given: str, ref: str, origin: str, headers: ModelHeaders) -> ResolvedModel:
    return ResolvedModel(
        loc=loc, given=given, ref=ref, origin=origin,  # type: ignore[arg-type]
        path=str(headers.path) if headers.path is not None else None,
        model_type=headers.model_type, num_layers=headers.num_layers, hidden_size=headers.hidden_size,
        num_tensors=len(headers.tensors),
    )


def resolve_models(spec: StudySpec, settings: SettingsLike, problems: Problems,
                   resolve_study_ref: StudyResolver | None) -> tuple[list[Model | None], Model | None]:
    """The study's sources and base as read (None where one cannot be), with a problem each."""
    roots = real_roots(getattr(settings, "model_roots", []) or [])
    named: list[tuple[Loc, Union[str, StudyRef]]] = [(["sources", i], s) for i, s in enumerate(spec.sources)]
    if spec.base_model is not None:
        named.append((["base_model"], spec.base_model))
    read: list[Model | AdapterSource | None] = []
    for loc, ref in named:
        try:
            read.append(_resolve_model(loc, ref, settings, roots, resolve_study_ref))
        except (Refusal, ModelFormatError) as err:
            problems.refusal(loc, err)
            read.append(None)
    out: list[Model | None] = attach_adapters(spec, read, problems)
    seen: dict[str, Loc] = {}
    for m in out[: len(spec.sources)]:
        if m is None:
            continue
        if m.info.ref in seen:
            first = ".".join(map(str, seen[m.info.ref]))
            problems.add(m.info.loc, f"{m.info.given!r} is the same model as {first}",
                         "list each model once (stacking reuses layers with space.repeats)",
                         "duplicate_model")
        seen.setdefault(m.info.ref, m.info.loc)
    base = out[len(spec.sources)] if spec.base_model is not None else None
    return out[: len(spec.sources)], base


# ---- compatibility ---------------------------------------------------------------------
def _tensor_diffs(ref: Mapping[str, Any], other: Mapping[str, Any]) -> list[str]:
    diffs = [f"{n} missing" for n in sorted(set(ref) - set(other))]
    diffs += [f"{n} extra" for n in sorted(set(other) - set(ref))]
    diffs += [f"{n} {list(other[n].shape)} vs {list(ref[n].shape)}"
              for n in sorted(set(ref) & set(other)) if ref[n].shape != other[n].shape]
    return diffs


def _diff_text(diffs: list[str]) -> str:
    shown = "; ".join(diffs[:3])
    return f"{shown}{f'; and {len(diffs) - 3} more' if len(diffs) > 3 else ''}"


def _compatibility(kind: str) -> str:
    """What the models of a space of ``kind`` must share (``SearchSpace.compatibility``)."""
    from search_spaces.registry import SPACES

    return SPACES.get(kind).compatibility if kind in SPACES else SearchSpace.compatibility


def check_compatible(kind: str, models: list[Model], problems: Problems) -> None:
    """The first model is the reference (the base for a parameter space); what the models must
    share is what the space of ``kind`` declares."""
    same_tensors = _compatibility(kind) == "tensors"
    ref = models[0]
    for other in models[1:]:
        a, b = ref.info, other.info
        if a.ref == b.ref:
            continue
        if a.model_type != b.model_type:
            problems.add(
                b.loc, f"model {b.given!r} is a {b.model_type} model, {a.given!r} a {a.model_type} model",
                "merge models of one architecture"
                + (" fine-tuned from one base" if same_tensors else ""), "models_incompatible")
            continue
        if same_tensors:
            diffs = _tensor_diffs(ref.headers.comparable_tensors(), other.headers.comparable_tensors())
            if diffs:
                problems.add(
                    b.loc, f"model {b.given!r} does not match {a.given!r} tensor for tensor "
                    f"({len(diffs)} difference(s): {_diff_text(diffs)})",
                    "a parameter-space merge needs identical tensor names and shapes (models fine-tuned from "
                    "the same base); for models that only share an architecture and width use kind: stacking",
                    "models_incompatible")
            continue
        if a.hidden_size != b.hidden_size:
            problems.add(b.loc,
                         f"model {b.given!r} has hidden size {b.hidden_size}, {a.given!r} {a.hidden_size}",
                         "layer stacking needs one hidden size (layer counts may differ)",
                         "models_incompatible")
            continue
        diffs = _tensor_diffs(ref.headers.layer_tensors(), other.headers.layer_tensors())
        if diffs:
            problems.add(
                b.loc, f"the layers of {b.given!r} differ from those of {a.given!r} "
                f"({len(diffs)} difference(s) in a layer: {_diff_text(diffs)})",
                "layer stacking needs layers that fit into one another: one architecture and width",
                "models_incompatible")


@dataclass
class StudyModels:
    """The study's models as read, and the space built over them (None where they fail)."""

    sources: list[Model | None]
    base: Model | None
    space: SearchSpace | None = None
    space_data: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def resolved(self) -> list[Model]:
        return [m for m in [*self.sources, self.base] if m is not None]

    @property
    def aliases(self) -> dict[str, str]:
        """Model names as the user may write them (in x0, tokenizer_source) -> as the space names them."""
        return {name: m.info.ref for m in self.resolved for name in (m.info.given, m.info.ref)}


def tokenizer_ref(models: StudyModels) -> str | None:
    """The model whose tokenizer scores the candidates (the recipe's tokenizer source)."""
    tok = (models.space_data or {}).get("tokenizer_source")
    if tok not in (None, "base"):
        return str(tok)
    owner = models.base if models.base is not None else (models.sources[0] if models.sources else None)
    return owner.info.ref if owner is not None else None

