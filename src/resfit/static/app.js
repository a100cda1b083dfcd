// The upload page: pick or drop an image, POST it to /predict, draw the top-k bars.
// Plain DOM, no libraries; server text is only ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let maxUploadBytes = null;

function show(element, visible) { element.hidden = !visible; }

async function loadModel() {
  try {
    const response = await fetch("/model");
    const model = await response.json();
    $("model-line").textContent =
      `${model.architecture} · ${model.num_classes} classes: ${model.class_names.join(", ")} · ` +
      `${model.backend.name} (${model.backend.precision})`;
    maxUploadBytes = model.limits.max_upload_bytes;
    $("limits").textContent =
      `${model.limits.allowed_formats.join(", ")} · up to ${(maxUploadBytes / 1048576).toFixed(0)} MB`;
  } catch (error) {
    $("model-line").textContent = "Model information is unavailable.";
  }
}

function drawResult(result) {
  $("predicted").textContent = result.predicted;
  // "unknown": the run's rule found the photo unlike its training photos; the bars still show the guess.
  const note = $("unknown-note");
  if (result.unknown) {
    note.textContent =
      `Not like the photos this model was trained on (${result.score.name} score ` +
      `${result.score.value.toFixed(3)}, below ${result.score.threshold.toFixed(3)}); best guess: ${result.best_guess}.`;
  }
  show(note, Boolean(result.unknown));
  const bars = $("bars");
  bars.replaceChildren();
  for (const entry of result.top_k) {
    const percent = entry.probability * 100;
    const item = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = entry.class;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(percent, 0.5).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = `${percent.toFixed(1)}%`;
    item.append(name, bar, pct);
    bars.append(item);
  }
  show($("result"), true);
}

async function classify(file) {
  show($("output"), true);
  show($("result"), false);
  show($("error"), false);
  $("filename").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KB`;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  show(preview, false); // shown once the browser can draw it: a text file gets no broken-image icon
  preview.onload = () => show(preview, true);
  preview.onerror = () => show(preview, false);
  preview.src = URL.createObjectURL(file);
  if (maxUploadBytes !== null && file.size > maxUploadBytes) {
    fail(`${file.name} is larger than the upload limit (${(maxUploadBytes / 1048576).toFixed(0)} MB).`);
    return;
  }
  $("status").textContent = "Classifying…";
  document.body.dataset.state = "busy";
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const response = await fetch("/predict", { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    if (!response.ok) {
      fail(body.detail || `HTTP ${response.status}`);
      return;
    }
    $("status").textContent = `Done in ${(body.seconds * 1000).toFixed(0)} ms`;
    drawResult(body);
    document.body.dataset.state = "done";
  } catch (error) {
    fail(`The request failed: ${error}`);
  }
}

function fail(message) {
  $("status").textContent = "";
  $("error").textContent = message;
  show($("error"), true);
  document.body.dataset.state = "error";
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    if (event.target.files.length) classify(event.target.files[0]);
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
  loadModel();
}

setUp();
