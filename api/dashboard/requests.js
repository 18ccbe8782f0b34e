// The requests in flight across the cluster (ids and figures, never text), each
// with a cancel button for the ones this key submitted.

import { $, fill, h } from "./dom.js";
import { postJSON } from "./api.js";
import { duration } from "./format.js";

async function cancel(id, button) {
  button.disabled = true;
  const note = $("requests-notice");
  try {
    await postJSON(`/v1/cancel/${encodeURIComponent(id)}`);
    note.textContent = `cancelled ${id}`;
    note.className = "notice";
  } catch (e) {
    note.textContent = `could not cancel ${id}: ${e.message}`;
    note.className = "notice bad";
    button.disabled = false;
  }
}

export function render(state) {
  const list = state.requests || [];
  $("requests-hint").textContent = `${state.requests_active || 0} running · ${state.requests_waiting_for_download || 0} waiting`;
  fill($("requests").tBodies[0], list.map((r) =>
    h("tr", { "data-request": r.id },
      h("td", { class: "mono", title: r.id }, r.id.slice(0, 10)),
      h("td", {}, r.model, r.node ? h("div", { class: "hint" }, `on ${r.node}`) : null),
      h("td", {}, h("span", { class: `pill s-${r.state}` }, r.state.replaceAll("_", " "))),
      h("td", { class: "num", title: `${duration(r.age_s)} old` }, r.tokens),
      h("td", {}, h("button", {
        class: "small", type: "button", disabled: !r.mine,
        title: r.mine ? "cancel it on the cluster" : "submitted with another key",
        onclick: (e) => cancel(r.id, e.currentTarget),
      }, "Cancel")))));
}
