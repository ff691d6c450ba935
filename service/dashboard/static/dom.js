// DOM building and number/time formatting shared by every view. No dependencies.

const SVG_NS = "http://www.w3.org/2000/svg";

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "text") node.textContent = String(value);
    else if (key === "style" && typeof value === "object") Object.assign(node.style, value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") node.addEventListener(key.slice(2), value);
    else if (key === "class" && node instanceof SVGElement) node.setAttribute("class", value);
    else if (key === "class") node.className = value;
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** An HTML element: h("div", {class: "card"}, child, "text", [more]). */
export function h(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same call as h(). */
export function s(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
  return node;
}

/** Replace node's children. */
export function fill(node, ...children) {
  clear(node);
  append(node, children);
  return node;
}

// ---- formatting -------------------------------------------------------------------------
export function num(v, digits = 4) {
  if (v === null || v === undefined || v === "") return "—";
  if (typeof v !== "number") return String(v);
  if (!Number.isFinite(v)) return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
}

export function signed(v, digits = 3) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  return (v > 0 ? "+" : v < 0 ? "−" : "±") + num(Math.abs(v), digits);
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "—";
  const sec = Math.max(0, seconds);
  if (sec < 10) return `${sec.toFixed(1)} s`;
  if (sec < 60) return `${Math.round(sec)} s`;
  const m = Math.floor(sec / 60);
  if (m < 60) return `${m} min ${String(Math.round(sec % 60)).padStart(2, "0")} s`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr} h ${String(m % 60).padStart(2, "0")} min`;
  return `${Math.floor(hr / 24)} d ${hr % 24} h`;
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function parseTime(iso) {
  if (!iso) return null;
  const t = Date.parse(iso);
  return Number.isNaN(t) ? null : t;
}

export function dateTime(iso) {
  const t = parseTime(iso);
  if (t === null) return "—";
  const d = new Date(t);
  const pad = (x) => String(x).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function ago(iso) {
  const t = parseTime(iso);
  if (t === null) return "—";
  const sec = (Date.now() - t) / 1000;
  if (sec < 45) return "just now";
  return `${duration(sec).replace(/ \d+ s$/, "")} ago`;
}

/** A <time> showing "3 min ago", the exact date in its tooltip. */
export function timeAgo(iso) {
  return h("time", { datetime: iso || "", title: dateTime(iso) }, ago(iso));
}

/** The short name of a model reference: the folder's name, a hub id, or a study reference. */
export function modelName(ref) {
  if (ref && typeof ref === "object") return `study:${ref.study}/${ref.trial ?? "best"}`;
  const text = String(ref ?? "");
  if (text.startsWith("/") || text.startsWith(".")) return text.replace(/\/+$/, "").split("/").pop();
  return text;
}

/** A label with every absolute path in it shortened to its last part
 *  ("source: /models/v2/math" -> "source: math"). */
export function shortLabel(text) {
  return String(text ?? "").replace(/(^|\s)((?:\/[^\s/]+)+\/?)/g,
    (_, before, path) => before + path.replace(/\/+$/, "").split("/").pop());
}

// ---- small widgets ----------------------------------------------------------------------
export function statusBadge(status) {
  return h("span", { class: `badge status-${status}`, dataset: { status } }, status);
}

export function progressBar(fraction, label) {
  const f = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
  const bar = h("span", { class: "bar-fill" });
  bar.style.width = `${(f * 100).toFixed(1)}%`;
  return h("span", { class: "bar", title: label || `${Math.round(f * 100)} %` }, bar);
}

export function empty(text, hint) {
  return h("div", { class: "empty" }, h("p", {}, text), hint ? h("p", { class: "muted small" }, hint) : null);
}

export function errorBox(err) {
  const message = err && err.message ? err.message : String(err);
  return h("div", { class: "error-box", role: "alert" }, message);
}

/** A label/value list: [["status", node], ...]. */
export function facts(rows) {
  return h("dl", { class: "facts" }, rows.filter(Boolean).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

/** Objects as YAML-ish text (for reading a recipe; not a YAML serializer for round trips).
 *  `digits`: round numbers to that many significant digits (0: as they are). */
export function toYaml(value, indent = 0, digits = 0) {
  const pad = "  ".repeat(indent);
  const scalar = (v) => {
    if (v === null || v === undefined) return "null";
    if (typeof v === "number") return digits && !Number.isInteger(v) ? String(Number(v.toPrecision(digits))) : String(v);
    if (typeof v === "string") {
      const plain = /^[\w./@+-][\w ./@+:-]*$/.test(v) && !/^(true|false|null|yes|no|~)$/i.test(v) && !/: /.test(v);
      return plain ? v : JSON.stringify(v);
    }
    return String(v);
  };
  const isScalar = (v) => v === null || typeof v !== "object";
  const inline = (v) => isScalar(v) || (Array.isArray(v) && v.every(isScalar)) || (!Array.isArray(v) && !Object.keys(v).length);
  const flat = (v) => (isScalar(v) ? scalar(v) : Array.isArray(v) ? `[${v.map(scalar).join(", ")}]` : "{}");
  if (inline(value)) return pad + flat(value);
  if (Array.isArray(value)) {
    return value.map((item) => `${pad}- ${toYaml(item, indent + 1, digits).trimStart()}`).join("\n");
  }
  return Object.entries(value).map(([k, v]) => (inline(v) ? `${pad}${k}: ${flat(v)}` : `${pad}${k}:\n${toYaml(v, indent + 1, digits)}`))
    .join("\n");
}

/** Run fn at most once per `ms`, the last call winning (trailing). */
export function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => { timer = null; fn(...args); }, ms);
  };
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
