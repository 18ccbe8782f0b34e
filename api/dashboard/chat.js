// The chat: pick a model, send, watch the answer stream with its time to first
// token and tokens/s; Stop cancels the request on the cluster (POST
// /v1/cancel/ID: the node drops it at its next step), not only this page's read.

import { $, fill, h } from "./dom.js";
import { call, events, postJSON } from "./api.js";
import { keepOptions, models } from "./models.js";
import { ms } from "./format.js";

const history = []; // {role, content} of this conversation
let running = null; // {id, controller, stopped}

function status(text) {
  $("chat-status").textContent = text;
}

function bubble(role, text = "") {
  $("chat-empty")?.remove();
  const body = h("span", { class: "body" }, text);
  const el = h("div", { class: `msg ${role}`, "data-role": role }, body);
  $("messages").append(el);
  el.scrollIntoView({ block: "end" });
  return { el, body };
}

function busy(on) {
  $("chat-send").hidden = on;
  $("chat-stop").hidden = !on;
  $("chat-input").disabled = on;
}

// Models one can chat with: those with a ready instance first, then the rest on
// disk (the cluster places one on first use), then those downloading (a request
// waits for its download, with its progress).
function choices(state) {
  const ready = new Set((state.instances || []).filter((i) => i.state === "ready").map((i) => i.model));
  const all = Object.keys(models(state));
  for (const m of ready) if (!all.includes(m)) all.push(m);
  const coming = new Set();
  for (const n of state.nodes || []) {
    for (const d of n.status?.downloads || []) {
      if (!d.error && d.state !== "done" && !all.includes(d.model)) coming.add(d.model);
    }
  }
  all.sort((a, b) => (ready.has(b) - ready.has(a)) || a.localeCompare(b));
  return [
    ...all.map((m) => [m, ready.has(m) ? m : `${m} (not placed)`]),
    ...[...coming].sort().map((m) => [m, `${m} (downloading)`]),
  ];
}

async function send(e) {
  e.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  const model = $("chat-model").value;
  if (!text || running) return;
  if (!model) return status("no model: pull one or start a node that has one");
  input.value = "";
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant");
  const meta = h("span", { class: "meta" });
  out.el.append(meta);
  const controller = new AbortController();
  running = { id: null, controller, stopped: false };
  busy(true);
  status("sending…");
  const t0 = performance.now();
  let first = null;
  let tokens = 0;
  let answer = "";
  let thinking = null;
  let failure = null;
  try {
    const res = await call("POST", "/v1/chat/completions", {
      model,
      messages: history,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Math.max(1, Math.min(32768, Number($("chat-max").value) || 512)),
    }, controller.signal);
    for await (const ev of events(res)) {
      if (ev.comment) status(`cluster: ${ev.comment}`);
      if (!ev.data || ev.data === "[DONE]") continue;
      const chunk = JSON.parse(ev.data);
      if (chunk.error) { failure = chunk.error; break; }
      running.id ||= chunk.id;
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      const delta = chunk.choices?.[0]?.delta || {};
      if (delta.reasoning_content) {
        thinking ||= out.el.insertBefore(h("span", { class: "thinking" }), out.body);
        thinking.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        first ??= performance.now();
        answer += delta.content;
        out.body.textContent = answer;
        if (!chunk.usage) tokens += 1;
        const secs = (performance.now() - first) / 1000;
        status(`streaming · ${tokens} tokens${secs > 0.2 ? ` · ${(tokens / secs).toFixed(1)} tok/s` : ""}`);
        out.el.scrollIntoView({ block: "end" });
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") failure = { message: err.message, code: err.code };
  }
  const stopped = running.stopped || failure?.code === "cancelled";
  const ttft = first !== null ? (first - t0) / 1000 : null;
  const secs = first !== null ? (performance.now() - first) / 1000 : 0;
  const figures = [`TTFT ${ms(ttft)}`, `${tokens} tokens`];
  if (secs > 0 && tokens > 1) figures.push(`${((tokens - 1) / secs).toFixed(1)} tok/s`);
  if (stopped) {
    out.el.classList.add("stopped");
    meta.textContent = `stopped · ${figures.join(" · ")}`;
    status("stopped: the cluster dropped the request");
  } else if (failure) {
    out.el.classList.add("failed");
    meta.textContent = `the cluster failed the request: ${failure.message}`;
    status("");
  } else {
    meta.textContent = figures.join(" · ");
    status("");
  }
  if (answer) history.push({ role: "assistant", content: answer });
  running = null;
  busy(false);
  $("chat-input").focus();
}

async function stop() {
  if (!running) return;
  running.stopped = true;
  const id = running.id;
  status("stopping…");
  try {
    // On the cluster first: the node drops it at its next step and the stream
    // ends with "cancelled"; only if that fails does the page just stop reading.
    if (id) await postJSON(`/v1/cancel/${encodeURIComponent(id)}`);
    else running.controller.abort();
  } catch (err) {
    status(`could not cancel on the cluster (${err.message}); closing the stream`);
    running?.controller.abort();
  }
}

export function setup() {
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", stop);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) $("chat-form").requestSubmit();
  });
  $("chat-clear").addEventListener("click", () => {
    if (running) return;
    history.length = 0;
    fill($("messages"), h("p", { class: "empty", id: "chat-empty" }, "A new conversation."));
    status("");
  });
}

export function render(state) {
  keepOptions($("chat-model"), choices(state));
}
