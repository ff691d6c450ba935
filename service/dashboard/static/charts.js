// A small SVG charting helper: linear scales, nice ticks, and one x/y chart that draws
// dots, step lines and lines, horizontal reference lines and a legend.

import { dateTime, num, s } from "./dom.js";

export const PALETTE = ["#2f6fdf", "#e4572e", "#17a398", "#f2a541", "#8e5ccf", "#d6457a", "#5b8c2a",
  "#3d9bd1", "#a0522d", "#6c757d"];

export function colorAt(i) {
  return PALETTE[i % PALETTE.length];
}

/** Round tick values covering [lo, hi], about `count` of them. */
export function niceTicks(lo, hi, count = 5, minStep = 0) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (lo === hi) return [lo];
  const span = hi - lo;
  const raw = Math.max(span / Math.max(1, count), minStep);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => x >= raw) || 10 * mag;
  const start = Math.ceil(lo / step - 1e-9) * step;
  const out = [];
  for (let v = start; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

export function scale([d0, d1], [r0, r1]) {
  const k = d1 === d0 ? 0 : (r1 - r0) / (d1 - d0);
  const f = (v) => (d1 === d0 ? (r0 + r1) / 2 : r0 + (v - d0) * k);
  f.domain = [d0, d1];
  return f;
}

/** [min, max] of values, padded a little, widened when flat. */
export function extent(values, pad = 0.05) {
  const finite = values.filter((v) => Number.isFinite(v));
  if (!finite.length) return [0, 1];
  let lo = Math.min(...finite);
  let hi = Math.max(...finite);
  if (lo === hi) {
    const d = Math.abs(lo) > 0 ? Math.abs(lo) * 0.1 : 0.5;
    return [lo - d, hi + d];
  }
  const d = (hi - lo) * pad;
  lo -= d;
  hi += d;
  return [lo, hi];
}

function timeTick(ms, span) {
  const d = new Date(ms);
  const pad = (x) => String(x).padStart(2, "0");
  if (span < 20e3) return `${pad(d.getMinutes())}:${pad(d.getSeconds())}.${Math.floor(d.getMilliseconds() / 100)}`;
  if (span < 3 * 3600e3) return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  if (span < 2 * 86400e3) return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
  return `${d.getMonth() + 1}/${d.getDate()} ${pad(d.getHours())}h`;
}

/**
 * An x/y chart as an <svg>.
 *  series: [{name, color, mode: "dots" | "step" | "line", points: [{x, y, title, key, cls}], onClick}]
 *  hlines: [{y, label, name, color}]   (reference lines, e.g. baselines; name: the full label)
 *  x / y: {label, time: bool, integer: bool (ticks on whole numbers), domain: [lo, hi], format}
 */
export function xyChart({ series = [], hlines = [], x = {}, y = {}, width = 760, height = 300, className = "",
  legend = true }) {
  const hasLegend = legend && series.some((ser) => ser.name && !ser.hideInLegend);
  const m = { top: hasLegend ? 30 : 14, right: hlines.length ? 128 : 18, bottom: 40, left: 74 };
  const iw = width - m.left - m.right;
  const ih = height - m.top - m.bottom;
  const all = series.flatMap((ser) => ser.points);
  const xs = x.domain || extent(all.map((p) => p.x), 0.03);
  const ys = y.domain || extent([...all.map((p) => p.y), ...hlines.map((l) => l.y)], 0.08);
  const sx = scale(xs, [m.left, m.left + iw]);
  const sy = scale(ys, [m.top + ih, m.top]);
  const root = s("svg", { viewBox: `0 0 ${width} ${height}`, class: `chart ${className}`, role: "img",
    preserveAspectRatio: "xMidYMid meet" });

  // grid and axes
  const grid = s("g", { class: "grid" });
  const yTicks = niceTicks(ys[0], ys[1], Math.max(2, Math.round(ih / 45)));
  for (const t of yTicks) {
    const yy = sy(t);
    grid.append(s("line", { x1: m.left, x2: m.left + iw, y1: yy, y2: yy }));
    grid.append(s("text", { x: m.left - 8, y: yy + 4, class: "tick", "text-anchor": "end" }, (y.format || num)(t)));
  }
  const xTicks = niceTicks(xs[0], xs[1], Math.max(2, Math.round(iw / (x.time ? 110 : 70))), x.integer ? 1 : 0);
  const xfmt = x.format || (x.time ? (v) => timeTick(v, xs[1] - xs[0]) : (v) => num(v));
  for (const t of xTicks) {
    const xx = sx(t);
    grid.append(s("line", { x1: xx, x2: xx, y1: m.top, y2: m.top + ih, class: "vgrid" }));
    grid.append(s("text", { x: xx, y: m.top + ih + 16, class: "tick", "text-anchor": "middle" }, xfmt(t)));
  }
  root.append(grid);
  root.append(s("rect", { x: m.left, y: m.top, width: iw, height: ih, class: "frame" }));
  if (x.label) root.append(s("text", { x: m.left + iw / 2, y: height - 6, class: "axis-label", "text-anchor": "middle" }, x.label));
  if (y.label) {
    root.append(s("text", { x: 13, y: m.top + ih / 2, class: "axis-label", "text-anchor": "middle",
      transform: `rotate(-90 13 ${m.top + ih / 2})` }, y.label));
  }

  // reference lines
  hlines.forEach((l, i) => {
    if (!Number.isFinite(l.y)) return;
    const yy = sy(l.y);
    const g = s("g", { class: "hline", dataset: { name: l.name || l.label || "" } },
      s("line", { x1: m.left, x2: m.left + iw, y1: yy, y2: yy, stroke: l.color || "#888" }),
      s("text", { x: m.left + iw + 6, y: yy + 4 + (i % 2 ? 0 : 0), class: "hline-label", fill: l.color || "#555" },
        truncate(l.label || "", 20)),
      s("title", {}, `${l.name || l.label}: ${num(l.y)}`));
    root.append(g);
  });

  // series
  series.forEach((ser, i) => {
    const color = ser.color || colorAt(i);
    const g = s("g", { class: `series series-${ser.mode || "dots"}`, dataset: { name: ser.name || "" } });
    const pts = ser.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
    if (ser.mode === "step" || ser.mode === "line") {
      if (pts.length) {
        let d = `M${sx(pts[0].x)},${sy(pts[0].y)}`;
        for (let k = 1; k < pts.length; k += 1) {
          if (ser.mode === "step") d += `H${sx(pts[k].x)}V${sy(pts[k].y)}`;
          else d += `L${sx(pts[k].x)},${sy(pts[k].y)}`;
        }
        if (ser.mode === "step" && ser.extendTo !== undefined) d += `H${sx(ser.extendTo)}`;
        g.append(s("path", { d, stroke: color, fill: "none", class: "series-line" }));
      }
    }
    if ((ser.mode !== "line" && ser.mode !== "step") || ser.markers) {
      for (const p of pts) {
        const c = s("circle", { cx: sx(p.x), cy: sy(p.y), r: p.r || ser.r || 4, fill: p.color || color,
          class: `pt ${p.cls || ""} ${ser.onClick ? "clickable" : ""}`, dataset: p.key !== undefined ? { key: p.key } : {} },
          s("title", {}, p.title || `${num(p.x)}, ${num(p.y)}`));
        if (ser.onClick) c.addEventListener("click", () => ser.onClick(p));
        g.append(c);
      }
    }
    root.append(g);
  });

  if (hasLegend) {
    const named = series.filter((ser) => ser.name && !ser.hideInLegend);
    let lx = m.left;
    named.forEach((ser) => {
      const i = series.indexOf(ser);
      const color = ser.color || colorAt(i);
      const item = s("g", { class: "legend" },
        ser.mode === "step" || ser.mode === "line"
          ? s("line", { x1: lx, x2: lx + 14, y1: 12, y2: 12, stroke: color, "stroke-width": 2.5 })
          : s("circle", { cx: lx + 7, cy: 12, r: 4, fill: color }),
        s("text", { x: lx + 19, y: 16 }, ser.name));
      root.append(item);
      lx += 30 + 7 * ser.name.length;
    });
  }
  return root;
}

export function truncate(text, n) {
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

/** x of a trial on a time axis: when it finished. */
export function finishedMs(trial) {
  const t = Date.parse(trial.finished_at || "");
  return Number.isNaN(t) ? null : t;
}

export function timeTitle(ms) {
  return dateTime(new Date(ms).toISOString());
}
