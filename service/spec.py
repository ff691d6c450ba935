"""The study spec: what a user submits (JSON or YAML), and how its errors are reported.

The spec is the user's form of a study: models by path or hub id, the search space
without what the service derives from the models (layer counts, the model lists), the
objectives, the optimizer, the budget. Parsing checks shapes only; everything that needs
the models, the task index or the server's settings is checked by
:func:`service.validation.validate_study`. Both report :class:`Problem` objects — where
(``loc``, as in FastAPI's 422 ``detail``), what is wrong (``msg``) and how to fix it
(``fix``) — collected in a :class:`StudyValidationError`.

This module imports pydantic, PyYAML and the (pure Python) search-space and evaluator
specs; never torch, ray or lm_eval.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from evaluators.base import MAX_LIMIT, MAX_OBJECTIVES, EvaluationSpec
from search_spaces import registry as space_registry
from search_spaces.optimizers.base import OptimizerSpec
from search_spaces.sources import StudyRef
from service.spec_limits import (
    MAX_DEPTH,
    MAX_NAME_CHARS,
    MAX_SEED,
    MAX_TEXT_BYTES,
    control_characters,
    shape_problems,
)

MAX_TRIALS = 100_000
MAX_SECONDS = 30 * 24 * 3600.0  # 30 days
MAX_PARALLELISM = 64
MAX_SOURCES = 64
MAX_HELDOUT_TOP_K = 100


# ---- problems ------------------------------------------------------------------------
class Problem(BaseModel):
    """One thing wrong with a study spec (an item of a 422 response's ``detail``)."""

    loc: list[Union[str, int]] = Field(
        description="where: e.g. ['sources', 1] or ['evaluation', 'objectives', 0, 'task']"
    )
    msg: str = Field(description="what is wrong")
    fix: str = Field(description="how to fix it")
    type: str = Field(default="invalid", description="a stable kind for programs, e.g. path_outside_roots")


class StudyValidationError(ValueError):
    """A study spec that cannot run; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        lines = [f"{len(self.problems)} problem(s) with the study spec:"]
        for p in self.problems:
            where = ".".join(str(x) for x in p.loc) or "(spec)"
            lines.append(f"- {where}: {p.msg} — fix: {p.fix}")
        return "\n".join(lines)

    def detail(self) -> list[dict[str, Any]]:
        """The problems as plain dicts, for a 422 response body."""
        return [p.model_dump() for p in self.problems]


_TYPE_TAG = re.compile(
    r"^(int|float|str|bool|none|list\[.*\]|dict\[.*\]|tuple\[.*\]|set\[.*\]|literal\[.*\]|"
    r"function-\w+\[.*\]|constrained-.*|lax-.*|json-or-python\[.*\]|is-instance\[.*\]|chain\[.*\]|"
    r"path-or-hub-id|study-reference|nullable\[.*\]|union\[.*\])$"
)


def _clean_loc(loc: Iterable[Union[str, int]]) -> list[Union[str, int]]:
    """Drop pydantic's union-member tags from an error location (``['space', 'parameter', 'x']``
    -> ``['space', 'x']``) so that locations name only the user's fields."""
    out: list[Union[str, int]] = []
    kinds = set(space_registry.kinds())
    for item in loc:
        if isinstance(item, str) and _TYPE_TAG.match(item):
            continue
        if isinstance(item, str) and out and out[-1] == "space" and item in kinds:
            continue
        out.append(item)
    return out


def _fields_at(loc: Sequence[Union[str, int]]) -> list[str]:
    """The user's field names of the (nested) model at a raw pydantic ``loc``, when it can be followed."""
    current: Any = StudySpec
    for item in loc:
        if isinstance(item, int) or (isinstance(item, str) and _TYPE_TAG.match(item)):
            if item == "study-reference":
                current = StudyRef
            continue
        if current == "space" and item in SPACE_FORMS:
            current = SPACE_FORMS[str(item)]
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        if current is StudySpec and item == "space":
            current = "space"
            continue
        info = current.model_fields.get(str(item))
        if info is None:
            return []
        current = _model_in(info.annotation)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return []
    hidden = set(DERIVED_FIELDS.get(getattr(current.model_fields.get("kind"), "default", None) or "", ()))
    return [f for f in current.model_fields if f not in hidden]


