// The trial table (sorted and paged by the API) and the trial panel: recipe, scores,
// timings and failure reason of one trial.

import { api } from "./api.js";
import { bytes, dateTime, duration, empty, errorBox, facts, fill, h, num, parseTime, statusBadge, toYaml } from "./dom.js";
import { recipeView } from "./views.js";

const SORTABLE = { number: "#", fitness: "fitness", finished_at: "finished" };

function trialSeconds(t) {
  const a = parseTime(t.started_at);
  const b = parseTime(t.finished_at);
  return a !== null && b !== null ? (b - a) / 1000 : null;
}

/** A trial's cost mark: "cached" (a score cache hit, it cost nothing) or the rung racing stopped it at. */
function costMark(t) {
  if (t.cached) return h("span", { class: "tag cost-mark", dataset: { mark: "cached" }, title: "a score cache hit: no worker time spent" }, "cached");
  if (t.state === "pruned") {
    return h("span", { class: "tag cost-mark", dataset: { mark: "pruned" }, title: `stopped early by racing after ${num(t.examples)} examples` },
      t.rung !== null && t.rung !== undefined ? `rung ${t.rung}` : "pruned");
  }
  return null;
}

/** The table; `onOpen(number)` when a row is clicked. */
export function trialTable({ studyId, onOpen, multiObjective = false }) {
  let sort = "-number";
  let stateFilter = "";
  let offset = 0;
  let pageSize = 100;
  let reloading = null;
  const host = h("div", { id: "trial-table" });
  const info = h("span", { class: "muted small", id: "trial-total" });
  const pager = h("div", { class: "pager" });
  const stateSel = h("select", { "aria-label": "trial state", onchange: () => { stateFilter = stateSel.value; offset = 0; reload(); } },
    h("option", { value: "" }, "all states"),
    ["complete", "pruned", "running", "pending", "failed", "cancelled"].map((st) => h("option", { value: st }, st)));
  const sizeSel = h("select", { "aria-label": "page size", onchange: () => { pageSize = Number(sizeSel.value); offset = 0; reload(); } },
    [50, 100, 500].map((n) => h("option", { value: n, selected: n === pageSize }, `${n} per page`)));

  function header(field) {
    const active = sort.replace("-", "") === field;
    const arrow = active ? (sort.startsWith("-") ? " ▼" : " ▲") : "";
    return h("th", { class: `sortable${active ? " active" : ""}`, dataset: { sort: field }, title: "sort",
      onclick: () => {
        sort = active && sort.startsWith("-") ? field : `-${field}`; // first click: highest / latest first
        offset = 0;
        reload();
      } }, SORTABLE[field] + arrow);
  }

  function render(page) {
    info.textContent = `${page.total} trial${page.total === 1 ? "" : "s"}`;
    if (!page.items.length) {
      fill(host, empty(stateFilter ? `No ${stateFilter} trial.` : "No trials yet.", "Trials appear as the controller runs them."));
      fill(pager);
      return;
    }
    const keys = [...new Set(page.items.flatMap((t) => Object.keys(t.scores || {})))].sort();
    const table = h("table", { class: "table trials clickable-rows" },
      h("thead", {}, h("tr", {}, header("number"), h("th", {}, "state"),
        multiObjective ? h("th", { class: "num" }, "values") : header("fitness"),
        keys.map((k) => h("th", { class: "num" }, k)),
        h("th", { class: "num" }, "took"), h("th", {}, "worker"), header("finished_at"))),
      h("tbody", {}, page.items.map((t) => h("tr", {
        class: `trial-row state-${t.state}`, dataset: { number: t.number }, tabindex: 0,
        onclick: () => onOpen(t.number), onkeydown: (e) => { if (e.key === "Enter") onOpen(t.number); },
      },
      h("td", { class: "num" }, t.number), h("td", {}, statusBadge(t.state), costMark(t),
        t.failure_reason ? h("div", { class: "error-text small clip", title: t.failure_reason }, t.failure_reason) : null),
      h("td", { class: "num" }, multiObjective ? (Array.isArray(t.values) ? t.values.map((v) => num(v)).join(", ") : "—") : num(t.fitness)),
      keys.map((k) => h("td", { class: "num" }, num((t.scores || {})[k]))),
      h("td", { class: "num" }, duration(trialSeconds(t))),
      h("td", { class: "small" }, t.worker || "—"),
      h("td", { class: "small" }, t.finished_at ? dateTime(t.finished_at) : "—")))));
    fill(host, table);
    fill(pager,
      offset > 0 ? h("button", { type: "button", class: "ghost", onclick: () => { offset = Math.max(0, offset - pageSize); reload(); } }, "← previous") : null,
      h("span", { class: "muted small" }, `${offset + 1}–${Math.min(offset + pageSize, page.total)} of ${page.total}`),
      offset + pageSize < page.total ? h("button", { type: "button", class: "ghost", onclick: () => { offset += pageSize; reload(); } }, "next →") : null);
  }

  async function load() {
    const q = new URLSearchParams({ sort, limit: String(pageSize), offset: String(offset) });
    if (stateFilter) q.set("state", stateFilter);
    try {
      render(await api(`/studies/${encodeURIComponent(studyId)}/trials?${q}`));
    } catch (err) {
      fill(host, errorBox(err));
    }
  }

  function reload() {
    // one request at a time; a reload asked during one runs once it ends
    if (reloading) { reloading.again = true; return reloading.promise; }
    const state = { again: false };
    state.promise = (async () => {
      do { state.again = false; await load(); } while (state.again);
      reloading = null;
    })();
    reloading = state;
    return state.promise;
  }

  const node = h("div", { class: "trial-table-wrap" },
    h("div", { class: "toolbar" }, info, h("span", { class: "spacer" }), stateSel, sizeSel),
    host, pager);
  return { node, reload };
}

