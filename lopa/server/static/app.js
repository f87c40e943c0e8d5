// lopa live view: the settings forms and the run panels; draws each step of the trace stream (stream.js) as it
// arrives.
// Plain browser JavaScript, no build step, no network beyond the server that served this page.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const FIELDS = ["decoder", "base", "branches", "threshold", "block_size", "max_new_tokens"];
const state = { defaults: null, runs: {}, active: 0 };

// ---- colours: forward index -> a dark-to-bright ramp (viridis stops) --------------------------------------
const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(step, last) {
  const t = last <= 1 ? 0 : (step - 1) / (last - 1);
  const x = t * (RAMP.length - 1), i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  const rgb = RAMP[i].map((c, k) => Math.round(c + f * (RAMP[i + 1][k] - c)));
  const light = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140;
  return { bg: `rgb(${rgb.join(",")})`, fg: light ? "#111" : "#fff" };
}

// ---- settings forms ----------------------------------------------------------------------------------------
function settingsForm(name, values) {
  const node = $("#settings-template").content.firstElementChild.cloneNode(true);
  node.id = `settings-${name}`;
  $("legend", node).textContent = `Settings ${name.toUpperCase()}`;
  for (const field of FIELDS) {
    const input = node.querySelector(`[name=${field}]`);
    input.id = `${name}-${field}`;
    if (input.tagName === "SELECT") {
      for (const choice of state.choices[field]) input.add(new Option(choice, choice));
    }
    input.value = values[field];
  }
  return node;
}

function readSettings(name) {
  const form = $(`#settings-${name}`), out = {};
  for (const field of FIELDS) {
    const raw = form.querySelector(`[name=${field}]`).value.trim();
    if (field === "decoder" || field === "base") out[field] = raw;
    else if (raw !== "" && !Number.isNaN(Number(raw))) out[field] = Number(raw);
    else out[field] = raw;  // not a number: sent as is, the server answers with a 400 that names the field
  }
  return out;
}

function describe(s) {
  const parts = [s.decoder];
  if (s.decoder === "lopa") parts.push(`base=${s.base} k=${s.branches}`);
  if (s.decoder !== "vanilla") parts.push(`τ=${s.threshold} block=${s.block_size}`);
  parts.push(`max=${s.max_new_tokens}`);
  return parts.join(" ");
}

// ---- one run panel --------------------------------------------------------------------------------------
class Run {
  constructor(name) {
    this.name = name;
    this.node = $("#run-template").content.firstElementChild.cloneNode(true);
    this.node.id = `run-${name}`;
    this.node.dataset.run = name;
    $(".run-name", this.node).textContent = name.toUpperCase();
    $(".grid", this.node).setAttribute("aria-label", `answer positions of run ${name.toUpperCase()}, by block`);
    $(".replay", this.node).addEventListener("click", () => this.replay());
  }

  reset(settings, replay = false) {
    if (!replay) this.node.dataset.runs = Number(this.node.dataset.runs || 0) + 1;  // runs started in this panel
    this.settings = settings;
    this.steps = [];
    this.done = null;
    $(".desc", this.node).textContent = describe(settings);
    $(".grid", this.node).replaceChildren();
    $(".steps", this.node).replaceChildren();
    $(".answer", this.node).hidden = true;
    $(".replay", this.node).disabled = true;
    this.setState("waiting", "waiting for the engine…");
    this.counters(0, 0, 0, 0);
  }

  setState(kind, message) {
    this.node.dataset.state = kind;
    $(".status", this.node).textContent = message;
  }

  counters(forwards, tokens, tpf, tps) {
    const set = (k, v) => { $(`[data-counter=${k}]`, this.node).textContent = v; };
    set("forwards", forwards); set("tokens", tokens); set("tpf", tpf.toFixed(2)); set("tps", tps.toFixed(0));
  }

  start(info) {
    this.info = info;
    const grid = $(".grid", this.node);
    grid.replaceChildren();
    const first = info.first_block ?? info.block_size;  // a block-causal model's first block holds the prompt's tail
    for (let b = 0; b === 0 || first + (b - 1) * info.block_size < info.positions; b++) {
      const lo = b === 0 ? 0 : first + (b - 1) * info.block_size;
      const hi = Math.min(b === 0 ? first : lo + info.block_size, info.positions);
      const row = document.createElement("div");
      row.className = "block";
      row.dataset.block = b;
      const label = document.createElement("span");
      label.className = "block-label";
      label.textContent = `block ${b + 1}`;
      row.append(label);
      for (let p = lo; p < hi; p++) {
        const cell = document.createElement("span");
        cell.className = "cell empty";
        cell.dataset.pos = p;
        cell.title = `position ${p}: not filled yet`;
        row.append(cell);
      }
      grid.append(row);
    }
    this.setState("running", "decoding…");
  }

