"""The user's form of a study's models and search space.

A space spec (``search_spaces``) holds everything its space needs, including what the
service derives from the study's models (layer counts, the model lists). The user's form
of it leaves those derived fields out: each space declares them
(``SearchSpace.derived_fields``), and :mod:`service.validation.space` fills them in.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, create_model, field_validator
from pydantic.json_schema import SkipJsonSchema

from search_spaces import registry as space_registry
from search_spaces.sources import StudyRef


# ---- sources ---------------------------------------------------------------------------
def _source_tag(value: Any) -> str | None:
    if isinstance(value, str):
        return "path-or-hub-id"
    if isinstance(value, (Mapping, StudyRef)):
        return "study-reference"
    return None


ModelPath = Annotated[str, Field(min_length=1, max_length=4096)]
SourceRef = Annotated[
    Union[Annotated[ModelPath, Tag("path-or-hub-id")], Annotated[StudyRef, Tag("study-reference")]],
    Discriminator(
        _source_tag,
        custom_error_type="invalid_source",
        custom_error_message="a model is a path (under the model roots), a hub id 'org/name', or "
        "{study: <id>, trial: best}",
    ),
]


# ---- derived fields ----------------------------------------------------------------------
# The derived fields of a space whose class does not declare ``derived_fields`` yet. The one
# place this value is kept until search_spaces/parameter_space.py declares it on its class.
_DERIVED_HINTS = {
    "models": "the merged models are the study's `sources`: list them there",
    "base_model": "the base model is the study's `base_model`: set it there",
    "num_layers": "layer counts are read from the models' config.json and weights: remove it",
    "sources": "the stacked models are the study's `sources` (in slot order); give per-source layer "
    "ranges as space.layer_ranges",
}
_DEFAULT_HINT = "the service derives it from the study's models: remove it"


def derived_fields(kind: str) -> tuple[str, ...] | None:
    """The fields of a space kind's spec that the service derives from the study's models, as the
    space declares them; None when the space declares none (the service cannot run such a space,
    and validation says so)."""
    declared = space_registry.space_class(kind).derived_fields
    return tuple(declared) if declared is not None else None


# What the service derives from the models, per space kind (the user leaves it out): every
# registered kind that declares it. Kept in step with the registry by sync_space_forms().
DERIVED_FIELDS: dict[str, tuple[str, ...]] = {}


def _refuse_derived(cls: type, value: Any, info: Any) -> Any:
    if value is not None:
        raise ValueError(f"`{info.field_name}` is not part of a study's space: "
                         f"{_DERIVED_HINTS.get(info.field_name, _DEFAULT_HINT)}")
    return value


# ---- the user's form of a search space --------------------------------------------------
def _space_form(kind: str, spec_class: type[BaseModel]) -> type[BaseModel]:
    """The user's form of a space spec: the spec's fields minus the derived ones.

    Generated from the registered spec class, so a new field of a space appears here
    (with its description and constraints) without a change to this module.
    """
    derived = DERIVED_FIELDS.get(kind, ())
    fields: dict[str, Any] = {}
    for name, info in spec_class.model_fields.items():
        if name in derived:
            fields[name] = (SkipJsonSchema[Union[Any, None]], Field(default=None, exclude=True))
        elif name == "kind":  # the discriminator: required in the user's form (and in its schema)
            fields[name] = (info.annotation, Field(description=f"the space's kind: {kind!r}"))
        else:
            fields[name] = (info.annotation, copy.copy(info))
    validators: dict[str, Any] = {}
    if derived:
        validators["_refuse_derived"] = field_validator(*derived, mode="before")(classmethod(_refuse_derived))
    for vname, dec in spec_class.__pydantic_decorators__.field_validators.items():
        if not set(dec.info.fields) & set(derived):  # the spec's own field checks, e.g. the method name
            validators[vname] = field_validator(*dec.info.fields, mode=dec.info.mode)(
                classmethod(dec.func.__func__)
            )
    for name, (annotation, info) in space_registry.space_class(kind).form_fields.items():
        fields[name] = (annotation, copy.copy(info))  # the space's own form fields
    title = "".join(w.capitalize() for w in kind.split("_")) + "SpaceForm"
    form = create_model(  # type: ignore[call-overload]
        title,
        __config__=ConfigDict(extra="forbid", title=title),
        __doc__=f"The study's `space` of kind {kind!r}: {spec_class.__doc__ or ''}".strip(),
        __validators__=validators,
        **fields,
    )
    return form


# One form per registered kind: a kind whose derived fields are not declared gets a form too
# (nothing left out), and validation refuses it by name rather than the spec not knowing it.
SPACE_FORMS: dict[str, type[BaseModel]] = {}
_FORMED: dict[str, type] = {}  # kind -> the space class its form was made from


def sync_space_forms() -> bool:
    """Bring ``DERIVED_FIELDS`` and ``SPACE_FORMS`` in step with the space registry; True when they
    changed. A space registered (or removed) after this module was imported, such as a plugin
    defined in a test, gets its form here: no module of the service lists the kinds."""
    classes = {kind: space_registry.space_class(kind) for kind in space_registry.kinds()}
    if classes == _FORMED:
        return False
    derived = {kind: fields for kind in classes if (fields := derived_fields(kind)) is not None}
    DERIVED_FIELDS.clear()
    DERIVED_FIELDS.update(derived)
    forms = {kind: SPACE_FORMS[kind] if _FORMED.get(kind) is cls else _space_form(kind, cls.spec_class)
             for kind, cls in classes.items()}
    SPACE_FORMS.clear()
    SPACE_FORMS.update(forms)
    _FORMED.clear()
    _FORMED.update(classes)
    return True


def space_form_union() -> Any:
    """The union of the forms of the kinds registered now (``kind`` tells them apart)."""
    return Union[tuple(SPACE_FORMS.values())]  # type: ignore[valid-type]


sync_space_forms()
SpaceForm = Annotated[space_form_union(), Field(discriminator="kind")]
