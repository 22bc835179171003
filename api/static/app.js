// BioPetals web page: a chat over /v1/chat/completions (streamed) and a live swarm view (/api/swarm).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], key: localStorage.getItem("biopetals-api-key") || "", abort: null,
                steps: new Map() };  // peer id -> [decode steps, read_at] of the previous swarm view

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

function needKey() {
  $("key-form").hidden = false;
  $("model-name").textContent = "this server needs an API key";
  // a key was sent and refused: say so (HTTP 401), do not just ask again
  $("key-error").hidden = !state.key;
  $("key-error").textContent = state.key ? "this API key was refused (HTTP 401): check it and try again" : "";
}

async function getJSON(path) {
  const r = await fetch(path, { headers: headers(false) });
  if (r.status === 401) { needKey(); throw new Error("API key needed"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
  return body;
}

const esc = (t) => String(t).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const short = (peer) => peer.length > 16 ? peer.slice(0, 8) + "…" + peer.slice(-6) : peer;
// a node as people know it: its --public-name, else its shortened peer id
const nodeName = (n) => n.public_name || short(n.peer_id);
const fmt = (x, d = 1) => (x === null || x === undefined) ? "–" : Number(x).toFixed(d);

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

// ------------------------------------------------------------------ chat

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function showMeta(div, extra, usage, elapsed) {
  const meta = document.createElement("div");
  meta.className = "meta";
  const route = (extra.route || []).map((s) => `blocks ${s.start}:${s.end} ← <code title="${esc(s.peer_id)}">${esc(short(s.peer_id))}</code>`).join(" → ");
  const parts = [];
  if (usage) parts.push(`${usage.completion_tokens} tokens`);
  if (extra.tokens_per_second) parts.push(`${fmt(extra.tokens_per_second)} tokens/s`);
  if (extra.time_to_first_token !== undefined && extra.time_to_first_token !== null) parts.push(`first token after ${fmt(extra.time_to_first_token, 2)} s`);
  parts.push(`${fmt(elapsed, 1)} s in all`);
  meta.innerHTML = parts.join(" · ") + (route ? `<br>route: ${route}` : "");
  div.appendChild(meta);
}

async function ask(question) {
  state.history.push({ role: "user", content: question });
  addMessage("user", question);
  const div = addMessage("assistant", "");
  const text = document.createElement("span");
  div.appendChild(text);
  $("send").disabled = true; $("stop").disabled = false;
  state.abort = new AbortController();
  const started = performance.now();
  let answer = "", extra = null, usage = null, error = null, finish = null;
  try {
    const temperature = Number($("temperature").value);
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(true), signal: state.abort.signal,
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true,
                             max_tokens: Number($("max-tokens").value), temperature,
                             stream_options: { include_usage: true } }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      if (r.status === 401) needKey();
      throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { error = chunk.error.message; continue; }
        if (chunk.usage) usage = chunk.usage;
        if (chunk.biopetals) extra = chunk.biopetals;
        for (const choice of chunk.choices || []) {
          if (choice.finish_reason) finish = choice.finish_reason;
          if (choice.delta && choice.delta.content) {
            answer += choice.delta.content;
            text.textContent = answer;
            $("messages").scrollTop = $("messages").scrollHeight;
          }
        }
      }
    }
  } catch (e) {
    error = e.name === "AbortError" ? "stopped" : e.message;
  } finally {
    $("send").disabled = false; $("stop").disabled = true; state.abort = null;
  }
  if (answer) state.history.push({ role: "assistant", content: answer });
  else state.history.pop();
  if (error) {
    const err = document.createElement("div");
    err.className = "msg error";
    err.textContent = error === "stopped" ? "(stopped)" : "Error: " + error;
    div.appendChild(err);
  }
  if (finish === "length") {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = `(stopped at max tokens: ${$("max-tokens").value}; raise "max tokens" for a longer answer)`;
    div.appendChild(note);
  }
  if (extra) showMeta(div, extra, usage, (performance.now() - started) / 1000);
}

// ------------------------------------------------------------------ swarm view