  cell(p) { return this.node.querySelector(`.cell[data-pos="${p}"]`); }

  step(ev) {
    this.steps.push(ev);
    for (const f of ev.filled) {
      const cell = this.cell(f.position);
      if (!cell) continue;
      cell.className = "cell" + (f.lookahead ? " lookahead" : "") + (f.end ? " end" : "");
      cell.dataset.step = ev.forward;
      cell.dataset.token = f.token;
      cell.replaceChildren();
      const tok = document.createElement("span");
      tok.className = "tok";
      tok.textContent = f.end ? "⏎" : (f.text.trim() === "" ? "␣" : f.text);
      const fwd = document.createElement("sub");
      fwd.textContent = ev.forward;
      cell.append(tok, fwd);
      cell.title = `position ${f.position} · forward ${ev.forward}${f.lookahead ? " · lookahead fill" : ""} · token ${f.token}`;
    }
    this.recolour();
    this.addStepItem(ev);
    const tokens = this.tokenCount();
    const seconds = ev.seconds > 0 ? ev.seconds : 0;
    this.counters(this.steps.length, tokens, tokens / this.steps.length, seconds ? tokens / seconds : 0);
    this.setState("running", `decoding… forward ${ev.forward}`);
  }

  // tokens as lopa counts them: filled positions up to and including the first end token
  tokenCount() {
    const cells = [...this.node.querySelectorAll(".cell[data-step]")];
    const ends = cells.filter((c) => c.classList.contains("end")).map((c) => Number(c.dataset.pos));
    const firstEnd = ends.length ? Math.min(...ends) : Infinity;
    for (const c of cells) c.classList.toggle("after-end", Number(c.dataset.pos) > firstEnd);
    return cells.filter((c) => Number(c.dataset.pos) <= firstEnd).length;
  }

  recolour() {
    const last = this.steps.length;
    for (const cell of this.node.querySelectorAll(".cell[data-step]")) {
      const c = colour(Number(cell.dataset.step), last);
      cell.style.background = c.bg;
      cell.style.color = c.fg;
    }
  }

  addStepItem(ev) {
    const li = document.createElement("li");
    li.dataset.forward = ev.forward;
    li.tabIndex = 0;
    const looked = ev.filled.filter((f) => f.lookahead).length;
    const head = document.createElement("div");
    head.className = "step-head";
    head.textContent = `forward ${ev.forward} · +${ev.filled.length} position${ev.filled.length === 1 ? "" : "s"}` +
      (looked ? ` (${looked} from lookahead)` : "") + ` · ${ev.seconds.toFixed(3)} s`;
    li.append(head);
    const table = document.createElement("table");
    table.className = "candidates";
    table.innerHTML = "<thead><tr><th scope=col>candidate</th><th scope=col>extra fill</th><th scope=col>score</th><th scope=col></th></tr></thead>";
    const body = document.createElement("tbody");
    ev.candidates.forEach((c, i) => {
      const tr = document.createElement("tr");
      if (i === ev.winner) tr.className = "winner";
      const extra = c.position === null ? "—" : `pos ${c.position} = ${c.text ?? c.token} (p=${c.confidence.toFixed(3)})`;
      for (const text of [c.kind === "anchor" ? "anchor" : `lookahead ${i + 1}`, extra, c.score.toFixed(4), i === ev.winner ? "✓ winner" : ""]) {
        const td = document.createElement("td");
        td.textContent = text;
        tr.append(td);
      }
      body.append(tr);
    });
    table.append(body);
    li.append(table);
    const highlight = (on) => {
      for (const cell of this.node.querySelectorAll(`.cell[data-step="${ev.forward}"]`)) cell.classList.toggle("highlight", on);
    };
    li.addEventListener("mouseenter", () => highlight(true));
    li.addEventListener("mouseleave", () => highlight(false));
    li.addEventListener("focus", () => highlight(true));
    li.addEventListener("blur", () => highlight(false));
    $(".steps", this.node).append(li);
  }

