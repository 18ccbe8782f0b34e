// The dashboard's entry: the theme, the API key, and the cluster's live state
// handed to each section as it arrives.

import { $ } from "./dom.js";
import { apiKey, onUnauthorized, setApiKey, watchCluster } from "./api.js";
import * as chat from "./chat.js";
import * as models from "./models.js";
import * as nodes from "./nodes.js";
import * as requests from "./requests.js";
import * as topology from "./topology.js";

const sections = [topology, nodes, models, requests, chat];

function theme() {
  const saved = localStorage.getItem("exo.theme");
  if (saved) document.documentElement.dataset.theme = saved;
  $("theme-button").addEventListener("click", () => {
    const dark = getComputedStyle(document.documentElement).colorScheme.includes("dark");
    const next = dark ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("exo.theme", next);
  });
}

function keyDialog() {
  const dialog = $("key-dialog");
  const open = () => {
    if (dialog.open) return;
    $("key-input").value = apiKey();
    dialog.showModal();
  };
  $("key-button").addEventListener("click", open);
  $("key-cancel").addEventListener("click", () => dialog.close());
  $("key-form").addEventListener("submit", () => setApiKey($("key-input").value.trim()));
  onUnauthorized(open);
}

function summary(state) {
  const nodes = state.nodes || [];
  const ready = (state.instances || []).filter((i) => i.state === "ready").length;
  const skew = Object.keys(state.version_skew || {});
  $("summary").textContent = [
    `${nodes.length} node${nodes.length === 1 ? "" : "s"}`,
    `${ready} of ${(state.instances || []).length} instances ready`,
    `${state.requests_active || 0} requests running`,
    skew.length ? `version skew: ${skew.join(", ")}` : null,
  ].filter(Boolean).join(" · ");
}

function live(up) {
  $("live").dataset.state = up ? "live" : "lost";
  $("live-text").textContent = up ? "live" : "reconnecting";
}

function show(state) {
  summary(state);
  for (const s of sections) {
    try {
      s.render(state);
    } catch (e) {
      console.error("render failed", e);
    }
  }
}

theme();
keyDialog();
models.setup();
chat.setup();
watchCluster(show, live);