def _model_in(annotation: Any) -> Any:
    """The one BaseModel class inside an annotation such as ``list[X] | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [m for m in (_model_in(a) for a in getattr(annotation, "__args__", ()) or ()) if m is not None]
    return found[0] if len(found) == 1 else None


def _fix_for(error: Mapping[str, Any], loc: list[Union[str, int]], raw_loc: list[Union[str, int]]) -> str:
    """How to fix a pydantic error (``loc``: its cleaned location, ``raw_loc``: pydantic's)."""
    kind = error.get("type", "")
    field = str(loc[-1]) if loc else "the spec"
    if kind == "missing":
        return f"add `{field}`; docs/study-spec.md describes every field"
    if kind == "extra_forbidden":
        known = _fields_at(raw_loc[:-1])
        close = difflib.get_close_matches(field, known, n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        listed = (f"the fields here are: {', '.join(known)}" if known
                  else "docs/study-spec.md lists the fields")
        return f"{hint}remove `{field}` ({listed})"
    if kind in ("union_tag_invalid", "union_tag_not_found") and loc[:1] == ["space"]:
        return f"set space.kind to one of: {', '.join(space_registry.kinds())}"
    if kind == "value_error":
        return "change the value as the message says"
    return "correct the value (docs/study-spec.md describes every field)"


def problems_from_pydantic(err: ValidationError, prefix: Sequence[Union[str, int]] = ()) -> list[Problem]:
    """A pydantic ``ValidationError`` as problems (locations under ``prefix``)."""
    out: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for e in err.errors(include_url=False):
        loc = [*prefix, *_clean_loc(e["loc"])]
        msg = str(e["msg"]).removeprefix("Value error, ")
        key = (json.dumps(loc), msg)
        if key in seen:
            continue
        seen.add(key)
        out.append(Problem(loc=loc, msg=msg, fix=_fix_for(e, loc, [*prefix, *e["loc"]]), type=str(e["type"])))
    return out


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


# ---- the user's form of a search space --------------------------------------------------
# What the service derives from the models, per space kind (the user leaves it out).
DERIVED_FIELDS: dict[str, tuple[str, ...]] = {
    "parameter": ("models", "base_model", "num_layers"),
    "stacking": ("sources", "base_model"),
}
_DERIVED_HINTS = {
    "models": "the merged models are the study's `sources`: list them there",
    "base_model": "the base model is the study's `base_model`: set it there",
    "num_layers": "layer counts are read from the models' config.json and weights: remove it",
    "sources": "the stacked models are the study's `sources` (in slot order); give per-source layer "
    "ranges as space.layer_ranges",
}


def _refuse_derived(cls: type, value: Any, info: Any) -> Any:
    if value is not None:
        raise ValueError(f"`{info.field_name}` is not part of a study's space: "
                         f"{_DERIVED_HINTS[info.field_name]}")
    return value


def _stacking_layer_ranges(cls: type, value: Any) -> Any:
    for r in value or []:
        if r is not None and not 0 <= r[0] < r[1]:
            raise ValueError(f"layer range {list(r)} must satisfy 0 <= start < end (end exclusive)")
    return value


_LayerIndex = Annotated[int, Field(ge=0, le=100_000)]


def _space_form(kind: str, spec_class: type[BaseModel]) -> type[BaseModel]:
    """The user's form of a space spec: the spec's fields minus the derived ones.

    Generated from the registered spec class, so a new field of a space appears here
    (with its description and constraints) without a change to this module.
    """
    derived = DERIVED_FIELDS[kind]
    fields: dict[str, Any] = {}
    for name, info in spec_class.model_fields.items():
        if name in derived:
            fields[name] = (SkipJsonSchema[Union[Any, None]], Field(default=None, exclude=True))
        elif name == "kind":  # the discriminator: required in the user's form (and in its schema)
            fields[name] = (info.annotation, Field(description=f"the space's kind: {kind!r}"))
        else:
            fields[name] = (info.annotation, copy.copy(info))
    validators: dict[str, Any] = {
        "_refuse_derived": field_validator(*derived, mode="before")(classmethod(_refuse_derived)),
    }
    for vname, dec in spec_class.__pydantic_decorators__.field_validators.items():
        if not set(dec.info.fields) & set(derived):  # the spec's own field checks, e.g. the method name
            validators[vname] = field_validator(*dec.info.fields, mode=dec.info.mode)(
                classmethod(dec.func.__func__)
            )
    if kind == "stacking":
        fields["layer_ranges"] = (
            Union[list[Union[tuple[_LayerIndex, _LayerIndex], None]], None],
            Field(default=None, max_length=MAX_SOURCES,
                  description="one entry per source: [start, end) of the layers it "
                  "contributes, or null for all of them"),
        )
        validators["_layer_ranges"] = field_validator("layer_ranges")(classmethod(_stacking_layer_ranges))
    title = "".join(w.capitalize() for w in kind.split("_")) + "SpaceForm"
    form = create_model(  # type: ignore[call-overload]
        title,
        __config__=ConfigDict(extra="forbid", title=title),
        __doc__=f"The study's `space` of kind {kind!r}: {spec_class.__doc__ or ''}".strip(),
        __validators__=validators,
        **fields,
    )
    return form


def _space_forms() -> dict[str, type[BaseModel]]:
    return {
        kind: _space_form(kind, space_registry.space_class(kind).spec_class)
        for kind in space_registry.kinds()
        if kind in DERIVED_FIELDS  # a new kind needs its derived fields declared (and filled in validation)
    }


SPACE_FORMS = _space_forms()
SpaceForm = Annotated[Union[tuple(SPACE_FORMS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]


# ---- the rest of the spec ---------------------------------------------------------------
class HeldoutSpec(BaseModel):
    """Re-score the best trials at the end, on examples the search never saw."""

    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(default=3, ge=1, le=MAX_HELDOUT_TOP_K, description="how many of the best trials")
    tasks: dict[str, str] | None = Field(
        default=None, max_length=MAX_OBJECTIVES,
        description="search task -> held-out task (e.g. zoo_xl_add: zoo_xl_add_heldout), one entry per "
        "objective task; omitted: the examples each task's `limit` left out",
    )
    limit: int | float | None = Field(
        default=None, ge=0, le=MAX_LIMIT, json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_LIMIT},
        description=f"examples per named held-out task, up to {MAX_LIMIT}, or a fraction below 1 "
        "(default: all of them)"
    )

    @model_validator(mode="after")
    def _limit_needs_tasks(self) -> HeldoutSpec:
        if self.limit is not None and self.tasks is None:
            raise ValueError(
                "heldout.limit applies to named held-out tasks (heldout.tasks); without them the held-out "
                "examples are those the search's limit left out: remove heldout.limit"
            )
        odd_float = isinstance(self.limit, float) and self.limit >= 1 and not self.limit.is_integer()
        if self.limit is not None and (self.limit <= 0 or odd_float):
            raise ValueError(f"heldout.limit {self.limit} must be a count or a fraction below 1")
        return self


class Budget(BaseModel):
    """When the study stops: after ``max_trials`` trials or ``max_seconds``, whichever first."""

    model_config = ConfigDict(extra="forbid")
    # bounds enforced by the validators below (their messages say what to do instead)
    max_trials: int | None = Field(default=None, description=f"1 … {MAX_TRIALS}",
                                   json_schema_extra={"minimum": 1, "maximum": MAX_TRIALS})
    max_seconds: float | None = Field(
        default=None, description=f"wall-clock seconds, up to {MAX_SECONDS:.0f}",
        json_schema_extra={"exclusiveMinimum": 0, "maximum": MAX_SECONDS})

    @field_validator("max_trials")
    @classmethod
    def _trials(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= MAX_TRIALS:
            raise ValueError(
                f"max_trials {v} is outside 1 … {MAX_TRIALS}: "
                + ("a study needs at least one trial" if v < 1 else
                   "run successive studies instead, each starting from the previous best (optimizer.x0)")
            )
        return v

    @field_validator("max_seconds")
    @classmethod
    def _seconds(cls, v: float | None) -> float | None:
        if v is not None and not (math.isfinite(v) and 0 < v <= MAX_SECONDS):
            raise ValueError(
                f"max_seconds {v} is outside (0, {MAX_SECONDS:.0f}] (30 days): give a positive, finite "
                "number of seconds"
            )
        return v

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if self.max_trials is None and self.max_seconds is None:
            raise ValueError("the budget is empty: set max_trials, max_seconds, or both")
        return self


class WorkerOptions(BaseModel):
    """How the study's workers hold the models in memory (docs/workers.md, "Memory: tiers and
    sizing a worker"). Validation plans the memory from the models' headers and refuses a study
    that no tier can hold."""

    model_config = ConfigDict(extra="forbid")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of the candidate (the one resident model); auto: the space's "
        "out_dtype, else the base's own dtype. Merging is done in float32 either way")
    tier: Literal["auto", "resident", "streamed", "mapped"] = Field(
        default="auto", description="where the sources live: resident (on the compute device), streamed "
        "(pinned host memory, copied per tensor: GPU workers only), mapped (read through the page cache); "
        "auto: the fastest that fits")
    cache_task_vectors: bool = Field(
        default=False, description="keep the float32 task vectors on the device between candidates when the "
        "resident tier has room for them (faster; else they are formed per chunk)")


# The complete demo study (docs/study-spec.md): per-layer TIES over the zoo's two experts.
DEMO_EXAMPLE: dict[str, Any] = {
    "name": "zoo: xl addition by per-layer TIES",
    "sources": ["v2-seed0/math", "v2-seed0/language"],
    "base_model": "v2-seed0/base",
    "space": {"kind": "parameter", "method": "ties", "granularity": 1, "weight_range": [0.0, 2.0],
              "search_density": False, "parameters": {"density": 1.0, "normalize": False}},
    "evaluation": {
        "evaluator": "lm_eval",
        "objectives": [{"task": "zoo_xl_add", "metric": "exact_match", "limit": 200}],
        "options": {"task_dirs": ["evomerge:zoo"]},
    },
    "heldout": {"top_k": 3, "tasks": {"zoo_xl_add": "zoo_xl_add_heldout"}},
    "optimizer": {"name": "optuna-cmaes"},
    "budget": {"max_trials": 300, "max_seconds": 3600},
    "parallelism": 2,
    "seed": 0,
}

MULTI_OBJECTIVE_EXAMPLE: dict[str, Any] = {
    "name": "zoo: xl addition and en addition, Pareto front",
    "sources": ["v2-seed0/math", "v2-seed0/language"],
    "base_model": "v2-seed0/base",
    "space": {"kind": "parameter", "method": "task_arithmetic", "granularity": 2},
    "evaluation": {
        "objectives": [
            {"task": "zoo_xl_add", "metric": "exact_match", "limit": 100},
            {"task": "zoo_en_add", "metric": "exact_match", "limit": 100},
        ],
        "options": {"task_dirs": ["evomerge:zoo"]},
    },
    "multi_objective": True,
    "heldout": {"top_k": 5},
    "optimizer": {"name": "nsga2", "population_size": 16},
    "budget": {"max_trials": 400},
    "parallelism": 4,
    "seed": 1,
}


class StudySpec(BaseModel):
    """A study: which models to merge, how, scored on what, for how long."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [DEMO_EXAMPLE, MULTI_OBJECTIVE_EXAMPLE]},
    )

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS,
                      description="for people: shown on the dashboard (no control characters)")
    sources: list[SourceRef] = Field(
        min_length=1, max_length=MAX_SOURCES,
        description="the models merged: folders under the server's model roots (absolute, or relative to "
        "a root), hub ids 'org/name' the server allows, or {study: <id>, trial: best} for another "
        "study's model",
    )
    base_model: SourceRef | None = Field(
        default=None,
        description="parameter space: the model the sources were fine-tuned from (all methods but "
        "linear); stacking: the owner of embeddings, final norm and head (default: the first source)",
    )
    space: SpaceForm = Field(description="what is searched; `kind` picks parameter or stacking")
    evaluation: EvaluationSpec = Field(description="how candidates are scored (docs/evaluation.md)")
    multi_objective: bool = Field(
        default=False,
        description="search the Pareto front of the objectives (weights ignored) instead of their weighted "
        "sum; needs nsga2, optuna-tpe or random",
    )
    heldout: HeldoutSpec | None = Field(
        default=None, description="re-score the best trials on held-out examples when the study ends"
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="how points are proposed")
    budget: Budget = Field(description="when the study stops")
    parallelism: int = Field(default=1, ge=1, le=MAX_PARALLELISM, description="candidates scored at once")
    trial_timeout_seconds: float | None = Field(
        default=None, ge=1, le=7 * 24 * 3600.0,
        description="a trial's deadline, from when its worker is ready: past it the worker is replaced and "
        "the trial run again (an attempt); default: 5 × the longest completed trial, at least 60 s, and "
        "3600 s until one completed; a new worker's first trial gets 600 s more (docs/workers.md)",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="seeds the optimizer: the same spec and seed "
                      "give the same proposals")
    trust_remote_code: bool = Field(
        default=False, description="allow models that ship their own code; refused unless the server "
        "enables it (EVOMERGE_TRUST_REMOTE_CODE)",
    )
    worker: WorkerOptions = Field(
        default_factory=WorkerOptions,
        description="the candidate's dtype and the workers' memory tier (default: planned from the models)")

    @field_validator("name")
    @classmethod
    def _printable_name(cls, value: str) -> str:
        bad = control_characters(value)
        if bad:
            raise ValueError(f"the name contains control characters ({', '.join(bad[:5])}): remove them")
        if not value.strip():
            raise ValueError("the name is blank")
        return value

    # ---- loading ------------------------------------------------------------------------
    @classmethod
    def from_data(cls, data: Any) -> StudySpec:
        """Validate parsed data; raises :class:`StudyValidationError`."""
        if not isinstance(data, Mapping):
            raise StudyValidationError([Problem(
                loc=[], msg=f"a study spec is a mapping of fields, got {type(data).__name__}",
                fix="write the spec as a YAML mapping or a JSON object (docs/study-spec.md has examples)",
                type="spec_not_a_mapping",
            )])
        shape = shape_problems(data)
        if shape:
            raise StudyValidationError([Problem(loc=loc, msg=msg, fix=fix, type="spec_shape")
                                        for loc, msg, fix in shape])
        try:
            # strict, through JSON: `true` is no count and "5" no number, while a JSON array
            # still fills a tuple (pydantic's strict Python mode would refuse that)
            return cls.model_validate_json(json.dumps(dict(data), allow_nan=True), strict=True)
        except ValidationError as err:
            raise StudyValidationError(problems_from_pydantic(err)) from None

    @classmethod
    def from_text(cls, text: str | bytes) -> StudySpec:
        """Parse a spec written in YAML or JSON (JSON is YAML); raises :class:`StudyValidationError`."""
        return cls.from_data(parse_text(text))

    @classmethod
    def from_file(cls, path: str | Path) -> StudySpec:
        return cls.from_text(Path(path).read_text(encoding="utf-8"))

    def to_yaml(self) -> str:
        """The spec as YAML, without the fields left at their defaults."""
        data = self.model_dump(mode="json", exclude_defaults=True)
        data["space"] = {"kind": self.space.kind, **data.get("space", {})}  # type: ignore[union-attr]
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses a key given twice (YAML keeps the last silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} appears twice (line {seen[key] + 1} and line {mark.line + 1})",
                mark,
            )
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _DuplicateKey(ValueError):
    pass


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def parse_text(text: str | bytes) -> Any:
    """YAML or JSON text -> data; a syntax error becomes a :class:`StudyValidationError`."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise StudyValidationError([Problem(
                loc=[], msg="the study spec is not UTF-8 text", fix="save the file as UTF-8",
                type="spec_not_text")]) from None
    if len(text) > MAX_TEXT_BYTES:
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec has {len(text)} characters, more than {MAX_TEXT_BYTES}",
            fix="a study spec names its models and tasks; it does not carry them", type="spec_too_large")])
    if not text.strip():
        raise StudyValidationError([Problem(loc=[], msg="the study spec is empty",
                                            fix="write a spec (docs/study-spec.md has a complete example)",
                                            type="spec_empty")])
    try:
        if text.lstrip()[:1] in ("{", "["):  # JSON: parsed as JSON (a YAML parser splits surrogate pairs)
            try:
                return json.loads(text, object_pairs_hook=_unique_json_keys)
            except json.JSONDecodeError:
                pass  # YAML's flow style, e.g. unquoted keys
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec nests too deeply (more than {MAX_DEPTH} levels are never needed)",
            fix="flatten it: no field of a study spec nests that deep", type="spec_too_deep")]) from None
    except _DuplicateKey as err:
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec is not valid JSON: {err}", fix="give each key once",
            type="spec_syntax")]) from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise StudyValidationError([Problem(
            loc=[], msg="the study spec holds a value that cannot be read (e.g. a number of thousands of "
            "digits)", fix="give numbers within their bounds (docs/study-spec.md)",
            type="spec_syntax")]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err)
        if getattr(err, "context", None) and "appears twice" not in str(what):
            what = f"{err.context}: {what}"
        raise StudyValidationError([Problem(
            loc=[], msg=f"the study spec is not valid YAML or JSON{where}: {what}",
            fix="fix the syntax there (indentation with spaces, a space after each ':', quotes around "
            "values with ': ' or '#')",
            type="spec_syntax",
        )]) from None
