// The page at /: each picked or dropped image is POSTed to /classify as the raw body (the
// same endpoint curl uses) and shown with its top-3 classes, the model version that answered
// and the round-trip time. Plain browser JavaScript, no build step.
"use strict";

const results = document.getElementById("results");
const drop = document.getElementById("drop");
const input = document.getElementById("files");

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function showModel() {
  const line = document.getElementById("model");
  try {
    const r = await fetch("/model");
    const m = await r.json();
    if (!r.ok) throw new Error(m.error || r.statusText);
    const acc = m.val_accuracy == null ? "" :
      ` · validation accuracy ${(100 * m.val_accuracy).toFixed(2)} %`;
    line.textContent = `Serving ${m.registered_model || "model"} version ` +
      `${m.mlflow_version || m.bento_tag}${acc}`;
  } catch (e) {
    line.textContent = `Model information unavailable: ${e.message}`;
  }
}

async function classify(file) {
  const card = el("li", "card");
  card.dataset.state = "pending";
  const img = el("img");
  img.alt = file.name;
  img.src = URL.createObjectURL(file);
  const body = el("div", "body");
  body.append(el("div", "name", file.name), el("div", "label", "classifying..."));
  card.append(img, body);
  results.prepend(card);
  const started = performance.now();
  try {
    const r = await fetch("/classify?top_k=3", {
      method: "POST", body: file,
      headers: {"Content-Type": file.type || "application/octet-stream"},
    });
    const ms = performance.now() - started;
    const answer = await r.json();
    body.querySelector(".label").remove();
    if (!r.ok) {
      body.append(el("div", "error", answer.error || `HTTP ${r.status}`));
      card.dataset.state = "error";
      return;
    }
    body.append(el("div", "label", answer.label));
    if (answer.in_distribution === false) {
      // ood_score over the served version's threshold (GET /model): say so before the classes.
      body.append(el("div", "ood", "this does not look like a CIFAR-10 image"));
      card.dataset.ood = "true";
    }
    for (const [i, c] of answer.top_k.entries()) {
      const bar = el("div", i === 0 ? "bar best" : "bar");
      const track = el("div", "track");
      const fill = el("div", "fill");
      fill.style.width = `${(100 * c.probability).toFixed(1)}%`;
      track.append(fill);
      bar.append(el("span", "cls", c.label), track,
                 el("span", "pct", `${(100 * c.probability).toFixed(1)} %`));
      body.append(bar);
    }
    const version = r.headers.get("X-Model-Version") || answer.model.version;
    body.append(el("div", "meta", `model version ${version} · ${ms.toFixed(0)} ms · ` +
                                  `request ${answer.request_id}`));
    card.dataset.state = "done";
    card.dataset.label = answer.label;
    card.dataset.version = version;
  } catch (e) {
    body.querySelector(".label")?.remove();
    body.append(el("div", "error", `request failed: ${e.message}`));
    card.dataset.state = "error";
  }
}

function take(files) {
  for (const f of files) classify(f);
}

input.addEventListener("change", () => { take(input.files); input.value = ""; });
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  take(e.dataTransfer.files);
});
showModel();
