// The nodes and the links between them, as a picture and as a table: each link
// with its type (and where the type came from), RTT, bandwidth, live use each
// way and up/down; the links each instance's stage traffic rides highlighted.

import { $, fill, h } from "./dom.js";
import { bits, bytes, linkType, ms, rate } from "./format.js";

const W = 960;
const H = 230;
const BOX = { w: 200, h: 78 };

// One cable can carry several address pairs (IPv4 and IPv6): one line for each
// pair of interfaces, with every address pair it stands for.
export function cables(links) {
  const out = new Map();
  for (const l of links) {
    const [a, b] = l.a.node < l.b.node ? [l.a, l.b] : [l.b, l.a];
    const flip = a !== l.a;
    const key = `${a.node}/${a.interface}|${b.node}/${b.interface}`;
    const c = out.get(key) || { key, a, b, type: l.type, up: false, links: [], rtt_s: null, bandwidth_Bps: null, a_to_b: 0, b_to_a: 0 };
    c.links.push(l);
    c.up = c.up || l.up;
    c.rtt_s = l.rtt_s ?? c.rtt_s;
    c.bandwidth_Bps = l.bandwidth_Bps ?? c.bandwidth_Bps;
    // the interfaces' counters: the same for every address pair of the cable
    c.a_to_b = Math.max(c.a_to_b, flip ? l.b_to_a_Bps : l.a_to_b_Bps);
    c.b_to_a = Math.max(c.b_to_a, flip ? l.a_to_b_Bps : l.b_to_a_Bps);
    out.set(key, c);
  }
  return [...out.values()];
}

function hostOf(endpoint) {
  const m = /^tcp:\/\/\[?([^\]]+?)\]?:\d+$/.exec(endpoint || "");
  return m ? m[1] : null;
}

// Which cable each hop of each instance rides: {cableKey: [instance ids]}.
export function routes(instances, cableList) {
  const carried = {};
  for (const inst of instances) {
    const stages = inst.stages || [];
    for (let i = 0; i + 1 < stages.length; i++) {
      const host = hostOf(inst.routes?.[i]?.next);
      const from = stages[i].node;
      const to = stages[i + 1].node;
      if (!host || from === to) continue;
      for (const c of cableList) {
        const ends = { [c.a.node]: c.a, [c.b.node]: c.b };
        if (!ends[from] || !ends[to]) continue;
        if (c.links.some((l) => (l.a.node === to ? l.a : l.b).address === host)) {
          (carried[c.key] ||= []).push(inst.id);
        }
      }
    }
  }
  return carried;
}

// Which cable each node's broker connection rides (the broker on another node's
// host, reached at that host's address on the cable): {cableKey: [labels]}.
export function brokerLinks(nodes, cableList) {
  const carried = {};
  for (const n of nodes) {
    const host = hostOf(n.status?.broker?.endpoint);
    if (!host) continue;
    for (const c of cableList) {
      const other = c.a.node === n.id ? c.b : c.b.node === n.id ? c.a : null;
      if (other && c.links.some((l) => [l.a, l.b].some((e) => e.node === other.node && e.address === host))) {
        (carried[c.key] ||= []).push(`${n.name || n.id}'s broker link`);
      }
    }
  }
  return carried;
}

function positions(nodes) {
  const pos = {};
  const n = nodes.length;
  nodes.forEach((node, i) => {
    if (n === 1) pos[node.id] = { x: W / 2, y: H / 2 };
    else if (n === 2) pos[node.id] = { x: i === 0 ? W * 0.2 : W * 0.8, y: H / 2 };
    else {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / n;
      pos[node.id] = { x: W / 2 + Math.cos(a) * W * 0.36, y: H / 2 + Math.sin(a) * H * 0.34 };
    }
  });
  return pos;
}

function nodeBox(node, p) {
  const info = node.info || {};
  const total = info.memory_total || 0;
  const used = total ? (total - (info.memory_available || 0)) / total : 0;
  const x = p.x - BOX.w / 2;
  const y = p.y - BOX.h / 2;
  const chip = (info.chip || "").replace(/\(R\)|\(TM\)|Processor|CPU/g, "").trim();
  return h("g", { class: "node-g", "data-node": node.id },
    h("title", {}, `${node.name} (${node.id})`),
    h("rect", { class: "node-box", x, y, width: BOX.w, height: BOX.h, rx: 10 }),
    h("text", { class: "node-name", x: x + 12, y: y + 22 }, node.name || node.id),
    h("text", { class: "node-sub", x: x + 12, y: y + 40 }, `${chip.slice(0, 22)} · ${info.cores || "?"} cores`),
    h("rect", { class: "mem-bg", x: x + 12, y: y + 52, width: BOX.w - 24, height: 6, rx: 3 }),
    h("rect", { class: "mem-fg", x: x + 12, y: y + 52, width: Math.max(2, (BOX.w - 24) * used), height: 6, rx: 3 }),
    h("text", { class: "node-sub", x: x + 12, y: y + 70 }, `${bytes(total - (info.memory_available || 0))} of ${bytes(total)}`));
}

