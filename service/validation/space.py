"""The study's search space: the user's form of it completed with what the models give
(model lists, layer counts), then built, and the models' tokenizer checked."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from pydantic import ValidationError

from search_spaces.base import SearchSpace
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
    fill = _FILLERS.get(kind, _fill_declared)
    if kind not in DERIVED_FIELDS:
        problems.add(["space", "kind"], f"space kind {kind!r} is not supported by the service",
                     f"use kind: {' or kind: '.join(_FILLERS)}", "unknown_space_kind")
        return None
    data = form.model_dump(exclude={*DERIVED_FIELDS[kind], "layer_ranges"})
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
    return fill(data, form, sources, base, problems)


def _fill_parameter(data: dict[str, Any], form: Any, sources: list[Model], base: Model | None,
                    problems: Problems) -> dict[str, Any] | None:
    """A parameter space merges the sources against the base, layer by layer of the base."""
    from search_spaces.parameter_space import METHODS

    info = METHODS[data["method"]]
    if info.needs_base and base is None:
        problems.add(["base_model"],
                     f"{data['method']} merges task vectors against a base: base_model is missing",
                     "set base_model to the model the sources were fine-tuned from (or use method: "
                     "linear)", "missing_base_model")
        return None
    if info.needs_base and base is not None:
        for m in sources:
            if m.info.ref == base.info.ref:
                problems.add(m.info.loc,
                             f"{m.info.given!r} is the base model; the base is not a merged source",
                             "remove it from sources (it stays base_model)", "base_among_sources")
                return None
    ref = base or sources[0]
    data.update(models=[m.spec_ref for m in sources], base_model=base.spec_ref if base else None,
                num_layers=ref.info.num_layers)
    return data


def _fill_stacking(data: dict[str, Any], form: Any, sources: list[Model], base: Model | None,
                   problems: Problems) -> dict[str, Any] | None:
    """A stacking space takes each source with its layer count and the user's layer range."""
    ranges = form.layer_ranges
    if ranges is not None and len(ranges) != len(sources):
        problems.add(["space", "layer_ranges"],
                     f"layer_ranges has {len(ranges)} entries for {len(sources)} sources",
                     "give one entry per source, in the order of sources (null: all its layers)",
                     "layer_ranges_mismatch")
        return None
    data.update(
        sources=[{"model": m.spec_ref, "num_layers": m.info.num_layers,
                  "layer_range": ranges[i] if ranges else None} for i, m in enumerate(sources)],
        base_model=base.spec_ref if base else None,
    )
    return data


# How the service fills in each space kind's derived fields (``SearchSpace.derived_fields``).
_FILLERS: dict[str, Callable[..., dict[str, Any] | None]] = {
    "parameter": _fill_parameter,
    "stacking": _fill_stacking,
}

# What the service fills in for a derived field of any other kind (a space plugin), by the
# field's name: the merged models, the base and the layer count, as a parameter space gets them.
_DERIVED_VALUES: dict[str, Callable[[list[Model], Model | None], Any]] = {
    "models": lambda sources, base: [m.spec_ref for m in sources],
    "base_model": lambda sources, base: base.spec_ref if base is not None else None,
    "num_layers": lambda sources, base: (base or sources[0]).info.num_layers,
}


def _fill_declared(data: dict[str, Any], form: Any, sources: list[Model], base: Model | None,
                   problems: Problems) -> dict[str, Any] | None:
    """A space kind without a filler of its own: each derived field it declares, by its name."""
    kind = form.kind
    unknown = [f for f in DERIVED_FIELDS[kind] if f not in _DERIVED_VALUES]
    if unknown:
        problems.add(["space", "kind"], f"space kind {kind!r} derives {', '.join(unknown)} from the study's "
                     "models, which the service cannot fill in",
                     f"a space's derived fields are among: {', '.join(_DERIVED_VALUES)}",
                     "unknown_space_kind")
        return None
    data.update({f: _DERIVED_VALUES[f](sources, base) for f in DERIVED_FIELDS[kind]})
    return data


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
    if kind == "stacking" and base is not None and any(m.info.ref == base.info.ref for m in present):
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

