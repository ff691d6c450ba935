// Drawings of a recipe, from GET /studies/{id}/trials/{n}/view:
//  - parameter space: one heatmap per parameter (source models × layers);
//  - layer stacking: the path through the source layers, with each layer's scale.

import { colorAt, truncate } from "./charts.js";
import { h, modelName, num, s } from "./dom.js";

// ---- colours ------------------------------------------------------------------------------
const WHITE = [247, 249, 252];
const BLUE = [31, 94, 186];
const RED = [196, 62, 44];

function mix(a, b, t) {
  const k = Math.min(1, Math.max(0, t));
  return `rgb(${a.map((v, i) => Math.round(v + (b[i] - v) * k)).join(",")})`;
}

/** A stable colour domain for a parameter: [0, 1] for weights and densities, symmetric
 *  around 0 when negative values occur, the data's range otherwise. */
export function domainOf(values) {
  const finite = values.filter((v) => typeof v === "number" && Number.isFinite(v));
  if (!finite.length) return [0, 1];
  const lo = Math.min(...finite);
  const hi = Math.max(...finite);
  if (lo < 0) {
    const a = Math.max(Math.abs(lo), Math.abs(hi), 1e-9);
    return [-a, a];
  }
  return [0, Math.max(hi, 1)];
}

export function colorFor(v, [lo, hi]) {
  if (typeof v !== "number" || !Number.isFinite(v)) return "#e3e6ea";
  if (lo < 0) return v < 0 ? mix(WHITE, RED, v / lo) : mix(WHITE, BLUE, v / hi);
  return mix(WHITE, BLUE, hi === lo ? 0.5 : (v - lo) / (hi - lo));
}

function textColor(v, [lo, hi]) {
  if (typeof v !== "number") return "#333";
  const t = lo < 0 ? Math.abs(v) / Math.max(Math.abs(lo), hi) : (v - lo) / ((hi - lo) || 1);
  return t > 0.55 ? "#fff" : "#1b1f24";
}

// ---- parameter space: heatmaps --------------------------------------------------------------
/** One panel as an SVG heatmap: rows = source models, columns = layers. */
export function heatmap(panel, domain = null) {
  const models = (panel.models || []).map(modelName);
  const layers = panel.layers || [];
  const values = panel.values || [];
  const dom = domain || domainOf(values.flat());
  const labelW = 150;
  const cw = Math.max(16, Math.min(64, Math.floor(600 / Math.max(1, layers.length))));
  const ch = 30;
  const top = 22;
  const width = labelW + cw * layers.length + 70;
  const height = top + ch * models.length + 8;
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "heatmap", role: "img",
    dataset: { parameter: panel.parameter, filter: panel.filter || "" } });
  svg.style.maxWidth = `${width}px`; // never scaled up: text keeps its size
  const every = Math.ceil(layers.length / Math.max(1, Math.floor((cw * layers.length) / 28)));
  layers.forEach((layer, j) => {
    if (j % every === 0 || j === layers.length - 1) {
      svg.append(s("text", { x: labelW + j * cw + cw / 2, y: top - 7, class: "tick", "text-anchor": "middle" },
        String(layer)));
    }
  });
  models.forEach((model, i) => {
    svg.append(s("text", { x: labelW - 8, y: top + i * ch + ch / 2 + 4, class: "row-label", "text-anchor": "end" },
      truncate(String(model), 22), s("title", {}, String(model))));
    layers.forEach((layer, j) => {
      const v = (values[i] || [])[j];
      const cell = s("rect", { x: labelW + j * cw, y: top + i * ch, width: cw - 1, height: ch - 1,
        fill: colorFor(v, dom), class: "cell" },
      s("title", {}, `${model}, layer ${layer}: ${panel.parameter} = ${typeof v === "number" ? num(v) : JSON.stringify(v)}`));
      svg.append(cell);
      if (cw >= 34) {
        svg.append(s("text", { x: labelW + j * cw + cw / 2, y: top + i * ch + ch / 2 + 4, class: "cell-text",
          "text-anchor": "middle", fill: textColor(v, dom) }, typeof v === "number" ? num(v, 2) : v === null || v === undefined ? "—" : String(v)));
      }
    });
  });
  // colour legend
  const lx = labelW + cw * layers.length + 14;
  const steps = 8;
  const lh = Math.max(ch * models.length, 40);
  for (let k = 0; k < steps; k += 1) {
    const v = dom[1] - ((dom[1] - dom[0]) * k) / (steps - 1);
    svg.append(s("rect", { x: lx, y: top + (lh * k) / steps, width: 12, height: lh / steps + 0.5, fill: colorFor(v, dom) }));
  }
  svg.append(s("text", { x: lx + 16, y: top + 8, class: "tick" }, num(dom[1], 2)));
  svg.append(s("text", { x: lx + 16, y: top + lh, class: "tick" }, num(dom[0], 2)));
  return svg;
}

