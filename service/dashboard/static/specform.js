// The "new study" form: paste a YAML or JSON study spec, submit it (POST /studies); a refused
// spec (422) shows each problem next to the line of the field it names.

import { api, ApiError } from "./api.js";
import { errorBox, fill, h } from "./dom.js";

export const EXAMPLE_SPEC = `# A study spec (docs/study-spec.md). Paths are on the server, under its model roots.
name: my first merge
sources: [models/math, models/language]
base_model: models/base
space:
  kind: parameter        # or: stacking
  method: ties
  granularity: 1
evaluation:
  evaluator: lm_eval
  objectives:
    - {task: zoo_xl_add, metric: exact_match, limit: 200}
  options: {task_dirs: ["evomerge:zoo"]}
optimizer: {name: optuna-cmaes}
budget: {max_trials: 100}
parallelism: 2
`;

/** Where a problem's `loc` points to in the spec's text: {line (0-based, -1: nowhere), exact}.
 *  Follows block and flow YAML, and pretty or one-line JSON, by key names and list positions. */
export function locateLine(text, loc) {
  const lines = text.split(/\r\n|\r|\n/);
  const parts = (loc || []).filter((p, i) => !(i === 0 && p === "body"));
  let cur = { line: -1, indent: -1, col: 0 }; // the enclosing field found so far (-1: the root)
  for (const part of parts) {
    const next = typeof part === "number" ? findItem(lines, cur, part) : findKey(lines, cur, String(part));
    if (!next) return { line: cur.line, exact: false };
    cur = next;
  }
  return { line: cur.line, exact: parts.length > 0 };
}

const blankLine = (t) => !t.trim() || /^\s*#/.test(t);
const indentOf = (t) => t.search(/\S/);

/** The lines under `cur` (its block): [index, text] until one indented no deeper than it. */
function block(lines, cur, { items = false } = {}) {
  const out = [];
  for (let i = cur.line + 1; i < lines.length; i += 1) {
    const t = lines[i];
    if (blankLine(t)) continue;
    const ind = indentOf(t);
    if (cur.line >= 0 && (ind < cur.indent || (ind === cur.indent && !(items && /^\s*-(\s|$)/.test(t))))) break;
    out.push([i, t]);
  }
  return out;
}

function findKey(lines, cur, key) {
  const escaped = key.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
  const re = new RegExp(`(^|[\\s{,-])["']?${escaped}["']?\\s*:`);
  if (cur.line >= 0) { // on the same line, flow style: {kind: parameter, method: x}
    const m = re.exec(lines[cur.line].slice(cur.col));
    if (m) return { line: cur.line, indent: cur.indent, col: cur.col + m.index + m[0].length };
  }
  let best = null; // the shallowest match: a key of this level, not of a nested one
  for (const [i, t] of block(lines, cur)) {
    const m = re.exec(t);
    if (m && (best === null || indentOf(t) < best.indent)) best = { line: i, indent: indentOf(t), col: m.index + m[0].length };
  }
  return best;
}

function findItem(lines, cur, index) {
  // a flow list with its items on this line: [a, b] (a JSON list opened at the end of the line is a block)
  if (cur.line >= 0 && /\[\s*[^\s]/.test(lines[cur.line].slice(cur.col))) return { ...cur, col: lines[cur.line].length };
  const body = block(lines, cur, { items: true });
  if (!body.length) return null;
  const itemIndent = Math.min(...body.map(([, t]) => indentOf(t)));
  let count = -1;
  for (const [i, t] of body) {
    if (indentOf(t) !== itemIndent || /^\s*[\]}]/.test(t)) continue;
    count += 1;
    if (count === index) {
      const dash = /^\s*-\s*/.exec(t);
      return { line: i, indent: itemIndent, col: dash ? dash[0].length : itemIndent };
    }
  }
  return null;
}

function locText(loc) {
  const parts = (loc || []).filter((p, i) => !(i === 0 && p === "body"));
  return parts.length ? parts.map((p, i) => (typeof p === "number" ? `[${p}]` : i ? `.${p}` : p)).join("") : "(the spec)";
}

function problemNode(p, where) {
  return h("div", { class: "problem", role: "note", dataset: { loc: locText(p.loc), type: p.type || "" } },
    h("span", { class: "problem-loc" }, locText(p.loc)),
    h("span", { class: "problem-msg" }, p.msg),
    p.fix ? h("span", { class: "problem-fix" }, `fix: ${p.fix}`) : null,
    where && !where.exact && where.line >= 0 ? h("span", { class: "muted small" }, " (shown at the nearest enclosing field)") : null);
}

