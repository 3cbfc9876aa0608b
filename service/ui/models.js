// The model table: every model and version the server has, with its state, task, backbone, backend and
// precision and the test metrics of its run, all from GET /v2/models and the v2 metadata.

import { metadata, modelNames } from "./api.js";
import { byId, element, show } from "./dom.js";

/** One row per model version: its metadata (for a version that is not ready: its state and reason). */
export async function loadVersions() {
  const rows = [];
  for (const name of await modelNames()) {
    const model = await metadata(name);
    for (const status of model.version_states) {
      const meta = status.state === "READY" ? await metadata(name, status.version) : null;
      rows.push({ name, version: status.version, state: status.state, reason: status.reason, meta,
        isDefault: model.default_version === status.version });
    }
  }
  return rows;
}

function metricsText(metrics) {
  const test = metrics?.test ?? {};
  const parts = [];
  if (typeof test.accuracy === "number") parts.push(`accuracy ${test.accuracy.toFixed(3)}`);
  if (typeof test.macro_f1 === "number") parts.push(`macro F1 ${test.macro_f1.toFixed(3)}`);
  if (typeof test.mAP === "number") parts.push(`mAP ${test.mAP.toFixed(3)}`);
  if (typeof test.num_samples === "number") parts.push(`${test.num_samples} images`);
  return parts.join(", ") || "–";
}

function backendText(meta) {
  if (!meta) return "–";
  return `${meta.platform} ${meta.precision}`.trim(); // the platform names the backend (Triton's names)
}

function row(item, onChoose) {
  const meta = item.meta;
  const tr = element("tr", "", { "data-model": item.name, "data-version": item.version });
  tr.append(element("td", item.name), element("td", item.version + (item.isDefault ? " (default)" : "")));
  const state = element("td", item.state, { class: "state " + item.state.toLowerCase() });
  if (item.reason) state.title = item.reason;
  tr.append(state, element("td", meta?.task ?? "–"), element("td", meta?.backbone || "–"));
  tr.append(element("td", backendText(meta)), element("td", metricsText(meta?.metrics)));
  const cell = element("td");
  if (meta) {
    const button = element("button", "try", { type: "button", class: "try" });
    button.addEventListener("click", () => onChoose(item));
    cell.append(button);
  } else if (item.reason) {
    cell.append(element("span", item.reason, { class: "muted" }));
  }
  tr.append(cell);
  return tr;
}

/** Fill the table; the first ready default version is chosen unless one already is. */
export function renderModels(rows, onChoose) {
  const body = byId("models").querySelector("tbody");
  body.replaceChildren(...rows.map((item) => row(item, onChoose)));
  show(byId("models"), rows.length > 0);
  byId("models-status").textContent = rows.length ? "" : "No models are loaded.";
  show(byId("models-status"), rows.length === 0);
  return rows.find((item) => item.meta && item.isDefault) ?? rows.find((item) => item.meta) ?? null;
}

export function markChosen(item) {
  for (const tr of byId("models").querySelectorAll("tbody tr")) {
    tr.classList.toggle("chosen", tr.dataset.model === item.name && tr.dataset.version === item.version);
  }
  byId("chosen").textContent = `${item.name} version ${item.version}`;
}