function panelTitle(panel) {
  return panel.filter ? `${panel.parameter} · ${panel.filter}` : panel.parameter;
}

/** All panels of a parameter-space view, each with its title; `domains` maps a parameter
 *  name to a fixed colour domain (so that frames of a slider compare). */
export function parameterView(view, domains = {}) {
  const panels = view.panels || [];
  const head = h("p", { class: "muted small view-meta" },
    `method ${view.method || "?"}`,
    view.base_model ? ` · base ${modelName(view.base_model)}` : "",
    ` · ${view.num_layers ?? "?"} layer${view.num_layers === 1 ? "" : "s"}`,
    Object.keys(view.global_parameters || {}).length
      ? ` · ${Object.entries(view.global_parameters).map(([k, v]) => `${k} = ${typeof v === "number" ? num(v) : v}`).join(", ")}`
      : "");
  if (!panels.length) return h("div", { class: "recipe-view" }, head, h("p", { class: "muted" }, "This recipe has no per-model parameters."));
  return h("div", { class: "recipe-view parameter-view" }, head,
    h("div", { class: "panels" }, panels.map((panel) => h("figure", { class: "panel" },
      h("figcaption", {}, panelTitle(panel)),
      heatmap(panel, domains[panelTitle(panel)] || null)))));
}

// ---- layer stacking: the path -------------------------------------------------------------
/** The layer path: output position (x) → source model and layer (y), a dot per output layer
 *  sized by its scale; under it a strip of the output layers coloured by source model. */
