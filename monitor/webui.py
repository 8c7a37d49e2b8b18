"""The approval page: one HTML document that reads the monitor's JSON API from the browser.

The page lists retraining runs (pending approvals first) and shows one run's canary
evidence: gate results, the production and test slices, per-class F1 deltas, the
shadow comparison, latency, the per-epoch losses and the run's audit entries. Approve
and Reject send the same POST requests as any other API client, with the bearer
token that the user types. The browser keeps that token in ``sessionStorage`` for the
tab's lifetime, never in the URL or in ``localStorage``.

Everything is inline (CSS, JavaScript and the SVG loss chart drawn from the numbers),
so the page needs no build step and fetches nothing but the monitor's own API. The
script writes all run data into the page as text (``textContent`` and text nodes),
never as HTML. The Content-Security-Policy allows only this page's own script and
style, by their SHA-256 hashes, so an injected inline handler would not run either.
"""

from __future__ import annotations

import base64
import hashlib

from fastapi.responses import HTMLResponse

_STYLE = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg: #f6f8fa; --pending: #fff8c5;
        --pending-line: #d4a72c; --good: #1a7f37; --bad: #cf222e; --accent: #0969da; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); }
header { display: flex; flex-wrap: wrap; gap: 12px 20px; align-items: center; padding: 10px 16px;
         border-bottom: 1px solid var(--line); background: var(--bg); }
