// The JSON API as the dashboard calls it: the bearer token, errors, and the event stream.
//
// The token lives in localStorage ("evomerge.token") and goes out as `Authorization: Bearer`.
// A 401 tells the header bar to ask for a token; a 403 carries the API's detail (which scope
// is missing). EventSource cannot send a header, so the event stream is read with fetch()
// and parsed here; it reconnects with ?after=<last event id>.

const TOKEN_KEY = "evomerge.token";
const listeners = new Set();

export const token = {
  get() {
    try { return localStorage.getItem(TOKEN_KEY) || ""; } catch { return ""; }
  },
  set(value) {
    const v = (value || "").trim();
    try {
      if (v) localStorage.setItem(TOKEN_KEY, v);
      else localStorage.removeItem(TOKEN_KEY);
    } catch { /* storage disabled: the token lasts for this page only */ }
    emit({ type: "token", token: v });
  },
};

/** Listen to what the API says about auth: {type: "unauthorized" | "forbidden" | "token", message}. */
export function onAuth(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function emit(event) {
  for (const fn of listeners) fn(event);
}

export function authHeaders() {
  const t = token.get();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

export class ApiError extends Error {
  constructor(status, message, { problems = [], detail = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.problems = problems;
    this.detail = detail;
  }
}

/** The problems of a refused spec, whichever shape the 422 takes:
 *  {detail: [{loc, msg, fix, type}]} or {detail: {message, problems: [...]}}. */
export function problemsOf(detail) {
  if (Array.isArray(detail)) return detail.filter((p) => p && typeof p === "object" && "msg" in p);
  if (detail && typeof detail === "object" && Array.isArray(detail.problems)) return detail.problems;
  return [];
}

function messageOf(status, detail, problems) {
  if (typeof detail === "string") return detail;
  if (detail && typeof detail === "object" && typeof detail.message === "string") return detail.message;
  if (problems.length) return `${problems.length} problem${problems.length > 1 ? "s" : ""} with the request`;
  return `the server answered ${status}`;
}

export async function errorFrom(response) {
  let body = null;
  try { body = await response.json(); } catch { /* not JSON */ }
  const detail = body && typeof body === "object" ? body.detail : null;
  const problems = problemsOf(detail);
  const err = new ApiError(response.status, messageOf(response.status, detail, problems), { problems, detail });
  if (response.status === 401) emit({ type: "unauthorized", message: err.message });
  if (response.status === 403) emit({ type: "forbidden", message: err.message });
  return err;
}

/** Call the API. `json` sends a JSON body; `body` + `contentType` send raw text. */
export async function api(path, { method = "GET", json, body, contentType, signal, raw = false } = {}) {
  const headers = { Accept: "application/json", ...authHeaders() };
  let payload = body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(json);
  } else if (contentType) {
    headers["Content-Type"] = contentType;
  }
  let response;
  try {
    // a GET asks again every time, with the ETag of what the browser kept: a 304 reuses it
    const cache = method === "GET" ? "no-cache" : "no-store";
    response = await fetch(path, { method, headers, body: payload, signal, cache });
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, `the service does not answer (${err && err.message ? err.message : err}); is it running?`);
  }
  if (!response.ok) throw await errorFrom(response);
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** Every item of a paged list (`{items, total, limit, offset}`), page by page, up to `cap`: by the
 *  cursor (`after` = the last page's `next_after`) where the list gives one, else by offset. */
export async function allPages(path, params = {}, { cap = 20000, pageSize = 500, signal } = {}) {
  const items = [];
  let total = 0;
  let after = null;
  while (items.length < cap) {
    const at = after !== null ? { after: String(after) } : { offset: String(items.length) };
    const q = new URLSearchParams({ ...params, limit: String(pageSize), ...at });
    const page = await api(`${path}?${q}`, { signal });
    items.push(...page.items);
    total = page.total;
    if (items.length >= total || page.items.length === 0) break;
    after = page.next_after ?? null;
  }
  return { items, total };
}

// ---- server-sent events -----------------------------------------------------------------

/** Parse a text/event-stream body, calling onMessage({id, event, data}) per message. */
export async function readEventStream(body, onMessage) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  let event = "";
  let id = null;
  const line = (text) => {
    if (text === "") {
      if (data.length) onMessage({ id, event: event || "message", data: data.join("\n") });
      data = [];
      event = "";
      id = null;
      return;
    }
    if (text.startsWith(":")) return; // a comment (keep-alive)
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") event = value;
    else if (field === "id" && !value.includes("\0")) id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    for (;;) {
      const match = /\r\n|\r|\n/.exec(buffer);
      if (!match) break;
      // a lone \r at the end may be the first half of \r\n: wait for the next chunk
      if (match[0] === "\r" && match.index === buffer.length - 1) break;
      line(buffer.slice(0, match.index));
      buffer = buffer.slice(match.index + match[0].length);
    }
  }
  if (buffer) line(buffer);
  line("");
}

/**
 * Follow a study's events: onEvent({id, event, data}) for each message (data parsed as JSON),
 * onState("connecting" | "live" | "reconnecting" | "ended" | "error", detail).
 * Reconnects with ?after=<last id> after a drop; stops at `end`, at close(), or on a 404.
 */
export function followEvents(studyId, { onEvent, onState = () => {} }) {
  let lastId = null;
  let stopped = false;
  let controller = null;
  let delay = 1000;
  let wake = null;
  const unsubscribe = onAuth((e) => { if (e.type === "token" && wake) wake(); });

  const pause = (ms) => new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    wake = () => { clearTimeout(timer); resolve(); };
  });

  async function run() {
    while (!stopped) {
      controller = new AbortController();
      onState(lastId === null ? "connecting" : "reconnecting");
      let ended = false;
      try {
        const query = lastId !== null ? `?after=${encodeURIComponent(lastId)}` : "";
        const response = await fetch(`/studies/${encodeURIComponent(studyId)}/events${query}`, {
          headers: { Accept: "text/event-stream", ...authHeaders() }, signal: controller.signal, cache: "no-store",
        });
        if (!response.ok) {
          const err = await errorFrom(response);
          onState("error", err.message);
          if (response.status === 404) return;
          await pause(response.status === 401 || response.status === 403 ? 60000 : delay);
          delay = Math.min(delay * 2, 15000);
          continue;
        }
        onState("live");
        delay = 1000;
        await readEventStream(response.body, (message) => {
          if (message.id !== null && message.id !== "") lastId = message.id;
          let parsed = null;
          try { parsed = JSON.parse(message.data); } catch { parsed = message.data; }
          if (message.event === "end") ended = true;
          onEvent({ id: message.id, event: message.event, data: parsed });
        });
      } catch (err) {
        if (stopped) return;
      }
      if (ended) {
        onState("ended");
        return;
      }
      if (stopped) return;
      onState("reconnecting");
      await pause(delay);
      delay = Math.min(delay * 2, 15000);
    }
  }

  run();
  return {
    close() {
      stopped = true;
      unsubscribe();
      if (controller) controller.abort();
      if (wake) wake();
    },
    get lastId() { return lastId; },
  };
}
