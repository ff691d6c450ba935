"""The study's search space: the user's form of it completed with what the models give
(model lists, layer counts), then built, and the models' tokenizer checked."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, Union

from pydantic import ValidationError

from search_spaces.base import ResolvedSource, SearchSpace, SpaceProblem
from service.spec import DERIVED_FIELDS, StudySpec, problems_from_pydantic
from service.validation.models import (
    Model,
    SettingsLike,
    StudyModels,
    StudyResolver,
    check_compatible,
    resolve_models,
    tokenizer_ref,
)
from service.validation.problems import Loc, Problems

# dtype names the merge engine knows (workers.model_io.dtype_from_name; keep in step)
DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "half", "bfloat16", "bf16", "float64", "fp64")


def _map_space_loc(loc: Sequence[Union[str, int]]) -> Loc:
    """A location in the full space spec -> where the user wrote it."""
    loc = list(loc)
    if loc[:1] == ["sources"]:  # stacking: sources[i] is the study's sources[i] with its layer range
        return ["space", "layer_ranges", *loc[1:2]]
    if loc[:1] == ["models"]:
        return ["sources", *loc[1:2]]
    if loc[:1] == ["base_model"]:
        return ["base_model"]
    if loc[:1] == ["num_layers"] or not loc:
        return ["space"]
    return ["space", *loc]


def fill_space_spec(spec: StudySpec, sources: list[Model], base: Model | None,
                    aliases: Mapping[str, str], problems: Problems) -> dict[str, Any] | None:
    """The full space spec: the user's form with the derived fields filled in from the models."""
    form = spec.space
    kind = form.kind  # type: ignore[union-attr]
    if kind not in DERIVED_FIELDS:
        problems.add(["space", "kind"], f"space kind {kind!r} is not supported by the service",
                     f"use kind: {' or kind: '.join(sorted(DERIVED_FIELDS))}", "unknown_space_kind")
        return None
    # what the user wrote: the space spec fills in its own defaults (some depend on the method)
    data = form.model_dump(exclude={*DERIVED_FIELDS[kind], "layer_ranges"}, exclude_unset=True)
    data.setdefault("kind", kind)
    tok = data.get("tokenizer_source")
    if tok not in (None, "base"):
        if tok in aliases:
            data["tokenizer_source"] = aliases[tok]
        else:
            problems.add(["space", "tokenizer_source"],
                         f"tokenizer_source {tok!r} is not one of the study's models",
                         "write 'base', or a model exactly as it appears in sources / base_model",
                         "unknown_model")
            return None
    from search_spaces.registry import space_class

    try:
        return space_class(kind).derive(data, form, [_resolved(m) for m in sources],
                                        _resolved(base) if base is not None else None)
    except SpaceProblem as p:
        problems.add(p.loc, p.msg, p.fix, p.type)
        return None


def _resolved(m: Model) -> ResolvedSource:
    return ResolvedSource(spec_ref=m.spec_ref, ref=m.info.ref, num_layers=m.info.num_layers,
                          loc=tuple(m.info.loc), given=m.info.given)


def check_dtypes(spec: StudySpec, problems: Problems) -> None:
    for key in ("dtype", "out_dtype"):
        value = getattr(spec.space, key, None)
        if value is not None and value not in DTYPE_NAMES:
            close = difflib.get_close_matches(str(value), DTYPE_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.add(["space", key], f"unknown dtype {value!r}{hint}",
                         "use float32, bfloat16, float16 or float64", "unknown_dtype")


def _build_space(data: dict[str, Any], problems: Problems) -> SearchSpace | None:
    from search_spaces.registry import build_space

    try:
        space = build_space(data)
    except ValidationError as err:
        for p in problems_from_pydantic(err):
            problems.add(_map_space_loc(p.loc), p.msg, "change the space as the message says",
                         "space_invalid")
        return None
    except ValueError as err:
        problems.add(["space"], str(err), "change the space as the message says", "space_invalid")
        return None
    if space.dimension < 1:
        problems.add(["space"], "the space has no genes: there is nothing to search",
                     "search at least one parameter (e.g. search_density: true, or scales)", "space_empty")
        return None
    return space



def models_and_space(spec: StudySpec, settings: SettingsLike, problems: Problems,
                     resolve_study_ref: StudyResolver | None) -> StudyModels:
    """The models read and checked against one another, and the space built over them."""
    sources, base = resolve_models(spec, settings, problems, resolve_study_ref)
    out = StudyModels(sources, base)
    kind = spec.space.kind  # type: ignore[union-attr]
    present = [m for m in sources if m is not None]
    group = ([base] if base is not None else []) + present
    from search_spaces.registry import space_class

    if (base is not None and space_class(kind).base_may_be_source
            and any(m.info.ref == base.info.ref for m in present)):
        group = present
    n_before = len(problems.items)
    if group:
        check_compatible(kind, group, problems)  # among the models that could be read
    models_ok = len(present) == len(sources) and (spec.base_model is None or base is not None)
    if len(problems.items) == n_before and models_ok and not problems.under(["space"]):
        out.space_data = fill_space_spec(spec, present, base, out.aliases, problems)
        if out.space_data is not None:
            out.space = _build_space(out.space_data, problems)
    for m in out.resolved:
        if m.headers.has_remote_code and not spec.trust_remote_code:
            out.warnings.append(
                f"model {m.info.given!r} names custom code in config.json (auto_map); evomerge loads it "
                f"with transformers' own {m.info.model_type} class and never runs that code")
    tokenizer = tokenizer_ref(out)
    tok_model = next((m for m in out.resolved if m.info.ref == tokenizer), None)
    if tok_model is not None and tok_model.headers.has_tokenizer is False:
        chosen = out.space_data and out.space_data.get("tokenizer_source") not in (None, "base")
        problems.add(["space", "tokenizer_source"] if chosen else tok_model.info.loc,
                     f"model {tok_model.info.given!r} has no tokenizer files (tokenizer.json, "
                     "tokenizer_config.json, tokenizer.model or vocab.json); candidates are scored with "
                     "its tokenizer",
                     "copy the tokenizer files into that folder, or set space.tokenizer_source to a model "
                     "that has them", "no_tokenizer")
    return out