function drawCable(c, i, k, pos, carried) {
  const p1 = pos[c.a.node];
  const p2 = pos[c.b.node];
  if (!p1 || !p2) return [];
  const dx = p2.x - p1.x;
  const dy = p2.y - p1.y;
  const len = Math.hypot(dx, dy) || 1;
  const nx = -dy / len;
  const ny = dx / len;
  const off = (i - (k - 1) / 2) * 64;
  const mid = { x: (p1.x + p2.x) / 2 + nx * off, y: (p1.y + p2.y) / 2 + ny * off };
  const ctrl = { x: 2 * mid.x - (p1.x + p2.x) / 2, y: 2 * mid.y - (p1.y + p2.y) / 2 };
  const d = `M${p1.x},${p1.y} Q${ctrl.x},${ctrl.y} ${p2.x},${p2.y}`;
  const on = carried[c.key];
  const cls = `link t-${c.type}${c.up ? "" : " down"}${on ? " route" : ""}`;
  const label1 = `${linkType(c.type)} · ${c.up ? bits(c.bandwidth_Bps) : "down"}${c.rtt_s != null && c.up ? ` · ${ms(c.rtt_s)}` : ""}`;
  const label2 = c.up ? `→ ${rate(c.a_to_b)}   ← ${rate(c.b_to_a)}` : `${c.a.interface} ↔ ${c.b.interface}`;
  return [
    on ? h("path", { class: "route-glow", d }) : null,
    h("path", { class: cls, d, stroke: "currentColor", "data-cable": c.key },
      h("title", {}, `${c.a.name}:${c.a.interface} ↔ ${c.b.name}:${c.b.interface}${on ? ` — carries ${on.join(", ")}` : ""}`)),
    h("text", { class: "link-label", x: mid.x, y: mid.y - 10, "text-anchor": "middle" }, label1),
    h("text", { class: "link-label muted", x: mid.x, y: mid.y + 20, "text-anchor": "middle" }, label2),
  ];
}

export function render(state) {
  const nodes = [...(state.nodes || [])].sort((a, b) => (a.name || a.id).localeCompare(b.name || b.id));
  const cableList = cables(state.links || []);
  const carried = routes(state.instances || [], cableList);
  const pos = positions(nodes);
  const svg = $("topology");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const pairs = {};
  for (const c of cableList) (pairs[`${c.a.node}|${c.b.node}`] ||= []).push(c);
  const lines = [];
  for (const group of Object.values(pairs)) {
    group.forEach((c, i) => lines.push(...drawCable(c, i, group.length, pos, carried)));
  }
  fill(svg,
    h("g", { class: "links" }, lines),
    h("g", { class: "nodes-g" }, nodes.map((n) => nodeBox(n, pos[n.id]))));
  $("topology-hint").textContent = nodes.length
    ? `${nodes.length} node${nodes.length > 1 ? "s" : ""} · ${cableList.length} link${cableList.length === 1 ? "" : "s"}`
    : "no nodes";
  renderTable(cableList, carried, brokerLinks(nodes, cableList));
}

function renderTable(cableList, carried, broker) {
  fill($("links").tBodies[0], cableList.map((c) => {
    const sources = [...new Set([c.a.source, c.b.source])].join(" / ");
    return h("tr", { "data-cable": c.key, "data-type": c.type, "data-up": String(c.up) },
      h("td", {}, `${c.a.name}:${c.a.interface} ↔ ${c.b.name}:${c.b.interface}`),
      h("td", {}, h("span", { class: `pill t-${c.type}`, title: `type ${sources}` }, linkType(c.type)), " ",
        h("span", { class: "hint" }, sources)),
      h("td", { class: "mono" }, c.links.map((l) => `${l.a.address} ↔ ${l.b.address}`).join("\n")),
      h("td", { class: "num" }, c.up ? ms(c.rtt_s) : "–"),
      h("td", { class: "num bandwidth" }, c.up ? bits(c.bandwidth_Bps) : h("span", { class: "pill s-down" }, "down")),
      h("td", { class: "num" }, rate(c.a_to_b)),
      h("td", { class: "num" }, rate(c.b_to_a)),
      h("td", { class: "carries" }, [...(carried[c.key] || []), ...(broker[c.key] || [])].join(", ") || "–"));
  }));
}
