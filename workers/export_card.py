"""The README.md model card of an export: what was merged, how it scored, from what.

The recipe is shown as tables a person can read: one per parameter the recipe sets,
with a row per run of layers that share their values and a column per input model.
Values are read from the merge plan (the engine's own resolution of gradients and
filters), so the table says what the merge did, not how the YAML spelled it. Where
one layer's tensors take different values (filters), a cell lists each value with
the module categories it applies to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from search_spaces.recipe import Recipe
from workers.architecture import category
from workers.model_io import looks_like_hub_id

if TYPE_CHECKING:
    from workers.export_manifest import ExportCard, ExportSource
    from workers.plan import MergePlan

OUTSIDE = "outside layers"  # the row of embeddings, final norm and head


def is_random(method: str) -> bool:
    """Whether the merge method draws random masks (its seed matters), as the method declares."""
    from workers import methods
    from workers.methods.base import MergeError

    try:
        return bool(methods.get(method).is_random)
    except MergeError:  # not a method of this engine: nothing random to report
        return False


def md_cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def fmt_score(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def fmt_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def short_names(refs: Iterable[str]) -> dict[str, str]:
    """Column titles: a model's folder (or hub) name, the full reference when two clash."""
    refs = list(dict.fromkeys(refs))
    tails = {r: Path(r.rstrip("/")).name or r for r in refs}
    counts: dict[str, int] = {}
    for t in tails.values():
        counts[t] = counts.get(t, 0) + 1
    return {r: (t if counts[t] == 1 else r) for r, t in tails.items()}


def _set_params(recipe: Recipe) -> set[str]:
    """Names of the parameters the recipe sets anywhere."""
    names = set(recipe.parameters)
    for entry in recipe.models or []:
        names |= set(entry.parameters)
    for sl in recipe.slices or []:
        names |= set(sl.parameters)
        for src in sl.sources:
            names |= set(src.parameters)
    return names


