// Models and instances: what is on disk where, the instances with their stages
// and state, placing one (after a preview of the candidate placements: per-node
// memory, or why a placement is impossible), deleting one, pulling a model.

import { $, fill, h } from "./dom.js";
import { del, postJSON } from "./api.js";
import { bytes } from "./format.js";

let names = {}; // node id -> name

function notice(text, bad = false) {
  const el = $("models-notice");
  el.textContent = text;
  el.className = bad ? "notice bad" : "notice";
}

// Every model some node holds: {id: {meta, on: [names], loaded: [names]}}.
export function models(state) {
  const out = {};
  for (const n of state.nodes || []) {
    // loaded whole, or a stage of it hosted here
    const stages = Object.values(n.status?.stages || {}).map((st) => st.model);
    const loaded = new Set([...(n.status?.loaded || []), ...stages]);
    for (const m of n.info?.models || []) {
      const e = (out[m] ||= { id: m, meta: n.info?.model_meta?.[m] || {}, on: [], loaded: [] });
      e.on.push(n.name || n.id);
      if (loaded.has(m)) e.loaded.push(n.name || n.id);
    }
  }
  return out;
}

function stagesText(inst) {
  return (inst.stages || []).map((s) => `${names[s.node] || s.node} ${s.layers[0]}–${s.layers[1]}`).join(" → ");
}

async function remove(id, button) {
  button.disabled = true;
  try {
    await del(`/v1/instances/${encodeURIComponent(id)}`);
    notice(`deleted ${id}`);
  } catch (e) {
    notice(`could not delete ${id}: ${e.message}`, true);
    button.disabled = false;
  }
}

function renderInstances(state) {
  fill($("instances").tBodies[0], (state.instances || []).map((inst) =>
    h("tr", { "data-instance": inst.id },
      h("td", { class: "mono" }, inst.id, h("div", { class: "hint" }, inst.placed)),
      h("td", {}, inst.model),
      h("td", {}, h("span", { class: `pill s-${inst.state}` }, inst.state),
        inst.error ? h("div", { class: "s-failed" }, inst.error) : null),
      h("td", {}, stagesText(inst)),
      h("td", {}, h("button", { class: "small", type: "button", title: "delete this instance", onclick: (e) => remove(inst.id, e.currentTarget) }, "Delete")))));
}

function renderModels(state) {
  const all = Object.values(models(state)).sort((a, b) => a.id.localeCompare(b.id));
  fill($("models").tBodies[0], all.map((m) =>
    h("tr", { "data-model": m.id },
      h("td", {}, m.id),
      h("td", { class: "num" }, m.meta.layers ?? "–"),
      h("td", { class: "num" }, bytes(m.meta.bytes)),
      h("td", {}, m.on.join(", ")),
      h("td", {}, m.loaded.join(", ") || "–"))));
  keepOptions($("place-model"), all.map((m) => [m.id, m.id]));
  keepOptions($("pull-node"), [["", "any node"], ...(state.nodes || []).map((n) => [n.id, n.name || n.id])]);
}

// Refill a select's options without losing what the user picked.
export function keepOptions(select, pairs) {
  const was = select.value;
  const same = select.options.length === pairs.length && pairs.every(([v], i) => select.options[i].value === v);
  if (same) return;
  fill(select, pairs.map(([value, label]) => h("option", { value }, label)));
  if (pairs.some(([v]) => v === was)) select.value = was;
}

function candidate(model, c) {
  const who = c.nodes.map((n) => `${n.name} layers ${n.layers[0]}–${n.layers[1]}: needs ${bytes(n.needs)} of ${bytes(n.usable)} usable (${n.pressure})`);
  const place = async (e) => {
    e.currentTarget.disabled = true;
    try {
      const inst = await postJSON("/v1/instances", { model, stages: c.stages });
      notice(`placed ${inst.id}: ${stagesText(inst)}`);
      fill($("preview"));
    } catch (err) {
      notice(`could not place: ${err.message}`, true);
    }
  };
  return h("div", { class: c.ok ? "candidate" : "candidate no" },
    h("div", { class: "what" }, who.map((w) => h("div", {}, w)), c.ok ? null : h("div", { class: "s-failed" }, c.reason)),
    c.ok ? h("button", { class: "primary small", type: "button", onclick: place }, "Place") : null);
}

async function preview(e) {
  e.preventDefault();
  const model = $("place-model").value;
  if (!model) return notice("no model to place", true);
  const n = Number($("place-nodes").value) || 1;
  try {
    const p = await postJSON("/v1/instances/preview", { model, min_nodes: n, max_nodes: n });
    const list = p.candidates || [];
    fill($("preview"), list.length ? list.map((c) => candidate(model, c)) : h("p", { class: "empty" }, "no candidate placement"));
    notice(`${model}: ${p.layers} layers, ${bytes(p.bytes)}`);
  } catch (err) {
    fill($("preview"));
    notice(`no placement: ${err.message}`, true);
  }
}

async function pull(e) {
  e.preventDefault();
  const model = $("pull-model").value.trim();
  const node = $("pull-node").value;
  try {
    const r = await postJSON("/v1/models/pull", node ? { model, node } : { model });
    notice(`pulling ${model}${r.node ? ` on ${names[r.node] || r.node}` : ""}: progress shows on the node`);
  } catch (err) {
    notice(`could not pull ${model}: ${err.message}`, true);
  }
}

export function setup() {
  $("place-form").addEventListener("submit", preview);
  $("pull-form").addEventListener("submit", pull);
}

export function render(state) {
  names = Object.fromEntries((state.nodes || []).map((n) => [n.id, n.name || n.id]));
  renderInstances(state);
  renderModels(state);
}
