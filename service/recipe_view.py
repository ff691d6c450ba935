"""A recipe in the shape a person (or the dashboard) reads it.

* parameter-space recipe → one panel per parameter (and per module filter the recipe
  uses): a table of layers × models holding the value each model's parameter takes at
  each layer, plus the recipe's global parameters;
* layer-stacking recipe → the path: which source layer fills each output layer, with
  what residual scale.

Values are read with the engine's own rules (``search_spaces.recipe.resolve_setting``),
so what is drawn is what was merged. Torch-free: the API imports this.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from search_spaces.recipe import Recipe, resolve_setting

SINGLE_POSITION = {"embeddings", "embed_tokens", "lm_head", "wte", "wpe"}  # read at depth 0 only


def _filters(value: Any, out: list[str]) -> None:
    if isinstance(value, list):
        for item in value:
            _filters(item, out)
    elif isinstance(value, dict):
        flt = value.get("filter")
        if flt not in (None, "*") and flt not in out:
            out.append(flt)
        _filters(value.get("value"), out)
    elif hasattr(value, "filter"):
        _filters(value.model_dump(), out)


def _matcher(category: str | None):  # type: ignore[no-untyped-def]
    return lambda flt: flt in (None, "*") or (category is not None and flt == category)


def _read(name: str, scopes: list[Any], category: str | None, positions: list[float]) -> list[Any]:
    return [resolve_setting(name, scopes, _matcher(category), p) for p in positions]


def parameter_view(recipe: Recipe, num_layers: int, names: dict[str, str] | None = None) -> dict[str, Any]:
    names = names or {}
    entries = recipe.models or []
    models = [names.get(e.model, e.model) for e in entries]
    param_names: list[str] = []
    filters: list[str] = []
    for e in entries:
        for key, value in (e.parameters or {}).items():
            if key not in param_names:
                param_names.append(key)
            _filters(value, filters)
    globals_ = dict(recipe.parameters or {})
    for value in globals_.values():
        _filters(value, filters)
    panels = []
    for name in param_names:
        for category in [None, *filters]:
            single = category in SINGLE_POSITION
            positions = ([0.0] if single or num_layers < 2
                         else [i / (num_layers - 1) for i in range(num_layers)])
            rows = [_read(name, [e.parameters, globals_], category, positions) for e in entries]
            plain = [_read(name, [e.parameters, globals_], None, positions) for e in entries]
            if category is not None and rows == plain:
                continue  # the filter does not change this parameter: no extra panel
            same = next((p for p in panels if p["parameter"] == name and p["filter"] is not None
                         and p["values"] == rows), None)
            if same is not None:  # e.g. the final norm's three spellings (model.norm., ln_f., norm_f.)
                same["filter"] = f"{same['filter']} / {category}"
                continue
            panels.append({
                "parameter": name, "filter": category,
                "layers": ["embeddings/head"] if single else list(range(len(positions))),
                "models": models,
                "values": rows,  # values[m][layer]
            })
    scalars = {k: v for k, v in globals_.items() if isinstance(v, (bool, int, float, str))}
    return {"kind": "parameter", "method": recipe.merge_method, "base_model":
            names.get(recipe.base_model or "", recipe.base_model), "num_layers": num_layers,
            "models": models, "panels": panels, "global_parameters": scalars}


def stacking_view(recipe: Recipe, names: dict[str, str] | None = None) -> dict[str, Any]:
    names = names or {}
    path = []
    out = 0
    for piece in recipe.slices or []:
        for src in piece.sources[:1]:  # passthrough: one source per slice
            start, end = src.layer_range
            scale = src.scale if getattr(src, "scale", None) is not None else 1.0
            for layer in range(start, end):
                path.append({"out_layer": out, "model": names.get(src.model, src.model), "layer": layer,
                             "scale": scale})
                out += 1
    models = list(dict.fromkeys(p["model"] for p in path))
    return {"kind": "stacking", "method": recipe.merge_method, "num_layers": out, "models": models,
            "path": path}


# The views by name (``SearchSpace.recipe_view``): each takes (recipe, num_layers, names).
VIEWS: dict[str, Callable[[Recipe, int, dict[str, str] | None], dict[str, Any]]] = {
    "parameter": lambda r, n, names: parameter_view(r, n, names),
    "stacking": lambda r, n, names: stacking_view(r, names),
}


def _declared_view(kind: str | None) -> str | None:
    """The view the space of ``kind`` declares (None: unknown kind, or none declared)."""
    if kind is None:
        return None
    from search_spaces.registry import SPACES

    return SPACES.get(kind).recipe_view if kind in SPACES else None


def recipe_view(recipe: dict[str, Any] | Recipe, *, num_layers: int | None = None,
                names: dict[str, str] | None = None, kind: str | None = None) -> dict[str, Any]:
    """The readable form of ``recipe`` (``num_layers``: of the merged model, for a ``models``
    recipe; ``names``: model reference → the name the user gave it; ``kind``: the study's space
    kind, whose declared ``recipe_view`` picks the view, else the recipe's shape does)."""
    r = recipe if isinstance(recipe, Recipe) else Recipe.model_validate(recipe)
    view = _declared_view(kind) or ("stacking" if r.slices else "parameter")
    return VIEWS[view](r, num_layers or 1, names)
