// Export and download: POST /studies/{id}/exports, poll the export until it is ready, then
// download its archive with the bearer token (fetch → Blob → object URL), or copy the curl
// command for a big model.

import { api, ApiError, authHeaders, errorFrom } from "./api.js";
import { bytes, empty, errorBox, fill, h, progressBar, sleep, statusBadge, timeAgo } from "./dom.js";

const POLL_MS = 1000;
const BROWSER_LIMIT = 2 * 1024 ** 3; // above this, a Blob in the page is a bad idea: use curl

function filenameOf(response, fallback) {
  const cd = response.headers.get("Content-Disposition") || "";
  const m = /filename="?([^";]+)"?/.exec(cd);
  return m ? m[1] : fallback;
}

export function curlCommand(exp) {
  const url = `${location.origin}${exp.archive_url}`;
  return `curl -fL -C - -H "Authorization: Bearer $EVOMERGE_TOKEN" -o ${exp.study_id}-trial${exp.trial_number}.tar '${url}'`;
}

export function cliCommand(exp) {
  return `evomerge download ${exp.study_id} ./${exp.study_id}-trial${exp.trial_number} --trial ${exp.trial_number} --url ${location.origin}`;
}

/** Download an export's archive in the page, showing progress in `status`. */
async function download(exp, status) {
  fill(status, h("span", { class: "muted small" }, "downloading…"));
  const response = await fetch(exp.archive_url, { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) throw await errorFrom(response);
  const total = Number(response.headers.get("Content-Length")) || exp.size_bytes || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let got = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
    got += value.length;
    fill(status, progressBar(total ? got / total : 0), h("span", { class: "small" }, ` ${bytes(got)} of ${bytes(total)}`));
  }
  const name = filenameOf(response, `${exp.study_id}-trial${exp.trial_number}.tar`);
  const url = URL.createObjectURL(new Blob(chunks, { type: "application/x-tar" }));
  const link = h("a", { href: url, download: name, class: "download-link" }, `save ${name} again`);
  document.body.append(link);
  link.click();
  link.remove();
  fill(status, h("span", { class: "ok-text small" }, `downloaded ${name} (${bytes(got)}) `), link);
  setTimeout(() => URL.revokeObjectURL(url), 10 * 60 * 1000);
}

function exportRow(exp) {
  const status = h("div", { class: "download-status" });
  const actions = [];
  if (exp.state === "ready") {
    const big = (exp.size_bytes || 0) > BROWSER_LIMIT;
    actions.push(h("button", { type: "button", class: "primary download", disabled: big,
      title: big ? "too big for the browser: use the command below" : "download the tar with your token",
      onclick: async (e) => {
        e.target.disabled = true;
        try { await download(exp, status); } catch (err) { fill(status, errorBox(err)); } finally { e.target.disabled = false; }
      } }, `Download ${bytes(exp.size_bytes)}`));
  }
  const inflight = exp.state === "pending" || exp.state === "running";
  return h("div", { class: "export-row", dataset: { id: exp.id, state: exp.state } },
    h("div", { class: "export-head" },
      h("strong", {}, `export ${exp.id}`), h("span", {}, ` · trial ${exp.trial_number}`), statusBadge(exp.state),
      inflight ? h("span", { class: "export-progress" }, progressBar(exp.progress), h("span", { class: "small" }, ` ${Math.round((exp.progress || 0) * 100)} %`)) : null,
      h("span", { class: "spacer" }), h("span", { class: "muted small" }, timeAgo(exp.created_at)), actions),
    exp.error ? h("div", { class: "error-text small" }, exp.error) : null,
    exp.state === "ready" ? h("div", { class: "small muted mono" }, `sha256 ${exp.sha256 || "?"} · ${exp.files.length} files`) : null,
    status,
    exp.state === "ready"
      ? h("details", { class: "curl" }, h("summary", {}, "Big model? Download with curl or the CLI (resumable)"),
        h("pre", { class: "code" }, `export EVOMERGE_TOKEN=…   # your token\n${curlCommand(exp)}\n# or: unpacked and verified\n${cliCommand(exp)}`))
      : null);
}

/** The exports card of a study; `start(trial|null)` asks for one (null: the best). */
export function exportsPanel({ studyId, multiObjective }) {
  const list = h("div", { class: "export-list", id: "export-list" });
  const message = h("div", { class: "export-message", "aria-live": "polite" });
  const rows = new Map();
  const polling = new Set();
  let alive = true;

  const drawn = new Map(); // export id -> {json, node}: a row is redrawn only when it changed

  function render() {
    const items = [...rows.values()].sort((a, b) => b.id - a.id);
    if (!items.length) {
      fill(list, empty("No exports yet.", multiObjective ? "Open a trial of the front and export it."
        : "Export the best trial, or open any trial and export it."));
      return;
    }
    fill(list, items.map((exp) => {
      const json = JSON.stringify(exp);
      let entry = drawn.get(exp.id);
      if (!entry || entry.json !== json) {
        entry = { json, node: exportRow(exp) };
        drawn.set(exp.id, entry);
      }
      return entry.node;
    }));
  }

  async function poll(id) {
    if (polling.has(id)) return;
    polling.add(id);
    try {
      while (alive) {
        const exp = await api(`/studies/${encodeURIComponent(studyId)}/exports/${id}`);
        rows.set(exp.id, exp);
        render();
        if (exp.state !== "pending" && exp.state !== "running") break;
        await sleep(POLL_MS);
      }
    } catch (err) {
      fill(message, errorBox(err));
    } finally {
      polling.delete(id);
    }
  }

  async function reload() {
    try {
      const items = await api(`/studies/${encodeURIComponent(studyId)}/exports`);
      for (const exp of items) rows.set(exp.id, exp);
      render();
      for (const exp of items) if (exp.state === "pending" || exp.state === "running") poll(exp.id);
    } catch (err) {
      fill(list, errorBox(err));
    }
  }

  async function start(trial) {
    fill(message, h("span", { class: "muted small" }, `asking for an export of ${trial === null ? "the best trial" : `trial ${trial}`}…`));
    try {
      const exp = await api(`/studies/${encodeURIComponent(studyId)}/exports`, { method: "POST", json: { trial } });
      rows.set(exp.id, exp);
      render();
      fill(message, h("span", { class: "ok-text small" }, `export ${exp.id} of trial ${exp.trial_number}: ${exp.state}`));
      poll(exp.id);
    } catch (err) {
      fill(message, errorBox(err instanceof ApiError && err.status === 403 ? new Error(`Not allowed: ${err.message}`) : err));
    }
  }

  const bestButton = multiObjective ? null : h("button", { type: "button", class: "primary", id: "export-best",
    onclick: () => start(null) }, "Export the best model");
  const node = h("div", { class: "exports" },
    h("div", { class: "toolbar" }, bestButton,
      h("span", { class: "muted small" }, "A worker writes the merged model as a Hugging Face folder; download it as a tar.")),
    message, list);
  render();
  return { node, reload, start, close() { alive = false; } };
}