  finish(ev) {
    this.done = ev;
    ev.pieces.forEach((piece, p) => { const c = this.cell(p); if (c) c.dataset.piece = piece; });
    const u = ev.usage, tokens = this.tokenCount();
    this.counters(u.forwards, tokens, u.tokens_per_forward, ev.seconds > 0 ? tokens / ev.seconds : 0);
    $(".answer-text", this.node).textContent = ev.text;
    $(".answer", this.node).hidden = false;
    $(".replay", this.node).disabled = false;
    this.setState("done", `done in ${u.forwards} forwards (finish reason: ${ev.finish_reason})`);
  }

  fail(message) { this.setState("error", message); }

  gridText() { return [...this.node.querySelectorAll(".cell")].map((c) => c.dataset.piece ?? "").join(""); }

  async replay() {
    const steps = this.steps, done = this.done;
    this.reset(this.settings, true);
    this.start(this.info);
    for (const s of steps) { this.step(s); await new Promise((r) => setTimeout(r, 400)); }
    this.finish(done);
  }
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
}

async function runAll(event) {
  event.preventDefault();
  if (state.active) return;
  $("#error").hidden = true;
  $("#summary").hidden = true;
  const names = $("#compare").checked ? ["a", "b"] : ["a"];
  $("#run-b").hidden = names.length < 2;
  const prompt = $("#prompt").value;
  const base = $("#chat").checked ? { messages: [{ role: "user", content: prompt }] } : { prompt };
  state.active = names.length;
  $("#run").disabled = true;
  $("#busy").textContent = "running…";
  const errors = [];
  await Promise.all(names.map(async (name) => {
    const run = state.runs[name], settings = readSettings(name);
    run.reset(settings);
    try { await traceRun(run, { ...base, lopa: settings }); } catch (e) { run.fail(e.message); errors.push(e.message); }
  }));
  state.active = 0;
  $("#run").disabled = false;
  $("#busy").textContent = "";
  if (errors.length) showError(errors.join("\n"));
  else if (names.length === 2) compareSummary();
}

function compareSummary() {
  const [a, b] = [state.runs.a.done.usage, state.runs.b.done.usage];
  const box = $("#summary");
  const diff = a.forwards - b.forwards;
  box.textContent = diff === 0 ? `A and B both took ${a.forwards} forwards.`
    : `${diff > 0 ? "B" : "A"} took ${Math.abs(diff)} fewer forwards (${a.forwards} vs ${b.forwards}); TPF ${a.tokens_per_forward.toFixed(2)} vs ${b.tokens_per_forward.toFixed(2)}.`;
  box.hidden = false;
}

async function init() {
  let info;
  try {
    const r = await fetch("/v1/trace/settings");
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    info = await r.json();
  } catch (e) {
    $("#model").textContent = "";
    showError(`Cannot reach the lopa server at ${location.origin} (${e.message}). Start it with \`lopa serve\` and reload.`);
    return;
  }
  state.choices = info.choices;
  $("#model").textContent = `model ${info.model} · context ${info.max_model_len} positions`;
  $("#chat").disabled = !info.chat_template;
  $("#chat").checked = info.chat_template;
  const d = info.defaults;
  const baseDecoder = d.decoder === "lopa" ? d.base : (d.decoder === "vanilla" ? "threshold" : d.decoder);
  const a = { ...d, decoder: d.decoder === "lopa" ? baseDecoder : d.decoder };
  const b = { ...d, decoder: "lopa", base: baseDecoder, branches: Math.max(d.branches, 1) };
  $("#settings").append(settingsForm("a", a), settingsForm("b", b));
  $("#settings-b").hidden = true;
  for (const name of ["a", "b"]) {
    state.runs[name] = new Run(name);
    $("#runs").append(state.runs[name].node);
  }
  $("#run-b").hidden = true;
  $("#compare").addEventListener("change", () => {
    $("#settings-b").hidden = !$("#compare").checked;
    if (!$("#compare").checked) $("#run-b").hidden = true;
    $("#runs").classList.toggle("two", $("#compare").checked);
  });
  document.body.dataset.ready = "1";
}

$("#form").addEventListener("submit", runAll);
$("#prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#form").requestSubmit();
});
window.lopaLiveView = state;  // for debugging from the console
init();
