// The studies page (#/): every study with its status, progress, ETA and best fitness, and the
// form that submits a new one.

import { api } from "./api.js";
import { duration, empty, errorBox, fill, h, modelName, num, progressBar, statusBadge, timeAgo } from "./dom.js";
import { specForm } from "./specform.js";

const PAGE = 50;
const REFRESH_MS = 4000;
const ACTIVE = new Set(["queued", "running", "paused"]);

/** Seconds left, from the time per trial so far and the trials still to run (and the time budget). */
export function eta(study) {
  if (!ACTIVE.has(study.status)) return null;
  const left = [];
  if (study.max_trials && study.trials_done > 0 && study.elapsed_seconds > 0) {
    const used = study.trials_done + (study.trials_failed || 0);
    left.push((study.elapsed_seconds / used) * Math.max(0, study.max_trials - used));
  }
  if (study.max_seconds) left.push(Math.max(0, study.max_seconds - study.elapsed_seconds));
  return left.length ? Math.min(...left) : null;
}

/** Fraction of the budget used: the largest of trials, time, examples and worker time. */
export function budgetUsed(study) {
  const parts = [];
  if (study.max_trials) parts.push((study.trials_done + (study.trials_failed || 0)) / study.max_trials);
  if (study.max_seconds) parts.push(study.elapsed_seconds / study.max_seconds);
  const budget = (study.spec && study.spec.budget) || {};
  const spent = study.cost && study.cost.spent; // the cost budgets (service/cost.py)
  if (spent && budget.max_examples) parts.push(spent.examples / budget.max_examples);
  if (spent && budget.max_worker_seconds) parts.push(spent.worker_seconds / budget.max_worker_seconds);
  if (study.status === "completed") return 1;
  return parts.length ? Math.min(1, Math.max(...parts)) : 0;
}

export function trialsText(study) {
  const failed = study.trials_failed ? ` (+${study.trials_failed} failed)` : "";
  return `${study.trials_done} / ${study.max_trials ?? "∞"}${failed}`;
}

export function spaceText(spec) {
  const space = (spec && spec.space) || {};
  // any kind: the kind, then whichever of the common settings its spec has
  const bits = [space.kind || "?"];
  if (space.method) bits.push(space.method);
  if (space.granularity !== undefined) bits.push(`granularity ${space.granularity}`);
  if (space.repeats !== undefined) bits.push(`repeats ${space.repeats}`);
  if (space.max_depth !== undefined) bits.push(`depth ≤ ${space.max_depth}`);
  return bits.join(" · ");
}

export function sourcesText(spec) {
  return ((spec && spec.sources) || []).map(modelName).join(", ");
}

function studyRow(study) {
  const spec = study.spec || {};
  const left = eta(study);
  const objectives = ((spec.evaluation || {}).objectives || []).length;
  return h("tr", { class: "study-row", dataset: { id: study.id, status: study.status } },
    h("td", {},
      h("a", { href: `#/studies/${encodeURIComponent(study.id)}`, class: "study-link" }, study.name),
      h("div", { class: "muted small mono" }, study.id, study.owner ? ` · ${study.owner}` : "")),
    h("td", {}, statusBadge(study.status),
      study.status_reason ? h("div", { class: "small status-reason", title: study.status_reason }, "stalled") : null),
    h("td", { class: "progress-cell" },
      progressBar(budgetUsed(study)),
      h("span", { class: "small trials-count" }, trialsText(study))),
    h("td", { class: "num" }, duration(study.elapsed_seconds)),
    h("td", { class: "num" }, left === null ? "—" : duration(left)),
    h("td", { class: "num best" }, study.multi_objective ? h("span", { class: "tag", title: "multi-objective: see its Pareto front" }, "Pareto") : num(study.best_value)),
    h("td", { class: "small sources", title: ((spec.sources) || []).map((x) => (typeof x === "string" ? x : JSON.stringify(x))).join("\n") },
      sourcesText(spec)),
    h("td", { class: "small" }, spaceText(spec),
      objectives > 1 ? h("div", { class: "muted" }, `${objectives} objectives`) : null),
    h("td", { class: "small" }, timeAgo(study.created_at)));
}

export function mountStudies(root, params, nav) {
  let offset = 0;
  let timer = null;
  let alive = true;
  let filters = { status: "", name: "" };
  const tableHost = h("div", { id: "studies-table" });
  const countText = h("span", { class: "muted small", id: "studies-total" });
  const pager = h("div", { class: "pager" });
  const formHost = h("div", { id: "form-host" });
  const statusSel = h("select", { "aria-label": "status filter", onchange: () => { filters.status = statusSel.value; offset = 0; load(); } },
    h("option", { value: "" }, "all statuses"),
    ["queued", "running", "paused", "completed", "failed", "cancelled"].map((st) => h("option", { value: st }, st)));
  const nameBox = h("input", { type: "search", placeholder: "name contains…", "aria-label": "name filter",
    oninput: () => { filters.name = nameBox.value; offset = 0; load(); } });
  const newButton = h("button", { type: "button", class: "primary", id: "new-study",
    onclick: () => nav(showForm ? "#/" : "#/new") }, "New study");
  let showForm = false;

  function renderForm(open) {
    showForm = open;
    newButton.textContent = open ? "Hide the form" : "New study";
    if (open && !formHost.firstChild) {
      formHost.append(specForm({ onCreated: (study) => nav(`#/studies/${encodeURIComponent(study.id)}`) }));
    }
    formHost.hidden = !open;
  }

  async function load() {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
    if (filters.status) q.set("status", filters.status);
    if (filters.name) q.set("name", filters.name);
    try {
      const page = await api(`/studies?${q}`);
      if (!alive) return;
      countText.textContent = `${page.total} stud${page.total === 1 ? "y" : "ies"}`;
      if (!page.items.length) {
        fill(tableHost, empty(filters.status || filters.name ? "No study matches." : "No studies yet.",
          filters.status || filters.name ? "Change the filters." : "Submit one with “New study”, or `evomerge submit study.yaml`."));
      } else {
        fill(tableHost, h("table", { class: "table studies" },
          h("thead", {}, h("tr", {}, ["Study", "Status", "Progress (trials)", "Elapsed", "ETA", "Best fitness", "Sources", "Space", "Created"]
            .map((t) => h("th", {}, t)))),
          h("tbody", {}, page.items.map(studyRow))));
      }
      fill(pager,
        offset > 0 ? h("button", { type: "button", class: "ghost", onclick: () => { offset = Math.max(0, offset - PAGE); load(); } }, "← newer") : null,
        page.total > PAGE ? h("span", { class: "muted small" }, `${offset + 1}–${Math.min(offset + PAGE, page.total)} of ${page.total}`) : null,
        offset + PAGE < page.total ? h("button", { type: "button", class: "ghost", onclick: () => { offset += PAGE; load(); } }, "older →") : null);
    } catch (err) {
      if (alive) fill(tableHost, errorBox(err));
    }
  }

  function schedule() {
    timer = setTimeout(async () => {
      if (!alive) return;
      if (!document.hidden) await load();
      if (alive) schedule();
    }, REFRESH_MS);
  }

  fill(root,
    h("section", { class: "page studies-page" },
      h("div", { class: "page-head" }, h("h1", {}, "Studies"), countText, h("span", { class: "spacer" }), statusSel, nameBox, newButton),
      formHost,
      h("div", { class: "card" }, tableHost, pager)));
  renderForm(Boolean(params.form));
  load();
  schedule();
  return {
    update(next) { renderForm(Boolean(next.form)); },
    refresh: load,
    unmount() { alive = false; clearTimeout(timer); },
  };
}
