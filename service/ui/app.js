// The page: choose a model version, give it an image (drop, paste or pick), see its answer as bars, the
// time the request took and the Grad-CAM heatmap over the centre crop the model saw.

import { classify, explanation, parseAnswer } from "./api.js";
import { byId, element, show } from "./dom.js";
import { startLivePanel } from "./live.js";
import { loadVersions, markChosen, renderModels } from "./models.js";
import { colourHeatmap, drawCrop } from "./overlay.js";

let chosen = null; // {name, version, meta}
let heatUrl = null;
let run = 0; // the latest image's number: answers of an image replaced meanwhile are dropped

function setState(state) {
  byId("try-section").dataset.state = state;
}

function fail(message) {
  byId("error").textContent = message;
  show(byId("error"), true);
  setState("failed");
}

function choose(item) {
  chosen = item;
  run++; // an answer still coming is for the model chosen before
  markChosen(item);
  show(byId("result"), false);
  show(byId("error"), false);
  setState("idle");
  const count = item.meta.labels.length;
  const topK = byId("top-k");
  topK.max = String(count);
  topK.value = String(Math.min(Number(topK.value) || 5, count));
}

function answerItem(answer, meta) {
  const label = meta.labels[answer.index] ?? answer.label;
  const li = element("li", "", { "data-label": label, "data-score": answer.score });
  const bar = element("span", "", { class: "bar" });
  bar.style.width = `${Math.max(0, Math.min(1, Number(answer.score))) * 100}%`;
  li.append(element("span", label, { class: "label" }), element("span", answer.score, { class: "score" }));
  const threshold = meta.task === "multilabel" ? meta.thresholds[answer.index] : undefined;
  if (threshold !== undefined) li.append(element("span", `threshold ${threshold.toFixed(3)}`, { class: "muted" }));
  li.append(element("span", "", { class: "track" }));
  li.lastChild.append(bar);
  return li;
}

function renderAnswers(strings, meta, elapsedMs) {
  const answers = strings.map(parseAnswer).filter((answer) => answer !== null);
  const titles = { multilabel: "Labels at or above their thresholds", binary: "Decision" };
  byId("answers-title").textContent = titles[meta.task] ?? `Top ${answers.length}`;
  const list = byId("answers");
  list.replaceChildren(...answers.map((answer) => answerItem(answer, meta)));
  if (!answers.length) list.append(element("li", "no label reaches its threshold", { class: "muted" }));
  byId("timing").textContent = `v2 infer: ${elapsedMs.toFixed(0)} ms (request sent to answer read)`;
}

async function showHeatmap(item, bytes, mine) {
  const note = byId("explain-note");
  show(note, false);
  const heat = byId("heat");
  if (!item.meta.explainable) {
    show(heat, false);
    show(byId("heat-caption"), false);
    note.textContent = "This model has no Grad-CAM module (transformer backbones have none).";
    show(note, true);
    return;
  }
  const started = performance.now();
  try {
    const coloured = await colourHeatmap(await explanation(item.name, item.version, bytes));
    if (mine !== run) return;
    if (heatUrl) URL.revokeObjectURL(heatUrl);
    heatUrl = URL.createObjectURL(coloured);
    heat.dataset.loaded = "false";
    heat.src = heatUrl;
    show(heat, true);
    show(byId("heat-caption"), true);
    byId("timing").textContent += `; Grad-CAM: ${(performance.now() - started).toFixed(0)} ms`;
  } catch (error) {
    note.textContent = `Grad-CAM: ${error.message}`;
    show(note, true);
  }
}

async function drawModelCrop(blob, preprocess) {
  try {
    const bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
    drawCrop(byId("crop"), bitmap, preprocess);
    bitmap.close();
    return true;
  } catch {
    return false; // a format the server reads but this browser does not (TIFF): answers without a picture
  }
}

async function tryImage(file) {
  if (!chosen) return fail("Choose a model first: no model version is ready.");
  const item = chosen;
  const mine = ++run;
  setState("working");
  show(byId("error"), false);
  const bytes = new Uint8Array(await file.arrayBuffer());
  const count = Number(byId("top-k").value) || 5;
  const started = performance.now();
  let strings;
  try {
    strings = await classify(item.name, item.version, bytes, count);
  } catch (error) {
    if (mine === run) {
      show(byId("result"), false);
      fail(error.message);
    }
    return;
  }
  if (mine !== run) return;
  renderAnswers(strings, item.meta, performance.now() - started);
  show(byId("heat"), false);
  const drawn = await drawModelCrop(file, item.meta.preprocess);
  show(byId("crop").parentElement.parentElement, drawn);
  show(byId("result"), true);
  if (drawn) await showHeatmap(item, bytes, mine);
  if (mine === run) setState("answered");
}

function firstFile(list) {
  return list && list.length ? list[0] : null;
}

function wireInputs() {
  const drop = byId("drop");
  byId("file").addEventListener("change", (event) => {
    const file = firstFile(event.target.files);
    if (file) tryImage(file);
    event.target.value = ""; // the same file again is a new try
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = firstFile(event.dataTransfer.files);
    if (file) tryImage(file);
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData?.files);
    if (file) {
      event.preventDefault();
      tryImage(file);
    }
  });
  const heat = byId("heat");
  heat.addEventListener("load", () => (heat.dataset.loaded = "true"));
  byId("opacity").addEventListener("input", (event) => (heat.style.opacity = String(event.target.value / 100)));
  heat.style.opacity = String(byId("opacity").value / 100);
}

async function start() {
  wireInputs();
  setState("idle");
  startLivePanel();
  try {
    const first = renderModels(await loadVersions(), choose);
    if (first) choose(first);
    byId("models-section").dataset.loaded = "true";
  } catch (error) {
    byId("models-status").textContent = `The model list could not be read: ${error.message}`;
    byId("models-status").classList.add("error");
  }
}

start();