// ---- one trial ---------------------------------------------------------------------------
/** A value as people read it, guessing its unit from its key (…_s, …_bytes, …_at). */
function reading(key, v) {
  if (typeof v !== "number") return v !== null && typeof v === "object" ? JSON.stringify(v) : String(v);
  if (/_bytes$/.test(key)) return bytes(v);
  if (/_at$/.test(key) && v > 1e9) return dateTime(new Date(v * 1000).toISOString());
  if (/(_s|_seconds)$/.test(key)) return `${num(v, 3)} s`;
  return num(v);
}

function kv(obj) {
  const entries = Object.entries(obj || {});
  if (!entries.length) return h("p", { class: "muted small" }, "—");
  return h("table", { class: "table compact kv" }, h("tbody", {}, entries.map(([k, v]) => h("tr", { dataset: { key: k } },
    h("th", {}, k), h("td", { class: "num" }, reading(k, v))))));
}

function codeBlock(value) {
  const pre = h("pre", { class: "code recipe-text" });
  let mode = "yaml";
  // YAML for reading (numbers to 6 significant digits), JSON exact
  const show = () => { pre.textContent = mode === "yaml" ? toYaml(value, 0, 6) : JSON.stringify(value, null, 2); };
  show();
  const toggle = h("div", { class: "seg" },
    ["yaml", "json"].map((m) => h("button", { type: "button", class: m === mode ? "on" : "", dataset: { mode: m },
      onclick: (e) => { mode = m; show(); for (const b of toggle.children) b.classList.toggle("on", b.dataset.mode === m); e.preventDefault(); } },
    m.toUpperCase())),
    h("button", { type: "button", class: "ghost small", onclick: () => copy(pre.textContent) }, "Copy"));
  return h("div", { class: "code-wrap" }, toggle, pre);
}

function copy(text) {
  if (navigator.clipboard) navigator.clipboard.writeText(text).catch(() => {});
}

/** The panel's content for one trial; `onExport(number)` starts an export of it. */
export async function trialDetail(studyId, number, { onExport, onClose }) {
  const base = `/studies/${encodeURIComponent(studyId)}/trials/${number}`;
  const trial = await api(base);
  const view = trial.recipe ? await api(`${base}/view`).catch(() => null) : null;
  const timings = trial.timings || {};
  const heldout = (trial.metrics || {}).heldout;
  return h("div", { class: "trial-detail", dataset: { number: trial.number } },
    h("div", { class: "drawer-head" },
      h("h2", {}, `Trial ${trial.number}`), statusBadge(trial.state), h("span", { class: "spacer" }),
      trial.state === "complete" && trial.recipe
        ? h("button", { type: "button", class: "primary", id: "export-trial", onclick: () => onExport(trial.number) }, "Export this model")
        : null,
      h("button", { type: "button", class: "ghost", id: "close-trial", "aria-label": "close", onclick: onClose }, "✕")),
    trial.failure_reason ? h("div", { class: "error-box", id: "failure-reason" }, h("strong", {}, "Failed: "), trial.failure_reason) : null,
    facts([
      ["fitness", num(trial.fitness)],
      Array.isArray(trial.values) ? ["values", trial.values.map((v) => num(v)).join(", ")] : null,
      ["attempts", String(trial.attempts)],
      ["worker", trial.worker || "—"],
      ["created", dateTime(trial.created_at)],
      ["started", dateTime(trial.started_at)],
      ["finished", dateTime(trial.finished_at)],
      ["took", duration(trialSeconds(trial))],
      ["cost", trial.examples === null || trial.examples === undefined ? "—"
        : `${num(trial.examples)} examples · ${num(trial.tokens)} tokens · ${num(trial.worker_seconds, 3)} s on its worker`
          + (trial.cached ? " (saved: a score cache hit)" : "")],
      trial.rung !== null && trial.rung !== undefined ? ["rung", String(trial.rung)] : null,
    ]),
    h("div", { class: "two-col" },
      h("section", {}, h("h3", {}, "Scores"), kv(trial.scores)),
      h("section", {}, h("h3", {}, "Timings"), kv(Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, v]))))),
    heldout ? h("section", {}, h("h3", {}, "Held-out"), kv(heldout.scores || heldout)) : null,
    view ? h("section", {}, h("h3", {}, "Recipe, drawn"), recipeView(view)) : null,
    h("section", { class: "recipe-section" }, h("h3", {}, "Recipe"),
      trial.recipe ? codeBlock(trial.recipe) : h("p", { class: "muted" }, "No recipe (the point could not be decoded).")),
    h("details", {}, h("summary", {}, "Optimizer's point (params)"), codeBlock(trial.params ?? null)));
}
