// The study page's recipe card: the best recipe drawn (heatmaps or the layer path), and a
// slider through the trials that raised the best fitness (or through the Pareto front), all
// frames on one colour scale so that the change reads.

import { api } from "./api.js";
import { errorBox, fill, h, num } from "./dom.js";
import { improvements, objectiveNames } from "./plots.js";
import { domainsOver, recipeView } from "./views.js";

const MAX_FRAMES = 60;

/** The frames: the trials that raised the best fitness, ending with the controller's best;
 *  for a multi-objective study the front, by its first objective. */
export function recipeFrames(study, trials, front) {
  if (study.multi_objective) {
    return [...front].sort((a, b) => (a.values?.[0] ?? 0) - (b.values?.[0] ?? 0)).slice(0, MAX_FRAMES);
  }
  const list = improvements(trials);
  const best = trials.find((t) => t.number === study.best_trial_number);
  if (best && best.state === "complete" && !list.includes(best)) {
    if (list.length && list[list.length - 1].fitness === best.fitness) list.pop();
    list.push(best);
  }
  return list.slice(-MAX_FRAMES);
}

export function recipeCard({ studyId }) {
  const path = `/studies/${encodeURIComponent(studyId)}`;
  const views = new Map(); // trial number -> promise of its view
  const controls = h("div", { class: "recipe-controls" });
  const host = h("div", { id: "recipe-host" });
  let selected = null; // a trial number; null: follow the best
  let data = null; // {study, trials, front}
  let drawn = ""; // what is on screen, to skip a redraw that would change nothing
  let token = 0;
  let prefetching = false;
  let closed = false;

  function view(number) {
    if (!views.has(number)) views.set(number, api(`${path}/trials/${number}/view`).catch((error) => ({ error })));
    return views.get(number);
  }

  async function render() {
    if (!data || closed) return;
    const { study } = data;
    const list = recipeFrames(study, data.trials, data.front);
    const mine = ++token;
    if (!list.length) {
      drawn = "";
      fill(controls);
      fill(host, h("div", { class: "empty" }, h("p", {}, "No complete trial yet."),
        h("p", { class: "muted small" }, "The best recipe is drawn here once a trial finishes.")));
      return;
    }
    let index = list.length - 1;
    if (study.multi_objective || selected !== null) index = Math.max(0, list.findIndex((t) => t.number === selected));
    const trial = list[index];
    const known = list.filter((t) => views.has(t.number));
    const signature = `${list.map((t) => t.number).join(",")}|${index}|${known.length}`;
    if (signature === drawn) return;
    const slider = h("input", { type: "range", min: 0, max: list.length - 1, value: index, id: "recipe-slider",
      "aria-label": "step through the search", disabled: list.length < 2,
      oninput: () => {
        const k = Number(slider.value);
        selected = !study.multi_objective && k === list.length - 1 ? null : list[k].number;
        render();
      } });
    const label = study.multi_objective
      ? `front trial ${index + 1} of ${list.length} (by ${objectiveNames(study.spec)[0] || "objective 1"})`
      : `improvement ${index + 1} of ${list.length}${index === list.length - 1 ? " (the best so far)" : ""}`;
    const v = await view(trial.number);
    const loaded = await Promise.all(known.map((t) => views.get(t.number)));
    if (mine !== token || closed) return;
    drawn = signature;
    fill(controls,
      h("label", { class: "slider-label small", for: "recipe-slider" }, label), slider,
      h("span", { class: "small", id: "recipe-trial" }, "trial ",
        h("a", { href: `#${path}/trials/${trial.number}` }, String(trial.number)),
        study.multi_objective ? ` · values ${(trial.values || []).map((x) => num(x)).join(", ")}`
          : ` · fitness ${num(trial.fitness)}`));
    fill(host, v && v.error ? errorBox(v.error) : recipeView(v, domainsOver(loaded.filter((x) => x && !x.error))));
    prefetch(list);
  }

  async function prefetch(list) {
    if (prefetching) return;
    const missing = list.filter((t) => !views.has(t.number));
    if (!missing.length) return;
    prefetching = true;
    for (const t of missing) {
      if (closed) break;
      await view(t.number);
    }
    prefetching = false;
    render(); // every frame known: one colour scale
  }

  return {
    node: h("div", {}, controls, host),
    /** Draw for the study's current data. */
    update(study, trials, front) {
      data = { study, trials, front };
      render();
    },
    /** Show this trial (e.g. a clicked point of the front). */
    select(number) {
      selected = number;
      render();
    },
    get selected() { return selected; },
    close() { closed = true; },
  };
}
