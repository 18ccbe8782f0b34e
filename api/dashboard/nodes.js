// One card per node: its machine, memory and pressure, models, what its engine
// is doing, its stages, its downloads (with progress and ETA), its broker link.

import { $, fill, h } from "./dom.js";
import { bytes, duration, pct } from "./format.js";

function meter(frac, extra = "") {
  const cls = frac > 0.9 ? "meter bad" : frac > 0.75 ? "meter warn" : "meter";
  return h("div", { class: `${cls} ${extra}` }, h("span", { style: `width:${Math.min(100, Math.max(0, frac * 100)).toFixed(1)}%` }));
}

function downloads(node) {
  return (node.status?.downloads || []).map((d) => {
    const frac = d.total ? d.done / d.total : 0;
    const figures = [`${bytes(d.done)} of ${bytes(d.total)} (${pct(frac)})`];
    if (d.rate) figures.push(`${bytes(d.rate)}/s`);
    if (d.eta_s !== null && d.eta_s !== undefined && d.state === "downloading") figures.push(`${duration(d.eta_s)} left`);
    if (d.source) figures.push(`from ${d.source}`);
    const what = d.error ? `failed: ${d.error}` : `${d.state} · ${figures.join(" · ")}`;
    return h("div", { class: "download", "data-model": d.model },
      h("div", {}, h("b", {}, d.model), " ", h("span", { class: d.error ? "s-failed" : "hint" }, what)),
      meter(frac, "progress"));
  });
}

function engine(s) {
  const tps = s.step_s && s.running ? s.running / s.step_s : null;
  const parts = [`${s.running || 0} running`, `${s.prefilling || 0} prefilling`, `${s.queued || 0} queued`];
  if (tps) parts.push(`${tps.toFixed(1)} tok/s`);
  return parts.join(" · ");
}

function prefix(p) {
  if (!p) return "–";
  if (!p.limit) return "off";
  const tokens = Object.values(p.models || {}).reduce((n, m) => n + m.tokens, 0);
  return `${tokens} tokens · ${bytes(p.bytes)} of ${bytes(p.limit)} · ${p.hits} hits, ${p.reused_tokens} tokens reused`;
}

function stages(s) {
  const entries = Object.entries(s.stages || {});
  if (!entries.length) return "none";
  return entries.map(([id, st]) =>
    h("div", {}, h("span", { class: `pill s-${st.state}` }, st.state), " ", id, " ",
      h("span", { class: "hint" }, `${st.model}${st.layers ? ` · layers ${st.layers[0]}–${st.layers[1]}` : ""}`),
      st.error ? h("div", { class: "s-failed" }, st.error) : null));
}

function card(node) {
  const info = node.info || {};
  const s = node.status || {};
  const total = info.memory_total || 0;
  const avail = info.memory_available || 0;
  const level = info.memory_pressure?.level || "normal";
  const loaded = new Set(s.loaded || []);
  const models = info.models || [];
  const v = info.versions || {};
  const silent = node.age_s > 3;
  const failover = s.broker?.failovers?.at(-1);
  return h("article", { class: "node", "data-node": node.id },
    h("h3", {}, node.name || node.id,
      h("span", { class: `pill s-${level}`, title: "memory pressure" }, level),
      silent ? h("span", { class: "pill s-down" }, `silent ${node.age_s.toFixed(0)} s`) : null),
    h("dl", {},
      h("dt", {}, "Chip"), h("dd", {}, `${info.chip || "?"} · ${info.cores || "?"} cores`),
      h("dt", {}, "BLAS"), h("dd", {}, (info.blas || "?").split(" (")[0]),
      h("dt", {}, "Memory"), h("dd", {},
        meter(total ? (total - avail) / total : 0),
        `${bytes(total - avail)} used of ${bytes(total)} · ${bytes(avail)} available`),
      h("dt", {}, "KV"), h("dd", {}, `${bytes(s.kv_bytes || 0)} of ${bytes(s.kv_budget || 0)}`),
      h("dt", {}, "Engine"), h("dd", { class: "engine" }, engine(s)),
      h("dt", {}, "Prefix cache"), h("dd", { class: "prefix" }, prefix(s.prefix_cache)),
      h("dt", {}, "Models"), h("dd", {}, models.length
        ? models.map((m) => h("div", {}, m, loaded.has(m) ? h("span", { class: "pill s-ready" }, "loaded") : null))
        : "none"),
      h("dt", {}, "Stages"), h("dd", {}, stages(s)),
      h("dt", {}, "Broker"), h("dd", { class: "mono" }, s.broker?.endpoint || "?",
        failover ? h("div", { class: "hint" }, `failed over from ${failover.from} ${duration(Date.now() / 1000 - failover.at)} ago`) : null),
      h("dt", {}, "Versions"), h("dd", { class: "hint" }, `exo ${v.exo || "?"} · mlx ${v.mlx || "?"} · mlx-lm ${v.mlx_lm || "?"} · Python ${v.python || "?"}`)),
    downloads(node));
}

export function render(state) {
  const nodes = state.nodes || [];
  if (!nodes.length) {
    fill($("nodes"), h("p", { class: "empty" }, "No node has joined yet. Start one with ", h("code", {}, "exo-node"), "."));
    return;
  }
  fill($("nodes"), nodes.map(card));
}
