// The study page's charts and the baselines table, drawn from plain data:
// fitness over trials (with the best so far and baselines as reference lines), each
// objective's score, and the Pareto front of a multi-objective study.

import { colorAt, finishedMs, xyChart } from "./charts.js";
import { dateTime, empty, h, num, shortLabel, signed, statusBadge } from "./dom.js";

export function objectiveNames(spec) {
  return (((spec || {}).evaluation || {}).objectives || []).map((o) => o.name || `${o.task}/${o.metric}`);
}

/** The x of a trial: its number, or when it finished (ms). */
function xOf(trial, mode) {
  return mode === "time" ? finishedMs(trial) : trial.number;
}

function xAxis(mode) {
  return mode === "time" ? { label: "finished at", time: true } : { label: "trial number", integer: true };
}

export function complete(trials) {
  return trials.filter((t) => t.state === "complete");
}

/** The trials that raised the best fitness, in the order they were numbered. */
export function improvements(trials) {
  const out = [];
  let best = -Infinity;
  for (const t of complete(trials).sort((a, b) => a.number - b.number)) {
    if (Number.isFinite(t.fitness) && t.fitness > best) {
      best = t.fitness;
      out.push(t);
    }
  }
  return out;
}

/** Fitness of every complete trial, the best-so-far line, baselines as reference lines. */
export function fitnessChart(trials, baselines, { mode = "number", bestNumber = null, onClick } = {}) {
  const done = complete(trials).filter((t) => Number.isFinite(t.fitness) && xOf(t, mode) !== null);
  const hlines = baselines.filter((b) => Number.isFinite(b.fitness))
    .map((b, i) => ({ y: b.fitness, label: shortLabel(b.name), name: b.name, color: colorAt(i + 3) }));
  if (!done.length) {
    return empty("No complete trial yet.", hlines.length ? "Baselines will show as reference lines." : "Points appear as trials finish.");
  }
  const ordered = [...done].sort((a, b) => xOf(a, mode) - xOf(b, mode));
  const steps = [];
  let best = -Infinity;
  for (const t of ordered) {
    if (t.fitness > best) {
      best = t.fitness;
      steps.push({ x: xOf(t, mode), y: best });
    }
  }
  const maxX = xOf(ordered[ordered.length - 1], mode);
  const point = (t) => ({
    x: xOf(t, mode), y: t.fitness, key: t.number, cls: t.number === bestNumber ? "best" : "",
    r: t.number === bestNumber ? 6 : 4, color: t.number === bestNumber ? "#e0a100" : undefined,
    title: `trial ${t.number}: fitness ${num(t.fitness)}${t.finished_at ? `\nfinished ${dateTime(t.finished_at)}` : ""}\n(click for its recipe)`,
  });
  return xyChart({
    className: "fitness-chart",
    x: xAxis(mode),
    y: { label: "fitness (higher is better)" },
    hlines,
    series: [
      { name: "best so far", mode: "step", points: steps, extendTo: maxX, color: "#17a398" },
      { name: "trial", mode: "dots", points: done.map(point), color: "#2f6fdf", onClick: (p) => onClick && onClick(p.key) },
    ],
  });
}

/** Every objective's score (trial.scores) over the trials, one series per objective. */
export function objectivesChart(trials, { mode = "number", onClick } = {}) {
  const done = complete(trials).filter((t) => t.scores && xOf(t, mode) !== null);
  const keys = [...new Set(done.flatMap((t) => Object.keys(t.scores)))].sort();
  if (!keys.length) return empty("No scores yet.", "Each objective's score appears as trials finish.");
  return xyChart({
    className: "objectives-chart",
    x: xAxis(mode),
    y: { label: "score" },
    series: keys.map((key, i) => ({
      name: key, mode: "dots", color: colorAt(i), r: 3.5, onClick: (p) => onClick && onClick(p.key),
      points: done.filter((t) => Number.isFinite(t.scores[key])).map((t) => ({
        x: xOf(t, mode), y: t.scores[key], key: t.number, title: `trial ${t.number}: ${key} = ${num(t.scores[key])}`,
      })),
    })),
  });
}

/** The Pareto front of the first two objectives (values oriented so that higher is better),
 *  every other complete trial in grey behind it. */