/** The spec's lines, numbered, each problem inserted right under the line of its field. */
export function annotatedSpec(text, problems, onLine) {
  const lines = text.split(/\r\n|\r|\n/);
  const at = new Map();
  const general = [];
  for (const p of problems) {
    const where = locateLine(text, p.loc);
    if (where.line < 0) general.push([p, where]);
    else at.set(where.line, [...(at.get(where.line) || []), [p, where]]);
  }
  const rows = [];
  lines.forEach((line, i) => {
    const flagged = at.has(i);
    rows.push(h("div", { class: `src-line${flagged ? " flagged" : ""}`, dataset: { line: i + 1 } },
      h("button", { type: "button", class: "line-no", title: "edit this line", onclick: () => onLine(i) }, String(i + 1)),
      h("code", {}, line || " ")));
    for (const [p, where] of at.get(i) || []) rows.push(problemNode(p, where));
  });
  return h("div", { class: "annotated" },
    general.length ? h("div", { class: "general-problems" }, general.map(([p, w]) => problemNode(p, w))) : null,
    h("div", { class: "src" }, rows));
}

function selectLine(textarea, line) {
  const lines = textarea.value.split("\n");
  const start = lines.slice(0, line).reduce((n, l) => n + l.length + 1, 0);
  textarea.focus();
  textarea.setSelectionRange(start, start + (lines[line] || "").length);
  const lineHeight = parseFloat(getComputedStyle(textarea).lineHeight) || 18;
  textarea.scrollTop = Math.max(0, (line - 3) * lineHeight);
}

export function contentTypeOf(text, format) {
  if (format === "json") return "application/json";
  if (format === "yaml") return "application/yaml";
  return /^\s*[{[]/.test(text) ? "application/json" : "application/yaml";
}

/** The form; `onCreated(study)` runs after a 201. */
export function specForm({ onCreated, initial = "" }) {
  const textarea = h("textarea", { id: "spec-text", class: "spec-text", rows: 18, spellcheck: "false",
    placeholder: "Paste a study spec here (YAML or JSON), or load the example.", "aria-label": "study spec" });
  textarea.value = initial;
  const format = h("select", { id: "spec-format", "aria-label": "format" },
    h("option", { value: "auto" }, "auto-detect"), h("option", { value: "yaml" }, "YAML"), h("option", { value: "json" }, "JSON"));
  const result = h("div", { id: "spec-result", class: "spec-result", "aria-live": "polite" });
  const submit = h("button", { type: "submit", id: "spec-submit", class: "primary" }, "Submit study");

  async function send(event) {
    event.preventDefault();
    const text = textarea.value;
    if (!text.trim()) {
      fill(result, errorBox("The spec is empty: paste one, or load the example."));
      return;
    }
    submit.disabled = true;
    fill(result, h("p", { class: "muted" }, "Validating… (the server reads the models' headers)"));
    try {
      const study = await api("/studies", { method: "POST", body: text, contentType: contentTypeOf(text, format.value) });
      fill(result, h("p", { class: "ok-box" }, `Study ${study.id} queued.`));
      onCreated(study);
    } catch (err) {
      if (err instanceof ApiError && err.status === 422 && err.problems.length) {
        fill(result,
          h("div", { class: "error-box", role: "alert", id: "spec-problems" },
            `The spec was refused: ${err.problems.length} problem${err.problems.length > 1 ? "s" : ""}, each shown under the line it names.`),
          annotatedSpec(text, err.problems, (line) => selectLine(textarea, line)));
      } else {
        fill(result, errorBox(err));
      }
    } finally {
      submit.disabled = false;
    }
  }

  return h("form", { class: "card spec-form", id: "spec-form", onsubmit: send },
    h("div", { class: "card-head" }, h("h2", {}, "New study"),
      h("span", { class: "muted small" }, "YAML or JSON, as in docs/study-spec.md; everything is checked before any compute is spent.")),
    textarea,
    h("div", { class: "form-row" }, submit, format,
      h("button", { type: "button", class: "ghost", onclick: () => { textarea.value = EXAMPLE_SPEC; textarea.focus(); } }, "Load example"),
      h("button", { type: "button", class: "ghost", onclick: () => { textarea.value = ""; fill(result); } }, "Clear")),
    result);
}
