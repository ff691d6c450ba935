// The dashboard's entry: the header bar (token, server), the banner, and the hash router.
//   #/                       the studies
//   #/new                    the studies, with the form for a new one open
//   #/studies/<id>           a study
//   #/studies/<id>/trials/n  a study, with trial n open

import { api, onAuth, token } from "./api.js";
import { fill, h } from "./dom.js";
import { mountStudies } from "./studies.js";
import { mountStudy } from "./study.js";

const main = document.getElementById("main");
const banner = document.getElementById("banner");
const tokenForm = document.getElementById("token-form");
const tokenInput = document.getElementById("token-input");
let current = null;
let serverAuth = null;

export function parseRoute(hash) {
  const path = (hash || "").replace(/^#/, "") || "/";
  const m = /^\/studies\/([^/]+)(?:\/trials\/(\d+))?\/?$/.exec(path);
  if (m) {
    return { kind: "study", key: m[1], params: { id: decodeURIComponent(m[1]), trial: m[2] === undefined ? null : Number(m[2]) } };
  }
  return { kind: "studies", key: "", params: { form: path === "/new" } };
}

function route(force = false) {
  const r = parseRoute(location.hash);
  if (!force && current && current.kind === r.kind && current.key === r.key) {
    current.page.update(r.params);
  } else {
    if (current) current.page.unmount();
    const mount = r.kind === "study" ? mountStudy : mountStudies;
    current = { kind: r.kind, key: r.key, page: mount(main, r.params, nav) };
    window.scrollTo(0, 0);
  }
  document.getElementById("nav-studies").classList.toggle("on", r.kind === "studies" && !r.params.form);
  document.getElementById("nav-new").classList.toggle("on", r.kind === "studies" && r.params.form);
}

export function nav(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

// ---- the banner: what needs the user's attention ------------------------------------------
function showBanner(kind, ...content) {
  banner.className = `banner ${kind}`;
  fill(banner, h("div", { class: "banner-text" }, ...content),
    h("button", { type: "button", class: "ghost", "aria-label": "dismiss", onclick: hideBanner }, "✕"));
  banner.hidden = false;
}

function hideBanner() {
  banner.hidden = true;
  fill(banner);
}

function askForToken(detail) {
  const asking = !banner.hidden && banner.classList.contains("auth");
  tokenInput.classList.add("attention");
  showBanner("auth", h("strong", {}, "This server needs an API token. "), detail ? `${detail} ` : "",
    "Paste it in the “API token” field above; it is kept in this browser (localStorage) and sent as ",
    h("code", {}, "Authorization: Bearer …"), ".");
  if (!asking) tokenInput.focus(); // once, not at every refused refresh
}

function tokenPlaceholder() {
  tokenInput.value = "";
  tokenInput.placeholder = token.get() ? "saved ✓ (paste to replace)" : "em_…";
  document.getElementById("token-forget").hidden = !token.get();
}

onAuth((event) => {
  if (event.type === "unauthorized") askForToken(event.message);
  else if (event.type === "forbidden") {
    showBanner("forbidden", h("strong", {}, "Not allowed. "), event.message);
  }
});

tokenForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const value = tokenInput.value.trim();
  if (!value) { tokenInput.focus(); return; }
  token.set(value);
  tokenInput.classList.remove("attention");
  tokenPlaceholder();
  hideBanner();
  route(true);
});

document.getElementById("token-forget").addEventListener("click", () => {
  token.set("");
  tokenPlaceholder();
  if (serverAuth) askForToken("");
  route(true);
});

/** The study controller this server runs (GET /health's `controller`): up or down, restarts. */
function controllerInfo(c) {
  if (!c) return null;  // serve --no-controller: another process runs the studies
  const restarts = c.restarts ? ` (${c.restarts} restart${c.restarts === 1 ? "" : "s"})` : "";
  const title = c.mode === "process"
    ? `the controller's own process${c.pid ? ` (pid ${c.pid})` : ""}, supervised by the API` +
      (c.last_exit ? `; last exit: ${c.last_exit}` : "")
    : "the controller runs in the API's process";
  return [" · ", h("span", { class: c.running ? null : "error-text", title },
    `controller ${c.running ? "up" : "down"}${restarts}`)];
}

async function health() {
  const info = document.getElementById("server-info");
  try {
    const hz = await api("/health");
    serverAuth = hz.auth;
    fill(info, `v${hz.version} · ${hz.database} · `, hz.auth
      ? h("span", { title: "requests need a bearer token" }, "auth on")
      : h("span", { class: "warn-text", title: "anyone who reaches this server can use it (loopback only)" }, "auth off"),
      controllerInfo(hz.controller));
    if (hz.auth && !token.get()) askForToken("");
  } catch (err) {
    const degraded = err && err.status === 503 && err.detail;
    fill(info, h("span", { class: "error-text", title: degraded ? String(err.detail) : "" },
      degraded ? `degraded: ${err.detail}` : "the service does not answer"));
  }
}

tokenPlaceholder();
window.addEventListener("hashchange", () => route());
route();
health();
