// Talking to this API: its key (kept in this browser), JSON calls, and the
// server-sent event streams read with fetch (EventSource cannot send a key).

const KEY = "exo.apiKey";
const listeners = new Set();

export function apiKey() {
  return localStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY, key);
  else localStorage.removeItem(KEY);
}

// Called with no argument when the API answers 401: the page asks for a key.
export function onUnauthorized(fn) {
  listeners.add(fn);
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body?.error?.message || `HTTP ${status}`);
    this.status = status;
    this.code = body?.error?.code || null;
  }
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

export async function call(method, path, body, signal) {
  const init = { method, headers: headers(body ? { "content-type": "application/json" } : {}), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const res = await fetch(path, init);
  if (res.status === 401) listeners.forEach((fn) => fn());
  if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
  return res;
}

export const getJSON = async (path) => (await call("GET", path)).json();
export const postJSON = async (path, body) => (await call("POST", path, body)).json();
export const del = async (path) => (await call("DELETE", path)).json();

// Each server-sent event of a response as {event, data, comment}: `comment` is
// a line starting with ':' (the API's keep-alives say what the cluster is doing).
export async function* events(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      const ev = { event: "message", data: null, comment: null };
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) ev.comment = line.slice(1).trim();
        else if (line.startsWith("event:")) ev.event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) ev.data = data.join("\n");
      yield ev;
    }
  }
}

// The cluster's state as it changes: `onState(state)` for each, `onLink(up)`
// when the stream opens or drops. Reconnects by itself, backing off to 5 s.
export function watchCluster(onState, onLink) {
  let wait = 500;
  (async function loop() {
    for (;;) {
      try {
        const res = await call("GET", "/v1/cluster/events");
        wait = 500;
        onLink(true);
        for await (const ev of events(res)) {
          if (ev.event === "cluster" && ev.data) onState(JSON.parse(ev.data));
        }
      } catch (e) {
        console.info("cluster stream:", e.message);
      }
      onLink(false);
      await new Promise((r) => setTimeout(r, wait));
      wait = Math.min(wait * 2, 5000);
    }
  })();
}