export function paretoChart(trials, front, names, { onClick, selected = null } = {}) {
  const valued = (t) => Array.isArray(t.values) && t.values.length >= 2 && t.values.every(Number.isFinite);
  const onFront = new Set(front.map((t) => t.number));
  const others = complete(trials).filter((t) => valued(t) && !onFront.has(t.number));
  const pts = front.filter(valued);
  if (!pts.length) return empty("No front yet.", "Points appear as trials finish.");
  const sorted = [...pts].sort((a, b) => a.values[0] - b.values[0] || b.values[1] - a.values[1]);
  const stair = [];
  sorted.forEach((t, i) => {
    stair.push({ x: t.values[0], y: t.values[1] });
    if (i + 1 < sorted.length) stair.push({ x: sorted[i + 1].values[0], y: t.values[1] });
  });
  const label = (i) => `${names[i] || `objective ${i + 1}`} (↑ better)`;
  const title = (t) => `trial ${t.number}\n${names[0] || "objective 1"}: ${num(t.values[0])}\n${names[1] || "objective 2"}: ${num(t.values[1])}\n(click to open)`;
  return xyChart({
    className: "pareto-chart",
    x: { label: label(0) },
    y: { label: label(1) },
    series: [
      { name: "dominated", mode: "dots", color: "#b8c0cc", r: 3, onClick: (p) => onClick && onClick(p.key),
        points: others.map((t) => ({ x: t.values[0], y: t.values[1], key: t.number, title: title(t), cls: "dominated" })) },
      { name: "", mode: "line", points: stair, color: "#e4572e", hideInLegend: true },
      { name: "Pareto front", mode: "dots", color: "#e4572e", r: 5.5, onClick: (p) => onClick && onClick(p.key),
        points: pts.map((t) => ({ x: t.values[0], y: t.values[1], key: t.number, title: title(t),
          cls: `front${t.number === selected ? " selected" : ""}` })) },
    ],
  });
}

/** Baselines beside the evolved result: fitness, scores, held-out scores, and the gap. */
export function baselinesTable(baselines, best, { multiObjective = false } = {}) {
  if (!baselines.length) {
    return empty("No baselines yet.",
      "The controller scores each source model alone and simple merges (uniform, task arithmetic) on the study's objectives; they appear here when scored.");
  }
  const keys = [...new Set([...baselines, best || {}].flatMap((b) => Object.keys((b && b.scores) || {})))].sort();
  const heldout = baselines.some((b) => b.heldout_scores && Object.keys(b.heldout_scores).length);
  const bestFit = best && Number.isFinite(best.fitness) ? best.fitness : null;
  const head = h("tr", {}, h("th", {}, "model"), h("th", {}, "kind"), h("th", {}, "state"),
    multiObjective ? null : h("th", { class: "num" }, "fitness"),
    multiObjective ? null : h("th", { class: "num", title: "the evolved best minus this baseline" }, "best − this"),
    keys.map((k) => h("th", { class: "num" }, k)), heldout ? h("th", {}, "held-out") : null);
  const rows = [];
  if (best) {
    rows.push(h("tr", { class: "evolved-row" },
      h("td", {}, h("strong", {}, `evolved: trial ${best.number}`)), h("td", {}, "search"), h("td", {}, statusBadge(best.state)),
      multiObjective ? null : h("td", { class: "num" }, h("strong", {}, num(best.fitness))),
      multiObjective ? null : h("td", { class: "num" }, ""),
      keys.map((k) => h("td", { class: "num" }, num((best.scores || {})[k]))),
      heldout ? h("td", { class: "small" }, heldoutText(((best.metrics || {}).heldout || {}).scores)) : null));
  }
  for (const b of baselines) {
    const gap = bestFit !== null && Number.isFinite(b.fitness) ? bestFit - b.fitness : null;
    rows.push(h("tr", { class: "baseline-row", dataset: { name: b.name, kind: b.kind } },
      h("td", { title: b.name }, shortLabel(b.name), b.error ? h("div", { class: "error-text small" }, b.error) : null),
      h("td", {}, b.kind), h("td", {}, statusBadge(b.state)),
      multiObjective ? null : h("td", { class: "num" }, num(b.fitness)),
      multiObjective ? null : h("td", { class: `num ${gap > 0 ? "good" : gap < 0 ? "bad" : ""}` }, gap === null ? "—" : signed(gap)),
      keys.map((k) => h("td", { class: "num" }, num((b.scores || {})[k]))),
      heldout ? h("td", { class: "small" }, heldoutText(b.heldout_scores)) : null));
  }
  return h("table", { class: "table baselines" }, h("thead", {}, head), h("tbody", {}, rows));
}

function heldoutText(scores) {
  if (!scores || typeof scores !== "object") return "—";
  return Object.entries(scores).map(([k, v]) => `${k} ${num(v)}`).join(", ") || "—";
}