header h1 { font-size: 18px; margin: 0 12px 0 0; }
header label { display: flex; gap: 6px; align-items: center; color: var(--muted); }
header input { width: 14em; }
input, textarea, button { font: inherit; }
input, textarea { padding: 4px 6px; border: 1px solid var(--line); border-radius: 4px; }
button { padding: 4px 12px; border: 1px solid var(--line); border-radius: 4px; background: #fff; cursor: pointer; }
button:disabled { opacity: 0.5; cursor: default; }
button.approve { background: var(--good); border-color: var(--good); color: #fff; }
button.reject { background: var(--bad); border-color: var(--bad); color: #fff; }
main { padding: 12px 16px; max-width: 1500px; }
#runs-panel { max-height: 40vh; overflow: auto; border-bottom: 2px solid var(--line); margin-bottom: 14px; }
#runs thead th { position: sticky; top: 0; z-index: 1; }
h2 { font-size: 16px; margin: 0 0 8px; }
h3 { font-size: 14px; margin: 18px 0 6px; border-bottom: 1px solid var(--line); padding-bottom: 2px; }
h4 { font-size: 13px; margin: 10px 0 4px; color: var(--muted); }
table { border-collapse: collapse; width: auto; max-width: 100%; }
#runs, .columns table, #samples table, #audit table { width: 100%; }
th, td { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: var(--bg); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { overflow-wrap: anywhere; }
td.run-id { font-family: ui-monospace, monospace; font-size: 12px; white-space: nowrap; }
#runs tbody tr { cursor: pointer; }
#runs tbody tr:hover { background: #eef4ff; }
#runs tbody tr.pending { background: var(--pending); box-shadow: inset 4px 0 0 var(--pending-line); }
#runs tbody tr.waiting { background: #fffcea; box-shadow: inset 4px 0 0 #e3d9a8; }
#runs tbody tr.selected { outline: 2px solid var(--accent); outline-offset: -2px; }
.badge { display: inline-block; padding: 0 6px; border-radius: 10px; font-size: 12px; background: #e6e9ed;
         white-space: nowrap; }
.badge.pending_approval, .badge.awaiting_data, .badge.inconclusive { background: var(--pending); border: 1px solid var(--pending-line); }
.badge.active, .badge.approved, .badge.passed { background: #dafbe1; color: var(--good); }
.badge.rejected, .badge.rejected_by_gate, .badge.failed { background: #ffebe9; color: var(--bad); }
tr.gate-failed td:nth-child(2) { color: var(--bad); font-weight: 600; }
tr.gate-passed td:nth-child(2) { color: var(--good); }
tr.gate-skipped td:nth-child(2) { color: var(--muted); font-style: italic; }
tr.deciding { background: #fff1e5; }
tr.regressed { background: #ffebe9; }
tr.regressed td:first-child::after { content: " (regressed)"; color: var(--bad); font-size: 12px; }
.delta-up { color: var(--good); }
.delta-down { color: var(--bad); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 12px; }
.scroll { max-height: 320px; overflow-y: auto; }
.decision { border: 1px solid var(--pending-line); background: #fffdf0; border-radius: 6px; padding: 10px; margin: 10px 0; }
.decision textarea { width: 100%; min-height: 3.2em; margin: 6px 0; }
.message { margin-top: 6px; white-space: pre-wrap; }
.message.error { color: var(--bad); font-weight: 600; }
.message.ok { color: var(--good); font-weight: 600; }
.muted { color: var(--muted); }
.nowrap { white-space: nowrap; }
#page-error { color: var(--bad); padding: 0 16px; }
svg.chart { max-width: 560px; width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
svg.chart text { font-size: 11px; fill: var(--muted); }
"""

_BODY = """
<header>
  <h1>driftloop approvals</h1>
  <span class="muted">active version: <span id="active-version">-</span></span>
  <label>API token <input id="token" type="password" autocomplete="off" spellcheck="false"
    placeholder="bearer token for decisions"></label>
  <label>Your name <input id="actor" type="text" autocomplete="off" placeholder="recorded in the audit log"></label>
  <button id="refresh" type="button">Refresh</button>
</header>
<p id="page-error" role="alert"></p>
<main>
  <section id="runs-panel">
    <h2>Retraining runs</h2>
    <table id="runs">
      <thead><tr><th>Run</th><th>State</th><th>Created (UTC)</th><th>Trigger</th><th>Canary</th><th>Deciding gate</th></tr></thead>
      <tbody></tbody>
    </table>
    <p id="runs-empty" class="muted" hidden>No retraining runs yet.</p>
  </section>
  <section id="detail"><p class="muted">Select a run to see its canary evidence.</p></section>
</main>
"""

_SCRIPT = r"""
"use strict";
const TOKEN_KEY = "driftloop.apiToken";
const ACTOR_KEY = "driftloop.actor";
const SVG_NS = "http://www.w3.org/2000/svg";
const LIST_REFRESH_MS = 15000;
const ui = { runs: [], selected: null, messages: {} };
// States in which a run waits for a decision: Approve and Reject are offered.
const WAITING_STATES = ["pending_approval", "awaiting_data"];

// Build an element; string children become text nodes, so data is never parsed as HTML.
function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value !== null && value !== undefined && value !== false) node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attributes, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

function isNumber(value) { return typeof value === "number" && Number.isFinite(value); }
function isObject(value) { return value !== null && typeof value === "object" && !Array.isArray(value); }
function fixed(value, digits) { return isNumber(value) ? value.toFixed(digits) : "-"; }
function signed(value, digits) { return isNumber(value) ? (value > 0 ? "+" : "") + value.toFixed(digits) : "-"; }
function percent(value) { return isNumber(value) ? (100 * value).toFixed(1) + "%" : "-"; }
function pValue(value) {
  if (!isNumber(value)) return "-";
  return value !== 0 && value < 0.001 ? value.toExponential(1) : value.toFixed(3);
}
function text(value) {
  if (value === null || value === undefined || value === "") return "-";
  if (isNumber(value)) return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(4)));
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}
function timestamp(seconds) {
  return isNumber(seconds) ? new Date(seconds * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC" : "-";
}
function shortTimestamp(seconds) {
  return isNumber(seconds) ? new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ") : "-";
}
function change(current, candidate, format) { return format(current) + " \u2192 " + format(candidate); }
function interval(bounds) {
  let low, high;
  if (Array.isArray(bounds) && bounds.length === 2) [low, high] = bounds;
  else if (isObject(bounds)) { low = bounds.low ?? bounds.lower; high = bounds.high ?? bounds.upper; }
  return isNumber(low) && isNumber(high) ? "[" + signed(low, 4) + ", " + signed(high, 4) + "]" : "-";
}
function list(value) { return Array.isArray(value) ? value : []; }
function gateName(gate) { return isObject(gate) ? gate.name : gate; }

function table(headers, rows, numeric) {
  const head = el("tr", {}, headers.map((h, i) => el("th", { class: numeric && numeric[i] ? "num" : null }, h)));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, rows));
}
function row(cells, numeric, attributes) {
  return el("tr", attributes || {}, cells.map((cell, i) =>
    el("td", { class: numeric && numeric[i] ? "num" : "text" }, cell)));
}
function facts(pairs) {
  return el("dl", { class: "facts" }, pairs.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}
function badge(value) { return el("span", { class: "badge " + String(value || "") }, text(value)); }

async function readBody(response) {
  const body = await response.text();
  try { return JSON.parse(body); } catch (error) { return body; }
}
function errorMessage(response, body) {
  let message = response.statusText;
  if (isObject(body) && body.error) message = body.error;
  else if (isObject(body) && body.detail) message = text(body.detail);
  else if (typeof body === "string" && body) message = body.slice(0, 300);
  return "HTTP " + response.status + ": " + message;
}
// Relative paths, so the page also works behind a proxy that adds a path prefix.
async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  const body = await readBody(response);
  if (!response.ok) throw new Error(errorMessage(response, body));
  return body;
}

function showPageError(message) { document.getElementById("page-error").textContent = message || ""; }

function sortRuns(runs) {
  const rank = (run) => { const index = WAITING_STATES.indexOf(run.state); return index < 0 ? WAITING_STATES.length : index; };
  return runs.slice().sort((a, b) => rank(a) - rank(b) || (b.created_at || 0) - (a.created_at || 0));
}

function renderRuns() {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  document.getElementById("runs-empty").hidden = ui.runs.length > 0;
  for (const run of ui.runs) {
    const canary = isObject(run.canary) ? run.canary : {};
    const trigger = isObject(run.trigger) ? run.trigger : {};
    const classes = [run.state === "pending_approval" ? "pending" : run.state === "awaiting_data" ? "waiting" : "",
      run.id === ui.selected ? "selected" : ""];
    const tr = el("tr", { class: classes.join(" ").trim() || null, "data-run-id": run.id, tabindex: 0 },
      el("td", { class: "run-id" }, text(run.id)),
      el("td", {}, badge(run.state)),
      el("td", { class: "nowrap", title: timestamp(run.created_at) }, shortTimestamp(run.created_at)),
      el("td", { class: "text" }, text(trigger.reason)),
      el("td", {}, canary.status ? badge(canary.status) : "-"),
      el("td", { class: "text" }, text(gateName(canary.deciding_gate))));
    tr.addEventListener("click", () => selectRun(run.id));
    tr.addEventListener("keydown", (event) => { if (event.key === "Enter") selectRun(run.id); });
    body.appendChild(tr);
  }
}

async function loadRuns() {
  try {
    const [runs, versions] = await Promise.all([getJSON("v1/retrains?limit=200"), getJSON("v1/versions")]);
    ui.runs = sortRuns(list(runs.runs));
    document.getElementById("active-version").textContent = text(versions.active);
    renderRuns();
    showPageError("");
  } catch (error) {
    showPageError("Could not load runs: " + error.message);
  }
}

async function selectRun(runId) {
  ui.selected = runId;
  history.replaceState(null, "", "#" + encodeURIComponent(runId));
  renderRuns();
  await loadDetail();
}

async function loadDetail() {
  const detail = document.getElementById("detail");
  if (!ui.selected) return;
  try {
    const runId = encodeURIComponent(ui.selected);
    const [run, audit] = await Promise.all([
      getJSON("v1/retrains/" + runId),
      getJSON("v1/audit?limit=1000&run_id=" + runId),
    ]);
    detail.replaceChildren(...renderDetail(run, list(audit.entries)));
  } catch (error) {
    detail.replaceChildren(el("p", { class: "message error", role: "alert" }, error.message));
  }
}

function renderDetail(run, audit) {
  const canary = isObject(run.canary) ? run.canary : {};
  const training = isObject(run.training) ? run.training : {};
  return [
    el("h2", {}, "Run ", el("span", { id: "run-id" }, text(run.id)), " ", badge(run.state)),
    renderSummary(run),
    renderDecision(run),
    el("h3", {}, "Canary gates"),
    renderGates(canary),
    el("h3", {}, "Slices"),
    renderSlices(canary),
    el("h3", {}, "Per-class F1 deltas"),
    renderPerClass(canary),
    el("h3", {}, "Shadow comparison"),
    renderShadow(canary.shadow),
    el("h3", {}, "Latency"),
    renderLatency(canary.latency),
    el("h3", {}, "Training"),
    renderTraining(training),
    el("h3", {}, "Audit log"),
    renderAudit(audit),
  ];
}

function renderSummary(run) {
  const trigger = isObject(run.trigger) ? run.trigger : {};
  const others = Object.entries(trigger).filter(([key]) => key !== "reason" && key !== "owner")
    .map(([key, value]) => key + ": " + text(value)).join("; ");
  return facts([
    ["Created", timestamp(run.created_at)],
    ["Updated", timestamp(run.updated_at)],
    ["Base version", text(run.base_version)],
    ["Promoted version", text(run.promoted_version)],
    ["Trigger", text(trigger.reason)],
    ["Trigger details", text(others)],
    ["Error", text(run.error)],
  ]);
}

function renderDecision(run) {
  const canApprove = WAITING_STATES.includes(run.state);
  const canReject = canApprove || run.state === "approved";
  // The last decision's outcome stays visible after the run moved on to a state without buttons.
  const message = el("div", { id: "decision-message", class: "message", role: "status" });
  const saved = ui.messages[run.id];
  if (saved) { message.textContent = saved.text; message.classList.add(saved.ok ? "ok" : "error"); }
  if (!canReject) {
    return el("div", {}, el("p", { class: "muted" }, "No decision possible: the run is " + text(run.state) + "."), message);
  }
  const comment = el("textarea", { id: "comment", placeholder: "Comment for the audit log" });
  const buttons = [];
  if (canApprove) buttons.push(el("button", { id: "approve", type: "button", class: "approve" }, "Approve"));
  buttons.push(el("button", { id: "reject", type: "button", class: "reject" }, "Reject"));
  for (const button of buttons) {
    button.addEventListener("click", () => decide(run.id, button.id, comment, message, buttons));
  }
  const heading = run.state === "pending_approval" ? "Awaiting approval"
    : run.state === "awaiting_data" ? "Waiting for more labelled production data; a person may decide now"
    : "Approved, not yet promoted";
  return el("div", { class: "decision" },
    el("strong", {}, heading),
    comment, el("div", {}, buttons.flatMap((button) => [button, " "])), message);
}

async function decide(runId, action, comment, message, buttons) {
  const token = document.getElementById("token").value.trim();
  const actor = document.getElementById("actor").value.trim();
  const payload = { comment: comment.value };
  if (actor) payload.by = actor;

  buttons.forEach((button) => { button.disabled = true; });
  message.className = "message";
  message.textContent = action === "approve" ? "Approving and promoting\u2026" : "Rejecting\u2026";
  let result;
  try {
    const response = await fetch("v1/retrains/" + encodeURIComponent(runId) + "/" + action, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json", Authorization: "Bearer " + token },
      body: JSON.stringify(payload),
      cache: "no-store",
    });
    const body = await readBody(response);
    if (response.ok) {
      const version = isObject(body) && body.version ? "; active version is now " + body.version : "";
      result = { ok: true, text: (action === "approve" ? "Approved" : "Rejected") + " run " + runId + version };
    } else {
      result = { ok: false, text: errorMessage(response, body) };
    }
  } catch (error) {
    result = { ok: false, text: "Request failed: " + error.message };
  }

  buttons.forEach((button) => { button.disabled = false; });
  message.className = "message " + (result.ok ? "ok" : "error");
  message.textContent = result.text;
  if (result.ok) {
    ui.messages[runId] = result;
    await loadRuns();
    await loadDetail();
  }
}

function renderGates(canary) {
  const gates = list(canary.gates);
  const status = facts([
    ["Status", canary.status ? badge(canary.status) : "-"],
    ["Deciding gate", text(gateName(canary.deciding_gate))],
  ]);
  if (!gates.length) return el("div", {}, status, el("p", { class: "muted" }, "-"));
  const deciding = gateName(canary.deciding_gate);
  const rows = gates.map((gate) => {
    const evaluated = gate.evaluated !== false;
    const result = !evaluated ? "not evaluated" : gate.passed === true ? "passed" : gate.passed === false ? "failed" : "-";
    const kind = !evaluated ? "gate-skipped" : gate.passed ? "gate-passed" : "gate-failed";
    const classes = kind + (deciding && gate.name === deciding ? " deciding" : "");
    return row([el("span", { class: "nowrap" }, text(gate.name)), result, text(gate.value), text(gate.threshold), text(gate.message)],
      [false, false, true, true, false], { class: classes, "data-gate": text(gate.name) });
  });
  return el("div", {}, status,
    table(["Gate", "Result", "Value", "Threshold", "Message"], rows, [false, false, true, true, false]));
}

function slices(canary) {
  return [["Production holdout", canary.production], ["Original test", canary.test]];
}

function renderSlices(canary) {
  const shown = slices(canary);
  const metric = (label, format) => row([label, ...shown.map(([, slice]) => (isObject(slice) ? format(slice) : "-"))],
    [false, true, true]);
  const rows = [
    metric("Slice", (s) => text(s.name)),
    metric("Examples", (s) => text(s.n)),
    metric("Accuracy (current \u2192 candidate)", (s) => change(s.current_accuracy, s.candidate_accuracy, percent)),
    metric("Macro-F1 (current \u2192 candidate)", (s) => change(s.current_macro_f1, s.candidate_macro_f1, (v) => fixed(v, 4))),
    metric("Accuracy difference", (s) => signed(s.accuracy_diff, 4)),
    metric("Macro-F1 difference", (s) => signed(s.macro_f1_diff, 4)),
    metric("Macro-F1 difference, 95% interval", (s) => interval(s.macro_f1_diff_ci)),
    metric("Accuracy difference, 95% interval", (s) => interval(s.accuracy_diff_ci)),
    metric("McNemar p (exact)", (s) => pValue(s.mcnemar_p)),
    metric("McNemar mid-p", (s) => pValue(s.mcnemar_midp)),
    metric("Regressed classes", (s) => (Array.isArray(s.regressed_classes) ? String(s.regressed_classes.length) : "-")),
  ];
  return table(["", ...shown.map(([name]) => name)], rows, [false, true, true]);
}

function renderPerClass(canary) {
  const numeric = [false, true, true, true, true, true, true];
  const blocks = slices(canary).map(([name, slice]) => {
    const perClass = isObject(slice) ? list(slice.per_class) : [];
    if (!perClass.length) return el("div", {}, el("h4", {}, name), el("p", { class: "muted" }, "-"));
    const regressed = new Set(list(slice.regressed_classes).map(String));
    const sorted = perClass.slice().sort((a, b) =>
      (isNumber(a.delta) ? a.delta : Infinity) - (isNumber(b.delta) ? b.delta : Infinity));
    const rows = sorted.map((item) => {
      const cls = regressed.has(String(item.label)) ? "regressed" : null;
      const delta = el("span", { class: isNumber(item.delta) && item.delta !== 0 ? (item.delta > 0 ? "delta-up" : "delta-down") : null },
        signed(item.delta, 3));
      const lostGained = isNumber(item.lost) ? text(item.lost) + " / " + text(item.gained) : "-";
      const holm = isNumber(item.adjusted_p) ? item.adjusted_p.toPrecision(2) : "-";
      return row([text(item.label), text(item.support), fixed(item.current_f1, 3), fixed(item.candidate_f1, 3), delta,
        lostGained, holm], numeric, { class: cls, "data-label": text(item.label) });
    });
    return el("div", { "data-slice": isObject(slice) ? text(slice.name) : null },
      el("h4", {}, name + " (largest drop first)"),
      el("div", { class: "scroll" }, table(["Class", "Support", "Current F1", "Candidate F1", "Delta", "Lost / gained", "Holm p"], rows, numeric)));
  });
  return el("div", { class: "columns", id: "per-class" }, blocks);
}

function renderShadow(shadow) {
  if (!isObject(shadow)) return el("p", { class: "muted" }, "-");
  const flips = list(shadow.flips).slice().sort((a, b) => (b.count || 0) - (a.count || 0)).slice(0, 10);
  const byClass = Object.entries(isObject(shadow.flips_by_class) ? shadow.flips_by_class : {})
    .map(([label, counts]) => [label, isObject(counts) ? counts : {}])
    .sort((a, b) => ((b[1].to_other || 0) + (b[1].from_other || 0)) - ((a[1].to_other || 0) + (a[1].from_other || 0)))
    .slice(0, 10);
  const samples = list(shadow.samples);
  const withConfidence = (label, confidence) => text(label) + " (" + fixed(confidence, 2) + ")";
  return el("div", {},
    facts([
      ["Texts compared", text(shadow.n)],
      ["Agreement", percent(shadow.agreement)],
      ["Mean confidence", change(shadow.current_mean_confidence, shadow.candidate_mean_confidence, (v) => fixed(v, 3))],
    ]),
    el("div", { class: "columns" },
      el("div", {}, el("h4", {}, "Top flips"), flips.length
        ? table(["Current", "Candidate", "Count"], flips.map((f) => row([text(f.current), text(f.candidate), text(f.count)],
          [false, false, true])), [false, false, true])
        : el("p", { class: "muted" }, "-")),
      el("div", {}, el("h4", {}, "Flips by class"), byClass.length
        ? table(["Class", "To another class", "From another class"], byClass.map(([label, counts]) =>
          row([label, text(counts.to_other), text(counts.from_other)], [false, true, true])), [false, true, true])
        : el("p", { class: "muted" }, "-"))),
    el("h4", {}, "Sample flips"),
    samples.length
      ? el("div", { class: "scroll", id: "samples" }, table(["Text", "Current", "Candidate"], samples.map((s) =>
        row([text(s.text), withConfidence(s.current, s.current_confidence),
          withConfidence(s.candidate, s.candidate_confidence)]))))
      : el("p", { class: "muted" }, "-"));
}

function renderLatency(latency) {
  if (!isObject(latency)) return el("p", { class: "muted" }, "-");
  const numeric = [false, true, true];
  return el("div", {},
    facts([["Requests timed", text(latency.n)]]),
    table(["Model", "p50 (ms)", "p99 (ms)"], [
      row(["Current", fixed(latency.current_p50_ms, 1), fixed(latency.current_p99_ms, 1)], numeric),
      row(["Candidate", fixed(latency.candidate_p50_ms, 1), fixed(latency.candidate_p99_ms, 1)], numeric),
    ], numeric));
}

// Draw train and validation loss per epoch as polylines on shared axes.
function lossChart(epochs) {
  const points = epochs.map((e, i) => ({ x: isNumber(e.epoch) ? e.epoch : i + 1, train: e.train_loss, val: e.val_loss }));
  const values = points.flatMap((p) => [p.train, p.val]).filter(isNumber);
  if (!values.length) return el("p", { class: "muted" }, "-");
  const width = 560, height = 230, left = 52, right = 14, top = 14, bottom = 40;
  let low = Math.min(...values), high = Math.max(...values);
  if (high === low) { const pad = Math.abs(low) * 0.1 || 0.5; low -= pad; high += pad; }
  const xs = points.map((p) => p.x);
  const xLow = Math.min(...xs), xHigh = Math.max(...xs);
  // The first and last points sit 10 px inside the axes, so their dots stay clear of them.
  const inner = width - left - right - 20;
  const xAt = (x) => left + 10 + (xHigh === xLow ? inner / 2 : (x - xLow) / (xHigh - xLow) * inner);
  const yAt = (y) => top + (high - y) / (high - low) * (height - top - bottom);

  const chart = svg("svg", { class: "chart", id: "loss-chart", viewBox: "0 0 " + width + " " + height, role: "img",
    "aria-label": "Training and validation loss per epoch" });
  for (let i = 0; i <= 4; i++) {
    const y = low + (high - low) * i / 4;
    chart.appendChild(svg("line", { x1: left, x2: width - right, y1: yAt(y), y2: yAt(y), stroke: "#eaeef2" }));
    chart.appendChild(svg("text", { x: left - 6, y: yAt(y) + 4, "text-anchor": "end" }, Number(y.toPrecision(3))));
  }
  const step = Math.max(1, Math.ceil(points.length / 12));
  points.forEach((p, i) => {
    if (i % step === 0 || i === points.length - 1) {
      chart.appendChild(svg("text", { x: xAt(p.x), y: height - bottom + 16, "text-anchor": "middle" }, p.x));
    }
  });
  chart.appendChild(svg("text", { x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle" }, "epoch"));
  chart.appendChild(svg("line", { x1: left, x2: left, y1: top, y2: height - bottom, stroke: "#8c959f" }));
  chart.appendChild(svg("line", { x1: left, x2: width - right, y1: height - bottom, y2: height - bottom, stroke: "#8c959f" }));

  const series = [["train", "training loss", "#0969da", null], ["val", "validation loss", "#cf222e", "5 3"]];
  series.forEach(([key, label, color, dash], index) => {
    const drawn = points.filter((p) => isNumber(p[key]));
    if (!drawn.length) return;
    const line = svg("polyline", { points: drawn.map((p) => xAt(p.x) + "," + yAt(p[key])).join(" "), fill: "none",
      stroke: color, "stroke-width": 2, class: "series-" + key });
    if (dash) line.setAttribute("stroke-dasharray", dash);
    chart.appendChild(line);
    for (const p of drawn) {
      const dot = svg("circle", { cx: xAt(p.x), cy: yAt(p[key]), r: 3, fill: color });
      dot.appendChild(svg("title", {}, label + ", epoch " + p.x + ": " + p[key].toPrecision(4)));
      chart.appendChild(dot);
    }
    const legendX = width - right - 130, legendY = top + 8 + index * 16;
    const mark = svg("line", { x1: legendX, x2: legendX + 22, y1: legendY, y2: legendY, stroke: color, "stroke-width": 2 });
    if (dash) mark.setAttribute("stroke-dasharray", dash);
    chart.appendChild(mark);
    chart.appendChild(svg("text", { x: legendX + 28, y: legendY + 4 }, label));
  });
  return chart;
}

function renderTraining(training) {
  const epochs = list(training.epochs).filter(isObject);
  const epochNumeric = [true, true, true, true, true, true, false];
  const sweep = list(training.sweep).filter(isObject);
  const sweepNumeric = [true, false, true, true, true, true, true, false, false];
  return el("div", {},
    facts([
      ["LoRA rank", text(training.rank)],
      ["Steps", text(training.steps)],
      ["Stop reason", text(training.stop_reason)],
      ["Wall time (s)", text(training.wall_seconds)],
      ["Device", text(training.device)],
    ]),
    el("h4", {}, "Loss per epoch"),
    epochs.length ? lossChart(epochs) : el("p", { class: "muted" }, "-"),
    epochs.length
      ? table(["Epoch", "Steps", "Train loss", "Val loss", "Val accuracy", "Val macro-F1", "Complete"],
        epochs.map((e) => row([text(e.epoch), text(e.steps), fixed(e.train_loss, 4), fixed(e.val_loss, 4),
          percent(e.val_accuracy), fixed(e.val_macro_f1, 4), e.complete === false ? "no" : e.complete ? "yes" : "-"],
          epochNumeric)), epochNumeric)
      : null,
    el("h4", {}, "Rank sweep"),
    sweep.length
      ? table(["Rank", "Start", "Val macro-F1", "Val accuracy", "Val loss", "Steps", "Seconds", "Chosen", "Error"],
        sweep.map((s) => row([text(s.rank), text(s.start), fixed(s.val_macro_f1, 4), percent(s.val_accuracy),
          fixed(s.val_loss, 4), text(s.steps), text(s.wall_seconds), s.chosen ? "yes" : "", text(s.error)], sweepNumeric)),
        sweepNumeric)
      : el("p", { class: "muted" }, "-"));
}

function auditDetail(detail) {
  if (!isObject(detail)) return text(detail);
  const parts = [];
  if ("comment" in detail) parts.push("comment: " + text(detail.comment));
  const rest = Object.fromEntries(Object.entries(detail).filter(([key]) => key !== "comment"));
  if (Object.keys(rest).length) {
    const json = JSON.stringify(rest);
    parts.push(json.length > 240 ? json.slice(0, 240) + "\u2026" : json);
  }
  return parts.length ? parts.join("; ") : "-";
}

function renderAudit(entries) {
  if (!entries.length) return el("p", { class: "muted" }, "-");
  return el("div", { id: "audit" }, table(["Time", "Actor", "Action", "Version", "Detail"], entries.map((entry) =>
    row([el("span", { class: "nowrap" }, timestamp(entry.timestamp)), text(entry.actor), text(entry.action), text(entry.version), auditDetail(entry.detail)],
      [false, false, false, false, false], { "data-action": text(entry.action) }))));
}

function setUpInputs() {
  const token = document.getElementById("token");
  const actor = document.getElementById("actor");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  actor.value = sessionStorage.getItem(ACTOR_KEY) || "";
  const keep = (key, input) => () => {
    if (input.value) sessionStorage.setItem(key, input.value); else sessionStorage.removeItem(key);
  };
  token.addEventListener("input", keep(TOKEN_KEY, token));
  actor.addEventListener("input", keep(ACTOR_KEY, actor));
  document.getElementById("refresh").addEventListener("click", async () => { await loadRuns(); await loadDetail(); });
}

async function start() {
  setUpInputs();
  const fromHash = decodeURIComponent(location.hash.slice(1));
  if (fromHash) ui.selected = fromHash;
  await loadRuns();
  if (ui.selected) await loadDetail();
  // Only the list refreshes on its own, so a comment being typed is never replaced.
  setInterval(loadRuns, LIST_REFRESH_MS);
}

start();
"""


def _source_hash(source: str) -> str:
    """Return the CSP source expression that allows exactly this inline script or style."""
    digest = hashlib.sha256(source.encode("utf-8")).digest()
    return "'sha256-" + base64.b64encode(digest).decode("ascii") + "'"


PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    "<title>driftloop approvals</title>\n"
    f"<style>{_STYLE}</style>\n</head>\n<body>{_BODY}<script>{_SCRIPT}</script>\n</body>\n</html>\n"
)

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    f"script-src {_source_hash(_SCRIPT)}",
    f"style-src {_source_hash(_STYLE)}",
    "connect-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])


def approval_page() -> HTMLResponse:
    """Return the approval page with headers that keep it from running or loading anything else."""
    return HTMLResponse(PAGE, headers={
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    })