function renderSwarm(s) {
  const missing = s.missing || [];
  const online = s.nodes.filter((n) => n.state === "ONLINE").length;
  const ranges = missing.map(([a, b]) => `${a}:${b}`).join(", ");
  $("swarm-summary").innerHTML =
    `<b>${s.blocks}</b> blocks · <b>${online}</b> of ${s.nodes.length} nodes online · ` +
    `API sessions <b>${s.api_sessions_active}</b> / ${s.api_sessions_max}` +
    (s.error ? `<div class="warn">${esc(s.error)}</div>` : "") +
    (missing.length ? `<div class="warn" id="missing">No online node for block(s) ${ranges}: answers will fail until a node serves them.</div>`
                    : `<div class="muted">every block is served</div>`);
  const table = $("blocks");
  table.innerHTML = "";
  const head = table.insertRow();
  const corner = document.createElement("th"); corner.className = "rowhead"; corner.textContent = "block"; head.appendChild(corner);
  // many blocks: number every 5th column (each cell's title names its block)
  const every = s.blocks > 24 ? 5 : 1;
  for (let b = 0; b < s.blocks; b++) { const th = document.createElement("th"); th.textContent = b % every ? "" : b; th.title = `block ${b}`; head.appendChild(th); }
  for (const n of s.nodes) {
    const row = table.insertRow();
    const th = document.createElement("th"); th.className = "rowhead"; th.textContent = nodeName(n); th.title = n.peer_id; row.appendChild(th);
    for (let b = 0; b < s.blocks; b++) {
      const td = row.insertCell();
      if (n.start <= b && b < n.end) { td.className = n.state === "ONLINE" ? "on" : "off"; td.title = `${nodeName(n)} ${n.state}`; }
    }
  }
  const cov = table.insertRow();
  const th = document.createElement("th"); th.className = "rowhead"; th.textContent = "online nodes"; cov.appendChild(th);
  (s.online_per_block || []).forEach((count, b) => {
    const td = cov.insertCell();
    td.textContent = count;
    td.className = "count " + (count ? "ok" : "missing");
    td.title = count ? `block ${b}: ${count} online node(s)` : `block ${b}: NO online node`;
  });
  const body = $("nodes").tBodies[0];
  body.innerHTML = "";
  const steps = new Map();
  for (const n of s.nodes) {
    const info = n.node_info || {};
    const row = body.insertRow();
    // tokens/s now: decode steps the node ran since the previous view, measured for every node
    // that answers (its start-up benchmark, when it ran one, is the tooltip)
    let now = "–";
    if (info.decode_steps !== undefined && info.decode_steps !== null) {
      steps.set(n.peer_id, [info.decode_steps, s.read_at]);
      const prev = state.steps.get(n.peer_id);
      now = prev && s.read_at > prev[1] ? fmt(Math.max(0, info.decode_steps - prev[0]) / (s.read_at - prev[1])) : "0.0";
    }
    const cache = info.cache_tokens_left ?? n.cache_tokens_left;
    const cells = [nodeName(n), `${n.start}:${n.end}`, n.state, now,
                   info.sessions_open ?? "?", cache, duration(info.uptime)];
    cells.forEach((c, i) => { const td = row.insertCell(); td.textContent = c; if (i === 2) td.className = "state-" + n.state;
      if (i === 0) td.title = n.peer_id;
      if (i === 3) { td.className = "tps"; td.title = n.inference_tps ? `measured at start: ${fmt(n.inference_tps)} tokens/s` : "no start-up benchmark (--no-benchmark)"; } });
  }
  state.steps = steps;
  $("swarm-updated").textContent = "updated " + new Date(s.read_at * 1000).toLocaleTimeString();
}

async function refreshSwarm() {
  try { renderSwarm(await getJSON("/api/swarm")); }
  catch (e) { $("swarm-updated").textContent = e.message; }
}

async function start() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("model-name").textContent = `${state.model} · ${models.data[0].context_length} tokens of context`;
    $("key-form").hidden = true;
  } catch (e) { return; }
  refreshSwarm();
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("prompt").value.trim();
  if (!q || !state.model || state.abort) return;
  $("prompt").value = "";
  ask(q);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
$("stop").addEventListener("click", () => state.abort && state.abort.abort());
$("clear").addEventListener("click", () => { state.history = []; $("messages").innerHTML = ""; });
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("key-input").value.trim();
  localStorage.setItem("biopetals-api-key", state.key);
  start();
});
setInterval(() => { if (state.model) refreshSwarm(); }, 2000);
start();
