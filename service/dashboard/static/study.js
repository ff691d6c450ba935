// The study page (#/studies/<id>[/trials/<n>]): live over the event stream, no reload.

import { allPages, api, ApiError, followEvents } from "./api.js";
import { debounce, duration, errorBox, facts, fill, h, modelName, num, progressBar, statusBadge, timeAgo } from "./dom.js";
import { costPanel } from "./cost.js";
import { exportsPanel } from "./exports.js";
import { baselinesTable, fitnessChart, objectiveNames, objectivesChart, paretoChart } from "./plots.js";
import { recipeCard } from "./recipecard.js";
import { budgetUsed, eta, spaceText, trialsText } from "./studies.js";
import { trialDetail, trialTable } from "./trials.js";

const ACTIONS = {
  pause: { label: "Pause", from: ["queued", "running"], title: "running trials finish; no new ones start" },
  resume: { label: "Resume", from: ["paused"], title: "the controller continues where it stopped" },
  cancel: { label: "Cancel", from: ["queued", "running", "paused"], title: "final: trials so far stay" },
};

function card(title, id, body, extra = null) {
  return h("section", { class: "card", id },
    h("div", { class: "card-head" }, h("h2", {}, title), h("span", { class: "spacer" }), extra), body);
}

export function mountStudy(root, params, nav) {
  const id = params.id;
  const path = `/studies/${encodeURIComponent(id)}`;
  const st = {
    study: null, receivedAt: Date.now(), trials: new Map(), capped: false, baselines: [], front: [],
    mode: "number", drawerTrial: null, events: [],
  };
  let alive = true;
  let stream = null;
  let ticker = null;
  let ui = null;
  let wanted = params; // the latest route parameters (a trial to open)

  // ---- data ------------------------------------------------------------------------------
  async function loadStudy() {
    const study = await api(path);
    if (!alive) return;
    const bestChanged = st.study && st.study.best_trial_number !== study.best_trial_number;
    st.study = study;
    st.receivedAt = Date.now();
    renderHead();
    if (bestChanged) renderResults();
  }

  async function loadAllTrials() {
    const { items, total } = await allPages(`${path}/trials`, { sort: "number" });
    if (!alive) return;
    st.trials = new Map(items.map((t) => [t.number, t]));
    st.capped = items.length < total;
    renderResults();
  }

  async function refreshTrials() {
    try {
      const page = await api(`${path}/trials?sort=-finished_at&limit=100`);
      if (!alive) return;
      for (const t of page.items) st.trials.set(t.number, t);
      const known = [...st.trials.values()].filter((t) => t.finished_at).length;
      if (st.study && st.study.trials_done + st.study.trials_failed - known > 60) await loadAllTrials();
      if (st.study && st.study.multi_objective) await loadFront();
      // baselines are scored beside the trials: follow them until each is final
      if (!st.baselines.length || st.baselines.some((b) => b.state === "pending" || b.state === "running")) {
        await loadBaselines();
      }
      renderResults();
      ui.table.reload();
    } catch (err) {
      showError(err);
    }
  }
  const scheduleTrials = debounce(refreshTrials, 250);

  async function loadBaselines() {
    try {
      st.baselines = await api(`${path}/baselines`);
    } catch (err) {
      st.baselines = [];
      if (!(err instanceof ApiError && err.status === 404)) showError(err);
    }
    if (alive) renderResults();
  }

  async function loadFront() {
    st.front = await api(`${path}/front`);
  }

  // ---- header ----------------------------------------------------------------------------
  function elapsedNow() {
    const s = st.study;
    return s.status === "running" ? s.elapsed_seconds + (Date.now() - st.receivedAt) / 1000 : s.elapsed_seconds;
  }

  // decimal GB with one decimal, as the plan's own messages (workers.memory_plan.gb)
  function gb(n) {
    return typeof n === "number" ? `${(n / 1e9).toFixed(1)} GB` : "—";
  }

  // A worker's memory plan in one line; its notes and the other tiers in the tooltip.
  function memoryText(plan) {
    const tiers = Object.entries(plan.tiers || {}).map(([name, t]) => `${name}: ${t.fits ? "fits" : t.why_not}`);
    const title = [...tiers, ...(plan.notes || [])].join("\n");
    return h("span", { id: "study-memory", title, dataset: { tier: plan.tier } },
      h("strong", {}, plan.tier), ` · ${gb(plan.device_bytes)} on ${plan.device} · ${gb(plan.host_bytes)} host · `
      + `moves ${gb(plan.moved_bytes_per_candidate)} per candidate`
      + (plan.cache_task_vectors ? " · task vectors cached" : ""));
  }

  function renderHead() {
    const s = st.study;
    const spec = s.spec || {};
    const ev = spec.evaluation || {};
    const left = eta({ ...s, elapsed_seconds: elapsedNow() });
    for (const [action, def] of Object.entries(ACTIONS)) {
      ui.buttons[action].disabled = !def.from.includes(s.status);
    }
    fill(ui.status, statusBadge(s.status));
    fill(ui.progress,
      progressBar(budgetUsed({ ...s, elapsed_seconds: elapsedNow() })),
      h("span", { class: "trials-count", id: "trial-count", dataset: { done: s.trials_done } }, trialsText(s)),
      h("span", { class: "muted" }, " trials · elapsed "), h("span", { id: "elapsed" }, duration(elapsedNow())),
      s.max_seconds ? h("span", { class: "muted" }, ` of ${duration(s.max_seconds)}`) : null,
      h("span", { class: "muted" }, " · ETA "), h("span", { id: "eta" }, left === null ? "—" : duration(left)));
    const best = s.multi_objective
      ? h("a", { href: "#pareto" , onclick: (e) => { e.preventDefault(); document.getElementById("pareto-card")?.scrollIntoView({ behavior: "smooth" }); } }, "a Pareto front")
      : s.best_trial_number !== null && s.best_trial_number !== undefined
        ? h("span", {}, h("strong", { id: "best-value" }, num(s.best_value)), " · ",
          h("a", { href: `#/studies/${encodeURIComponent(id)}/trials/${s.best_trial_number}` }, `trial ${s.best_trial_number}`))
        : h("span", { class: "muted" }, "none yet");
    fill(ui.facts, facts([
      ["best", best],
      ["sources", h("span", { title: (spec.sources || []).map((x) => (typeof x === "string" ? x : JSON.stringify(x))).join("\n") },
        (spec.sources || []).map(modelName).join(", "))],
      spec.base_model ? ["base", modelName(spec.base_model)] : null,
      ["space", spaceText(spec)],
      ["objectives", objectiveNames(spec).join(", ") + (s.multi_objective ? " (multi-objective)" : "")],
      ["evaluator", ev.evaluator || "lm_eval"],
      ["optimizer", `${(spec.optimizer || {}).name || "optuna-cmaes"} · parallelism ${spec.parallelism ?? 1} · seed ${spec.seed ?? 0}`],
      s.memory_plan ? ["memory", memoryText(s.memory_plan)] : null,
      ["owner", s.owner || "—"],
      ["created", timeAgo(s.created_at)],
      ["id", h("span", { class: "mono" }, s.id)],
    ]));
    fill(ui.notes,
      s.error ? h("div", { class: "error-box", id: "study-error" }, h("strong", {}, "The study failed: "), s.error) : null,
      s.status_reason ? h("div", { class: "warn-box", id: "study-status-reason", role: "status" }, h("strong", {}, "Not progressing: "), s.status_reason) : null,
      (s.warnings || []).length ? h("div", { class: "warn-box" }, h("strong", {}, "Warnings"), h("ul", {}, s.warnings.map((w) => h("li", {}, w)))) : null);
    fill(ui.cost, costPanel(s));
    ui.title.textContent = s.name;
    document.title = `${s.name} · evomerge`;
  }

  async function act(action) {
    const button = ui.buttons[action];
    if (action === "cancel" && button.dataset.confirm !== "1") {
      button.dataset.confirm = "1";
      button.textContent = "Really cancel?";
      setTimeout(() => { button.dataset.confirm = ""; button.textContent = ACTIONS.cancel.label; }, 4000);
      return;
    }
    button.dataset.confirm = "";
    button.textContent = ACTIONS[action].label;
    fill(ui.actionMsg);
    try {
      st.study = await api(`${path}/${action}`, { method: "POST" });
      st.receivedAt = Date.now();
      renderHead();
      fill(ui.actionMsg, h("span", { class: "ok-text small" }, `${action}: the study is ${st.study.status}`));
    } catch (err) {
      fill(ui.actionMsg, errorBox(err instanceof ApiError && err.status === 403 ? new Error(`Not allowed: ${err.message}`) : err));
    }
  }

  // ---- results -----------------------------------------------------------------------------
  function trials() {
    return [...st.trials.values()];
  }

  function openTrial(number) {
    nav(`#/studies/${encodeURIComponent(id)}/trials/${number}`);
  }

  const renderResults = debounce(() => {
    if (!alive || !ui || !st.study) return;
    const all = trials();
    const s = st.study;
    if (!s.multi_objective) {
      fill(ui.fitness, fitnessChart(all, st.baselines, { mode: st.mode, bestNumber: s.best_trial_number, onClick: openTrial }),
        chartNote(all));
    }
    fill(ui.objectives, objectivesChart(all, { mode: st.mode, onClick: openTrial }));
    if (s.multi_objective) {
      const names = objectiveNames(s.spec);
      fill(ui.pareto, paretoChart(all, st.front, names, {
        onClick: (n) => { ui.recipe.select(n); openTrial(n); }, selected: ui.recipe.selected }),
        h("p", { class: "muted small" }, `${st.front.length} trial${st.front.length === 1 ? "" : "s"} on the front`,
          names.length > 2 ? ` (first two of ${names.length} objectives shown)` : "",
          ". Values are oriented so that higher is better (an objective to minimize is negated). Click a point to open its trial."));
    }
    const best = s.multi_objective ? null : st.trials.get(s.best_trial_number) || null;
    fill(ui.baselines, baselinesTable(st.baselines, best, { multiObjective: s.multi_objective }));
    ui.recipe.update(s, all, st.front);
  }, 60);

  function chartNote(all) {
    const failed = all.filter((t) => t.state === "failed").length;
    const bits = [];
    if (failed) bits.push(`${failed} failed trial${failed > 1 ? "s" : ""} not plotted`);
    if (st.baselines.some((b) => Number.isFinite(b.fitness))) bits.push("dashed lines: baselines");
    if (st.capped) bits.push(`showing the first ${st.trials.size} trials`);
    return bits.length ? h("p", { class: "muted small" }, bits.join(" · ")) : null;
  }

  // ---- the trial panel -----------------------------------------------------------------------
  async function showDrawer(number) {
    st.drawerTrial = number;
    ui.drawer.hidden = false;
    ui.backdrop.hidden = false;
    fill(ui.drawerBody, h("p", { class: "muted" }, `Loading trial ${number}…`));
    try {
      const node = await trialDetail(id, number, {
        onExport: (n) => { ui.exports.start(n); ui.exportsCard.scrollIntoView({ behavior: "smooth" }); closeDrawer(); },
        onClose: closeDrawer,
      });
      if (st.drawerTrial === number) fill(ui.drawerBody, node);
    } catch (err) {
      fill(ui.drawerBody, h("div", { class: "drawer-head" }, h("h2", {}, `Trial ${number}`), h("span", { class: "spacer" }),
        h("button", { type: "button", class: "ghost", id: "close-trial", onclick: closeDrawer }, "✕")), errorBox(err));
    }
  }

  function closeDrawer() {
    nav(`#/studies/${encodeURIComponent(id)}`);
  }

  function hideDrawer() {
    st.drawerTrial = null;
    if (!ui) return;
    ui.drawer.hidden = true;
    ui.backdrop.hidden = true;
  }

  function onKey(e) {
    if (e.key === "Escape" && st.drawerTrial !== null) closeDrawer();
  }

  // ---- live events -----------------------------------------------------------------------
  function setLive(state, detail) {
    const text = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", ended: "final", error: "not live" }[state] || state;
    ui.live.dataset.state = state;
    ui.live.textContent = text;
    ui.live.title = detail || (state === "live" ? "following the study's events" : state === "ended" ? "the study has ended: nothing more will change" : "");
  }

  const renderEvents = debounce(() => {
    if (!alive || !ui) return;
    fill(ui.events, st.events.map(({ event, summary, at }) => h("li", { class: `event kind-${event}` },
      h("span", { class: "event-kind" }, event), h("span", { class: "small" }, summary),
      h("span", { class: "muted small event-time" }, timeAgo(at)))));
  }, 100);

  function logEvent(event, data) {
    const d = (data && data.data) || {};
    const summary = [
      d.number !== undefined ? `trial ${d.number}` : null,
      Array.isArray(d.values) ? `values ${d.values.map((v) => num(v)).join(", ")}` : null,
      d.error ? String(d.error).slice(0, 140) : null,
      d.status ? `→ ${d.status}` : null,
      d.by ? `by ${d.by}` : null,
      d.export !== undefined ? `export ${d.export}` : null,
    ].filter(Boolean).join(" · ");
    st.events.unshift({ event, summary, at: data && data.at }); // newest first; a replay of old ones is cheap
    if (st.events.length > 40) st.events.length = 40;
    renderEvents();
  }

  function onEvent({ event, data }) {
    if (!alive) return;
    if (event === "progress" || event === "end") {
      if (data && data.status === "deleted") {
        fill(ui.notes, errorBox("This study was deleted."));
        return;
      }
      const before = st.study;
      st.study = { ...st.study, ...data, id: st.study.id };
      st.receivedAt = Date.now();
      renderHead();
      if (before.best_trial_number !== st.study.best_trial_number || before.trials_done !== st.study.trials_done) scheduleTrials();
      if (before.status !== st.study.status || event === "end") {
        loadStudy().catch(showError);
        scheduleTrials();
        loadBaselines();
        ui.exports.reload();
      }
      return;
    }
    logEvent(event, data);
    if (event.startsWith("trial_") || event.startsWith("heldout")) scheduleTrials();
    if (event.includes("baseline")) loadBaselines();
    if (event.startsWith("export")) ui.exports.reload();
    if (event.startsWith("study_")) loadStudy().catch(showError);
  }

  function showError(err) {
    if (ui) fill(ui.actionMsg, errorBox(err));
  }

  // ---- layout ------------------------------------------------------------------------------
  function build() {
    const s = st.study;
    const modeButtons = h("div", { class: "seg", id: "x-mode" },
      [["number", "trial number"], ["time", "finish time"]].map(([m, text]) => h("button", {
        type: "button", class: m === st.mode ? "on" : "", dataset: { mode: m },
        onclick: () => { st.mode = m; for (const b of modeButtons.children) b.classList.toggle("on", b.dataset.mode === m); renderResults(); },
      }, text)));
    const buttons = Object.fromEntries(Object.entries(ACTIONS).map(([action, def]) => [action,
      h("button", { type: "button", id: `action-${action}`, class: action === "cancel" ? "danger" : "", title: def.title,
        onclick: () => act(action) }, def.label)]));
    ui = {
      title: h("h1", { id: "study-name" }),
      status: h("span", { id: "study-status" }),
      live: h("span", { class: "live", id: "live-state", dataset: { state: "connecting" } }, "connecting…"),
      buttons,
      actionMsg: h("div", { class: "action-msg", id: "action-msg", "aria-live": "polite" }),
      progress: h("div", { class: "progress-line" }),
      facts: h("div", {}),
      notes: h("div", {}),
      fitness: h("div", { class: "chart-host", id: "fitness-host" }),
      objectives: h("div", { class: "chart-host", id: "objectives-host" }),
      pareto: h("div", { class: "chart-host", id: "pareto-host" }),
      baselines: h("div", { id: "baselines-host" }),
      cost: h("div", { id: "cost-host" }),
      recipe: recipeCard({ studyId: id }),
      events: h("ol", { class: "event-log", id: "event-log" }),
      drawerBody: h("div", { class: "drawer-body" }),
      table: trialTable({ studyId: id, onOpen: openTrial, multiObjective: s.multi_objective }),
      exports: exportsPanel({ studyId: id, multiObjective: s.multi_objective }),
    };
    ui.drawer = h("aside", { class: "drawer", id: "trial-drawer", hidden: true, "aria-label": "trial" }, ui.drawerBody);
    ui.backdrop = h("div", { class: "backdrop", hidden: true, onclick: closeDrawer });
    ui.exportsCard = card("Export & download", "exports-card", ui.exports.node);
    const recipeTitle = s.multi_objective ? "Recipe of a front trial"
      : (s.spec.space || {}).kind === "stacking" ? "The best layer path, and how it changed" : "The best recipe, and how it changed";
    fill(root, h("section", { class: "page study-page", dataset: { id } },
      h("div", { class: "card study-head", id: "study-head" },
        h("div", { class: "crumbs small" }, h("a", { href: "#/" }, "Studies"), " / ", h("span", { class: "mono" }, id)),
        h("div", { class: "title-row" }, ui.title, ui.status, ui.live, h("span", { class: "spacer" }),
          buttons.pause, buttons.resume, buttons.cancel),
        ui.actionMsg, ui.progress, ui.facts, ui.notes),
      h("div", { class: "grid" },
        s.multi_objective
          ? card("Pareto front", "pareto-card", ui.pareto)
          : card("Fitness over the search", "fitness-card", ui.fitness, modeButtons),
        card("Score per objective", "objectives-card", ui.objectives, s.multi_objective ? modeButtons : null),
        card(recipeTitle, "recipe-card", ui.recipe.node),
        card("Baselines", "baselines-card", ui.baselines),
        card("Cost", "cost-card", ui.cost),
        card("Trials", "trials-card", ui.table.node),
        ui.exportsCard,
        card("Live events", "events-card", ui.events)),
      ui.backdrop, ui.drawer));
  }

  async function start() {
    fill(root, h("p", { class: "muted" }, "Loading the study…"));
    try {
      st.study = await api(path);
    } catch (err) {
      fill(root, h("section", { class: "page" }, h("div", { class: "crumbs small" }, h("a", { href: "#/" }, "Studies")),
        errorBox(err), err instanceof ApiError && err.status === 404 ? h("p", {}, h("a", { href: "#/" }, "Back to the studies")) : null));
      return;
    }
    if (!alive) return;
    build();
    renderHead();
    renderResults();
    document.addEventListener("keydown", onKey);
    ticker = setInterval(() => { if (st.study && st.study.status === "running") renderHeadTimes(); }, 1000);
    if (wanted.trial !== null && wanted.trial !== undefined) showDrawer(wanted.trial);
    await Promise.all([
      loadAllTrials().catch(showError),
      loadBaselines(),
      st.study.multi_objective ? loadFront().catch(showError) : null,
      ui.table.reload(),
      ui.exports.reload(),
    ]);
    renderResults();
    if (!alive) return;
    stream = followEvents(id, { onEvent, onState: setLive });
  }

  function renderHeadTimes() {
    const el = document.getElementById("elapsed");
    const etaEl = document.getElementById("eta");
    if (el) el.textContent = duration(elapsedNow());
    const left = eta({ ...st.study, elapsed_seconds: elapsedNow() });
    if (etaEl) etaEl.textContent = left === null ? "—" : duration(left);
  }

  start();
  return {
    update(next) {
      wanted = next;
      if (!ui) return; // start() opens it once the page is built
      if (next.trial !== null && next.trial !== undefined) showDrawer(next.trial);
      else hideDrawer();
    },
    unmount() {
      alive = false;
      if (stream) stream.close();
      if (ui) { ui.exports.close(); ui.recipe.close(); }
      clearInterval(ticker);
      document.removeEventListener("keydown", onKey);
    },
  };
}
