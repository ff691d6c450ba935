// The cost panel of a study: what its evaluation spent (examples, tokens, worker time) and what
// pruning and the score cache saved it. It draws the API's `cost` (service/cost.py), which the
// controller recounts from the trial and baseline rows with every result.

import { duration, h } from "./dom.js";

/** An integer with thousands separators ("12,345"); "—" when not a number. */
export function count(n) {
  return typeof n === "number" && Number.isFinite(n) ? Math.round(n).toLocaleString("en-US") : "—";
}

/** Worker time: a duration, with the exact seconds and worker-hours in its tooltip. */
function workerTime(seconds, estimated) {
  const s = typeof seconds === "number" ? seconds : 0;
  return h("span", { title: `${s.toFixed(1)} s · ${(s / 3600).toFixed(3)} worker-hours${estimated ? " (estimated)" : ""}`,
    dataset: { seconds: String(s) } }, (estimated && s > 0 ? "≈ " : "") + duration(s));
}

const PARTS = [
  // [key in `cost`, label, what its `trials` counts (one, many), estimated seconds]
  ["spent", "spent by the trials", ["trial", "trials"], false],
  ["baselines", "spent by the baselines", ["baseline", "baselines"], false],
  ["saved_by_cache", "saved by the score cache", ["hit", "hits"], false],
  ["saved_by_pruning", "saved by pruning", ["pruned", "pruned"], true],
];

function budgetLine(study, cost) {
  const budget = ((study.spec || {}).budget) || {};
  const bits = [];
  if (budget.max_examples) bits.push(`${count(cost.spent.examples)} of ${count(budget.max_examples)} examples`);
  if (budget.max_worker_seconds) {
    bits.push(`${duration(cost.spent.worker_seconds)} of ${duration(budget.max_worker_seconds)} worker time`);
  }
  return bits.length ? `Budget: ${bits.join(" · ")} spent.` : null;
}

function savedShare(cost) {
  const saved = (cost.saved_by_cache.worker_seconds || 0) + (cost.saved_by_pruning.worker_seconds || 0);
  const spent = (cost.spent.worker_seconds || 0) + (cost.baselines.worker_seconds || 0);
  if (!(saved > 0)) return null;
  return `Pruning and the cache saved about ${Math.round((100 * saved) / (saved + spent))} % of the worker time `
    + "scoring every candidate in full would have taken.";
}

/** The panel: one row per part (spent, baselines, saved by the cache, saved by pruning). */
export function costPanel(study) {
  const cost = study.cost;
  if (!cost || !cost.spent) {
    return h("p", { class: "muted small", id: "cost-none" }, "No cost yet: it is counted as results come in.");
  }
  const rows = PARTS.map(([key, label, unit, estimated]) => {
    const part = cost[key] || {};
    const n = (part.trials || 0) + (part.baselines || 0);
    return h("tr", { dataset: { part: key } },
      h("th", {}, label),
      h("td", { class: "num", dataset: { field: "trials" } }, `${count(n)} ${unit[n === 1 ? 0 : 1]}`),
      h("td", { class: "num", dataset: { field: "examples" } }, count(part.examples || 0)),
      h("td", { class: "num", dataset: { field: "tokens" } }, "tokens" in part ? count(part.tokens) : "—"),
      h("td", { class: "num", dataset: { field: "worker_seconds" } }, workerTime(part.worker_seconds, estimated)));
  });
  const notes = [
    budgetLine(study, cost),
    cost.full_examples ? `A candidate scored in full takes ${count(cost.full_examples)} examples.` : null,
    savedShare(cost),
  ].filter(Boolean);
  return h("div", { id: "cost-panel" },
    h("table", { class: "table compact cost-table" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", { class: "num" }, "rows"), h("th", { class: "num" }, "examples"),
        h("th", { class: "num" }, "tokens"), h("th", { class: "num" }, "worker time"))),
      h("tbody", {}, rows)),
    notes.length ? h("p", { class: "muted small", id: "cost-notes" }, notes.join(" ")) : null);
}