export function stackingView(view) {
  const path = view.path || [];
  if (!path.length) return h("div", { class: "recipe-view" }, h("p", { class: "muted" }, "An empty layer path."));
  const models = view.models && view.models.length ? view.models : [...new Set(path.map((p) => p.model))];
  const short = (m) => modelName(m);
  const depth = {};
  for (const p of path) depth[p.model] = Math.max(depth[p.model] ?? 0, p.layer + 1);
  const rows = models.map((m) => depth[m] || 1);
  const totalRows = rows.reduce((a, b) => a + b, 0);
  const rh = Math.max(9, Math.min(24, Math.floor(300 / totalRows)));
  const labelW = 150;
  const cw = Math.max(16, Math.min(56, Math.floor(620 / path.length)));
  const top = 10;
  const gap = 8;
  const bandTop = [];
  let y = top;
  models.forEach((m, i) => { bandTop.push(y); y += rows[i] * rh + gap; });
  const stripY = y + 8;
  const height = stripY + 52;
  const width = Math.max(labelW + cw * path.length + 20, 470);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "stacking", role: "img" });
  svg.style.maxWidth = `${width}px`;
  const yOf = (model, layer) => bandTop[models.indexOf(model)] + (layer + 0.5) * rh;
  const xOf = (i) => labelW + i * cw + cw / 2;

  models.forEach((m, i) => {
    svg.append(s("rect", { x: labelW - 4, y: bandTop[i] - 2, width: cw * path.length + 8, height: rows[i] * rh + 4,
      class: "band", fill: colorAt(i), "fill-opacity": 0.07 }));
    svg.append(s("text", { x: labelW - 40, y: bandTop[i] + (rows[i] * rh) / 2 + 4, class: "row-label", "text-anchor": "end",
      fill: colorAt(i) }, truncate(short(m), 16), s("title", {}, String(m))));
    const every = Math.max(1, Math.ceil(12 / rh));
    for (let l = 0; l < rows[i]; l += every) {
      svg.append(s("text", { x: labelW - 10, y: bandTop[i] + (l + 0.5) * rh + 3, class: "tick", "text-anchor": "end" }, `L${l}`));
    }
  });
  const d = path.map((p, i) => `${i ? "L" : "M"}${xOf(i)},${yOf(p.model, p.layer)}`).join("");
  svg.append(s("path", { d, class: "layer-path", fill: "none" }));
  path.forEach((p, i) => {
    const color = colorAt(models.indexOf(p.model));
    const r = 3 + 2.5 * Math.min(2, Math.max(0, Number(p.scale ?? 1)));
    svg.append(s("circle", { cx: xOf(i), cy: yOf(p.model, p.layer), r, fill: color, class: "path-step",
      dataset: { out: p.out_layer, model: p.model, layer: p.layer, scale: p.scale } },
    s("title", {}, `output layer ${p.out_layer} ← ${short(p.model)} layer ${p.layer}, scale ${num(p.scale)}`)));
  });
  // the strip: one box per output layer
  path.forEach((p, i) => {
    const color = colorAt(models.indexOf(p.model));
    const x = labelW + i * cw;
    svg.append(s("rect", { x, y: stripY, width: cw - 2, height: 22, rx: 3, fill: color,
      "fill-opacity": 0.35 + 0.5 * Math.min(1, Number(p.scale ?? 1)), class: "strip-box" },
    s("title", {}, `output ${p.out_layer}: ${short(p.model)} L${p.layer} × ${num(p.scale)}`)));
    if (cw >= 22) svg.append(s("text", { x: x + cw / 2 - 1, y: stripY + 15, class: "strip-text", "text-anchor": "middle" }, String(p.layer)));
    if (cw >= 30 && Number(p.scale) !== 1) {
      svg.append(s("text", { x: x + cw / 2 - 1, y: stripY + 36, class: "tick", "text-anchor": "middle" }, `×${num(p.scale, 2)}`));
    }
  });
  svg.append(s("text", { x: labelW - 10, y: stripY + 15, class: "tick", "text-anchor": "end" }, "output"));
  svg.append(s("text", { x: labelW + (cw * path.length) / 2, y: height - 2, class: "axis-label", "text-anchor": "middle" },
    `output layers 0 … ${path.length - 1} (dot size: scale)`));

  const legend = h("p", { class: "legend-row small" }, models.map((m, i) => {
    const sw = h("span", { class: "swatch" });
    sw.style.background = colorAt(i);
    return h("span", { class: "legend-item", title: String(m) }, sw, short(m));
  }));
  const table = h("details", { class: "path-table" }, h("summary", {}, `the path as a table (${path.length} layers)`),
    h("table", { class: "table compact" },
      h("thead", {}, h("tr", {}, h("th", {}, "output"), h("th", {}, "model"), h("th", {}, "source layer"), h("th", {}, "scale"))),
      h("tbody", {}, path.map((p) => h("tr", {}, h("td", {}, p.out_layer), h("td", {}, short(p.model)), h("td", {}, p.layer),
        h("td", {}, num(p.scale)))))));
  return h("div", { class: "recipe-view stacking-view" },
    h("p", { class: "muted small view-meta" }, `${view.method || "passthrough"} · ${path.length} output layers from ${models.length} model${models.length > 1 ? "s" : ""}`),
    legend, svg, table);
}

/** The drawing for any view. */
export function recipeView(view, domains = {}) {
  if (!view) return h("p", { class: "muted" }, "No recipe.");
  if (view.kind === "stacking") return stackingView(view);
  return parameterView(view, domains);
}

/** Fixed colour domains per panel over several views (e.g. all frames of the slider). */
export function domainsOver(views) {
  const acc = {};
  for (const view of views) {
    for (const panel of (view && view.panels) || []) {
      const key = panelTitle(panel);
      (acc[key] = acc[key] || []).push(...(panel.values || []).flat());
    }
  }
  return Object.fromEntries(Object.entries(acc).map(([k, v]) => [k, domainOf(v)]));
}