def _values_cell(values: dict[str, set[str]], elsewhere: bool = False) -> str:
    """One cell: a single value, or each value with the parts of the layer it applies
    to (with ``elsewhere``, the most common value is said last as "elsewhere")."""
    if len(values) == 1:
        return next(iter(values))
    groups = sorted(values.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if elsewhere:
        *rest, (common, _) = groups
        return "; ".join(f"{v} ({', '.join(sorted(w))})" for v, w in rest) + f"; {common} elsewhere"
    return "; ".join(sorted(f"{v} ({', '.join(sorted(w))})" for v, w in groups))


def _local_name(tensor: str, layer: int) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``self_attn.q_proj``."""
    local = re.sub(rf"^.*?\.{layer}\.", "", tensor)
    return re.sub(r"\.(weight|bias)$", "", local)


def _layer_label(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}–{last}"


def param_table(plan: MergePlan, name: str, scope: str, names: dict[str, str]) -> str:
    """Markdown for one parameter: a line when it is the same everywhere, else a table."""
    # rows[layer][column] = {formatted value: {tensor categories}}
    rows: dict[int | None, dict[str, dict[str, set[str]]]] = {}
    by_leaf: dict[int | None, dict[str, dict[str, set[str]]]] = {}
    for task in plan.tasks:
        if not task.dtype.is_floating_point:
            continue
        if scope == "global":
            pairs = [("all models", task.global_params.get(name))]
        else:
            pairs = [(s.model, p.get(name)) for s, p in zip(task.inputs, task.model_params)]
        leaf = _local_name(task.name, task.layer) if task.layer is not None else task.name
        for col, value in pairs:
            v = fmt_value(value)
            rows.setdefault(task.layer, {}).setdefault(col, {}).setdefault(v, set()).add(
                category(task.name)
            )
            by_leaf.setdefault(task.layer, {}).setdefault(col, {}).setdefault(v, set()).add(leaf)
    # a category split between two values (a substring filter): name the tensors instead
    cells: dict[int | None, dict[str, str]] = {}
    for layer, cols in rows.items():
        for col, values in cols.items():
            seen = [c for where in values.values() for c in where]
            split = len(seen) != len(set(seen))
            cells.setdefault(layer, {})[col] = (
                _values_cell(by_leaf[layer][col], elsewhere=True) if split else _values_cell(values)
            )
    columns = list(dict.fromkeys(c for cols in rows.values() for c in cols))
    title = lambda c: md_cell(names.get(c, c))  # noqa: E731
    cells_of = lambda r: [cells[r].get(c, "—") for c in columns]  # noqa: E731
    if all(len({cells[r].get(c, "—") for r in cells}) == 1 for c in columns):
        first = next(iter(cells))
        return f"- `{name}`: " + ", ".join(f"{title(c)} {v}" for c, v in zip(columns, cells_of(first))) + "\n"
    lines = [f"`{name}`:", "", "| layers | " + " | ".join(title(c) for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    runs: list[tuple[int, int, list[str]]] = []  # consecutive layers with equal cells
    for layer in sorted(r for r in cells if r is not None):
        row = cells_of(layer)
        if runs and runs[-1][2] == row and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer, row)
        else:
            runs.append((layer, layer, row))
    lines += [f"| {_layer_label(a, b)} | " + " | ".join(row) + " |" for a, b, row in runs]
    if None in cells:
        lines.append(f"| {OUTSIDE} | " + " | ".join(cells_of(None)) + " |")
    return "\n".join(lines) + "\n"


def slice_table(recipe: Recipe, names: dict[str, str]) -> str:
    """The layer stack: which source layers make which output layers."""
    assert recipe.slices is not None
    lines = ["| output layers | source | source layers | residual scale |", "|---|---|---|---|"]
    out = 0
    for sl in recipe.slices:
        length = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for src in sl.sources:
            a, b = src.layer_range
            scale = "—" if src.scale is None else fmt_value(src.scale)
            name = md_cell(names.get(src.model, src.model))
            lines.append(f"| {_layer_label(out, out + length - 1)} | {name} "
                         f"| {_layer_label(a, b - 1)} | {scale} |")
        out += length
    if recipe.is_stacking():
        edge = recipe.base_model
        where = (f"{names.get(edge, edge)} (base_model)" if edge else
                 "the first slice's model (embeddings) and the last slice's (final norm, head)")
        lines += ["", f"Embeddings, final norm and head come from {where}."]
    return "\n".join(lines) + "\n"


def recipe_section(plan: MergePlan) -> str:
    recipe = plan.recipe
    names = short_names(recipe.referenced_models())
    out = [f"Method: `{recipe.merge_method}`"
           + (f", base model: {names[recipe.base_model]}" if recipe.base_model else "")
           + f", output dtype: `{str(plan.out_dtype).removeprefix('torch.')}`"
           + f", {plan.num_layers} layers"
           + (f", seed {recipe.seed}" if plan.method.is_random else "") + ".", ""]
    if recipe.slices is not None:
        out += ["Layers:", "", slice_table(recipe, names)]
    set_params = _set_params(recipe)
    shown, defaults = [], []
    for scope, specs in (("global", plan.method.global_params), ("model", plan.method.model_params)):
        for spec in specs:
            if spec.name in set_params:
                shown.append(param_table(plan, spec.name, scope, names))
            elif not spec.required:
                defaults.append(f"`{spec.name}` = {fmt_value(spec.default)}")
    if shown:
        out += ["Parameters (per layer where they vary; layers are output layers, counted from 0):",
                "", *shown]
    if defaults:
        out += [f"Defaults: {', '.join(defaults)}.", ""]
    legend = [f"- {n}: `{ref}`" for ref, n in names.items() if n != ref]
    if legend:
        out += ["Models:", "", *legend, ""]
    out += ["<details><summary>The exact recipe (<code>evomerge_recipe.yaml</code>)</summary>", "",
            "```yaml", recipe.to_yaml().rstrip(), "```", "", "</details>", ""]
    return "\n".join(out)


def scores_section(card: ExportCard) -> str:
    tasks = sorted(set(card.scores) | set(card.heldout_scores or {}))
    held = card.heldout_scores or {}
    lines = ["| task | search subset | held-out |", "|---|---|---|"]
    lines += [f"| {md_cell(t)} | {fmt_score(card.scores.get(t))} | {fmt_score(held.get(t))} |" for t in tasks]
    if not tasks:
        lines = ["No scores were recorded for this trial."]
    if card.heldout_scores is None:
        lines += ["", "This trial was not re-scored on the held-out split."]
    extra = []
    if card.fitness is not None:
        extra.append(f"fitness {fmt_score(card.fitness)}")
    if card.values is not None:
        extra.append("optimizer values [" + ", ".join(fmt_score(v) for v in card.values) + "]")
    if extra:
        lines += ["", "Trial: " + "; ".join(extra) + "."]
    return "\n".join(lines) + "\n"


def fmt_seconds(seconds: float) -> str:
    """Worker time as people read it: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def cost_section(cost: dict[str, Any] | None) -> str:
    """What the search spent on evaluation and what pruning and the score cache saved
    (``service.cost.StudyCost`` as JSON, as it stood when the model was exported)."""
    if not cost:
        return "The study recorded no cost (it ran before cost accounting existed).\n"
    rows = [("spent by the trials", cost.get("spent") or {}, "trials"),
            ("spent by the baselines", cost.get("baselines") or {}, "baselines"),
            ("saved by the score cache", cost.get("saved_by_cache") or {}, "hits"),
            ("saved by pruning (estimated time)", cost.get("saved_by_pruning") or {}, "trials pruned")]
    lines = ["| | rows | examples | tokens | worker time |", "|---|---|---|---|---|"]
    for label, part, unit in rows:
        count = int(part.get("trials") or 0) + int(part.get("baselines") or 0)
        tokens = f"{int(part['tokens']):,}" if "tokens" in part else "—"
        lines.append(f"| {label} | {count} {unit} | {int(part.get('examples') or 0):,} | {tokens} "
                     f"| {fmt_seconds(float(part.get('worker_seconds') or 0.0))} |")
    full = cost.get("full_examples")
    lines += ["", (f"A candidate scored in full is scored on {full:,} examples. " if full else "")
              + "Worker time is building plus scoring, summed over the workers; the figures are the "
              "study's when this model was exported (the held-out re-scoring is not counted)."]
    return "\n".join(lines) + "\n"


def sources_section(sources: list[ExportSource]) -> str:
    out = []
    for src in sources:
        out += [f"`{src.ref}`", ""]
        if src.adapter_of is not None or src.adapter is not None:
            out += [f"A PEFT LoRA adapter ({md_cell(src.adapter or 'LoRA')}), composed onto "
                    f"`{src.adapter_of}` (weights W + B·A·scale); this folder holds the merged full "
                    "model.", ""]
        out += ["| file | size | sha256 |", "|---|---|---|"]
        out += [f"| {md_cell(f.name)} | {fmt_size(f.size)} | `{f.sha256}` |" for f in src.files]
        out.append("")
    return "\n".join(out)


def reproduce_section(recipe: Recipe, mergekit_note: str | None) -> str:
    lines = ["With evomerge (the same engine that made this folder):", "",
             "```sh", "evomerge merge evomerge_recipe.yaml out/", "```", ""]
    if mergekit_note is None:
        lines += ["With mergekit (same weights up to float rounding for deterministic methods):", "",
                  "```sh", "mergekit-yaml mergekit_config.yml out/", "```", ""]
        if is_random(recipe.merge_method):
            lines += [f"`{recipe.merge_method}` drops entries at random: mergekit draws its own masks, "
                      "so its output differs from this one in the dropped entries.", ""]
    else:
        lines += [f"No `mergekit_config.yml`: mergekit cannot express this recipe ({mergekit_note}).", ""]
    lines += ["Models are referenced as the study named them (local paths or hub ids); the sha256 "
              "of each source file is listed below so that the inputs can be checked.", ""]
    return "\n".join(lines)


def render_readme(
    *,
    card: ExportCard,
    plan: MergePlan,
    key: str,
    title: str,
    sources: list[ExportSource],
    mergekit_note: str | None,
    evomerge_version: str,
    created_at: str,
) -> str:
    recipe = plan.recipe
    hub = [r for r in recipe.referenced_models() if looks_like_hub_id(r)]
    front: dict[str, Any] = {"library_name": "transformers", "tags": ["merge", "evomerge"]}
    if hub:
        front["base_model"] = hub
    spec_yaml = yaml.safe_dump(card.spec, sort_keys=False).rstrip() if card.spec else "{}"
    opt_yaml = yaml.safe_dump(card.optimizer, sort_keys=False).rstrip() if card.optimizer else "{}"
    parts = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {title}", "",
        f"A merge found by evomerge's search: study **{card.study_name}** (`{card.study_id}`), "
        f"trial {card.trial_number}.", "",
        "## Scores", "", scores_section(card),
        "## Recipe", "", recipe_section(plan),
        "## Reproduce", "", reproduce_section(recipe, mergekit_note),
        "## Source models", "", sources_section(sources),
        "## Cost of the search", "", cost_section(card.cost),
        "## Study", "",
        f"Optimizer (seed {card.seed if card.seed is not None else 'not set'}):", "",
        "```yaml", opt_yaml, "```", "",
        "Study spec as submitted:", "", "```yaml", spec_yaml, "```", "",
        "## Provenance", "",
        f"- evomerge version: {evomerge_version}",
        f"- exported: {created_at}",
        f"- export key: `{key}` (sha256 of the recipe and of every source file read)",
        "- `SHA256SUMS` lists the sha256 of every file of this folder (check with `sha256sum -c SHA256SUMS`)",
        "",
    ]
    return "\n".join(parts)
