// The mesh console: one page over the node's own API. Everything shown comes from the API of
// the node that served this page; text from the mesh (model names, peer agents, answers) is
// always set as text, never as markup.
"use strict";

const state = { key: sessionStorage.getItem("mesh-api-key") || "", me: null, calls: new Map(), selected: null };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : child === null || child === undefined ? "" : String(child));
  }
  return node;
}

function short(peer) {
  return peer ? peer.slice(0, 8) + "…" + peer.slice(-6) : "";
}

function ms(value) {
  return value === undefined || value === null ? "" : value + " ms";
}

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (state.key) opts.headers["Authorization"] = "Bearer " + state.key;
  const response = await fetch(path, opts);
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this node's API needs its key");
  }
  return response;
}

async function json(path, options) {
  const response = await api(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error((body.error && body.error.message) || response.statusText);
  return body;
}

// Reads a response of JSON lines (/v1/mesh/infer, replay), calling `each` per event.
async function readLines(response, each) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, cut).trim();
      buffered = buffered.slice(cut + 1);
      if (line) each(JSON.parse(line));
    }
  }
}

// ---- status, peers, models ----

async function refreshStatus() {
  const status = await json("/v1/mesh/status");
  state.me = status.peer_id;
  $("me").textContent = status.peer_id;
  const reach = status.network ? status.network.reachability : "unknown";
  $("reach").textContent = "reach: " + String(reach).toLowerCase();
}

async function refreshPeers() {
  const peers = await json("/v1/mesh/peers");
  const body = $("peers").querySelector("tbody");
  body.replaceChildren(...peers.map((p) => el("tr", { "data-peer": p.peer_id },
    el("td", { title: p.peer_id }, short(p.peer_id)), el("td", { class: "path" }, p.path),
    el("td", {}, p.rtt_ms === null || p.rtt_ms === undefined ? "" : p.rtt_ms.toFixed(1) + " ms"),
    el("td", {}, p.agent || ""))));
  drawTopology(peers);
  const target = $("chat-target");
  const chosen = target.value;
  target.replaceChildren(el("option", { value: "any" }, "any"),
    ...peers.map((p) => el("option", { value: p.peer_id }, short(p.peer_id))));
  if ([...target.options].some((o) => o.value === chosen)) target.value = chosen;
  const replay = $("replay-to");
  const replayChosen = replay.value;
  replay.replaceChildren(el("option", { value: "same" }, "the same node"), el("option", { value: "any" }, "any node"),
    ...peers.map((p) => el("option", { value: p.peer_id }, short(p.peer_id))));
  if ([...replay.options].some((o) => o.value === replayChosen)) replay.value = replayChosen;
}

function drawTopology(peers) {
  const svg = $("topology");
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const parts = [];
  const radius = 100;
  peers.forEach((peer, i) => {
    const angle = (2 * Math.PI * i) / Math.max(peers.length, 1) - Math.PI / 2;
    const x = (radius * 1.6 * Math.cos(angle)).toFixed(1);
    const y = (radius * Math.sin(angle)).toFixed(1);
    parts.push(make("line", { x1: 0, y1: 0, x2: x, y2: y, class: peer.path }));
    parts.push(make("circle", { cx: x, cy: y, r: 9, "data-peer": peer.peer_id }));
    parts.push(make("text", { x: x, y: Number(y) + 21 }, short(peer.peer_id)));
  });
  parts.push(make("circle", { cx: 0, cy: 0, r: 12, class: "me" }));
  parts.push(make("text", { x: 0, y: 26 }, "this node"));
  svg.replaceChildren(...parts);
}

async function refreshModels() {
  const listings = await json("/v1/mesh/models");
  const body = $("models").querySelector("tbody");
  body.replaceChildren(...listings.map((m) => el("tr", { "data-model": m.model },
    el("td", {}, m.model), el("td", {}, m.card.task), el("td", { title: m.peer_id }, m.peer_id === state.me ? "this node" : short(m.peer_id)),
    el("td", {}, m.path || ""), el("td", {}, m.load))));
  const callable = [...new Set(listings.filter((m) => !m.card.layers && m.card.task !== "embed").map((m) => m.model))].sort();
  const select = $("chat-model");
  const chosen = select.value;
  select.replaceChildren(...callable.map((name) => el("option", { value: name }, name)));
  if (callable.includes(chosen)) select.value = chosen;
}

// ---- inspector ----

function callRow(call) {
  const row = el("tr", { "data-call": String(call.id), class: state.selected === call.id ? "selected" : "" },
    el("td", {}, call.id), el("td", {}, call.direction), el("td", {}, call.model),
    el("td", { title: call.peer || "" }, short(call.peer)), el("td", {}, call.path || ""),
    el("td", { class: call.state }, call.state + (call.code ? " (" + call.code + ")" : "")),
    el("td", {}, ms(call.first_output_ms)), el("td", {}, ms(call.total_ms)));
  row.addEventListener("click", () => showCall(call.id));
  return row;
}

function renderCalls() {
  const calls = [...state.calls.values()].sort((a, b) => b.id - a.id);
  $("calls").querySelector("tbody").replaceChildren(...calls.map(callRow));
}

async function refreshCalls() {
  const list = await json("/v1/mesh/calls");
  $("capture").checked = list.capture;
  $("capture").dataset.saved = String(list.capture);
  state.calls = new Map(list.calls.map((c) => [c.id, c]));
  renderCalls();
}

async function showCall(id) {
  state.selected = id;
  renderCalls();
  const call = await json("/v1/mesh/calls/" + id);
  $("call-detail").hidden = false;
  $("detail-title").textContent = "Call " + call.id + (call.replay_of ? " (replay of " + call.replay_of + ")" : "");
  const fields = [["direction", call.direction], ["model", call.model], ["target", call.target], ["peer", call.peer],
    ["tried", (call.tried || []).join(", ")], ["path", call.path], ["state", call.state], ["code", call.code],
    ["reason", call.message], ["connect", ms(call.connect_ms)], ["first output", ms(call.first_output_ms)],
    ["total", ms(call.total_ms)], ["tokens", call.tokens], ["receipt", call.receipt],
    ["receipt verified", call.receipt_verified], ["started", new Date(call.started_unix_ms).toISOString()]];
  $("detail-fields").replaceChildren(...fields.filter(([, v]) => v !== undefined && v !== null && v !== "")
    .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const capture = call.capture;
  $("detail-request").textContent = capture && capture.request ? JSON.stringify(capture.request, null, 2)
    : "not captured (turn capture on to keep the bodies of the next calls)";
  $("detail-response").textContent = capture ? capture.response + (capture.truncated ? "\n[cut at the capture's cap]" : "") : "";
  $("replay-controls").hidden = call.direction !== "out";
  $("replay-answer").textContent = "";
  $("replay-meta").textContent = "";
}

async function replay() {
  const id = state.selected;
  const answer = $("replay-answer");
  const meta = $("replay-meta");
  answer.textContent = "";
  meta.textContent = "replaying call " + id + "…";
  const response = await api("/v1/mesh/calls/" + id + "/replay", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ to: $("replay-to").value }),
  });
  if (!response.ok) {
    const body = await response.json();
    meta.textContent = "cannot replay: " + body.error.message;
    return;
  }
  const newId = response.headers.get("x-mesh-call-id");
  await readLines(response, (event) => {
    if (event.event === "delta") answer.textContent += event.text;
    if (event.event === "done") meta.textContent = "replayed as call " + newId + " by " + short(event.peer) + " over " + event.path + " in " + event.total_ms + " ms";
    if (event.event === "error") meta.textContent = "replay " + newId + " failed: " + event.message;
  });
}

// ---- chat ----

async function chat(e) {
  e.preventDefault();
  const model = $("chat-model").value;
  const prompt = $("chat-prompt").value;
  if (!model || !prompt) return;
  const answer = $("chat-answer");
  const meta = $("chat-meta");
  answer.textContent = "";
  meta.textContent = "calling " + model + "…";
  $("chat-send").disabled = true;
  try {
    const spec = { target: $("chat-target").value, model: model, messages: [{ role: "user", content: prompt }],
      params: { max_tokens: 64, temperature: 0 }, deadline_ms: 120000 };
    const response = await api("/v1/mesh/infer", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(spec) });
    await readLines(response, (event) => {
      if (event.event === "delta") answer.textContent += event.text;
      if (event.event === "done") meta.textContent = "answered by " + (event.peer === state.me ? "this node" : short(event.peer)) + " over " + event.path + ": "
        + event.usage.completion_tokens + " tokens in " + event.total_ms + " ms, receipt " + (event.receipt_verified ? "verified" : "not verified");
      if (event.event === "error") meta.textContent = "failed (" + event.code + "): " + event.message;
    });
  } catch (err) {
    meta.textContent = String(err);
  } finally {
    $("chat-send").disabled = false;
  }
}

// ---- the live feed (server-sent events, read with fetch so the key can be sent) ----

function onEvent(name, data) {
  const live = $("live");
  let line = null;
  if (name === "call_started" || name === "call_ended") {
    state.calls.set(data.id, data);
    renderCalls();
    const arrow = data.direction === "out" ? "→" : "←";
    line = name === "call_started" ? arrow + " " + data.id + " " + data.model + " " + (data.direction === "in" ? "from " + short(data.peer) : "to " + data.target)
      : arrow + " " + data.id + " " + data.model + " " + data.state + (data.code ? " (" + data.code + ")" : "") + (data.total_ms !== undefined ? " in " + data.total_ms + " ms" : "")
        + (data.path ? " over " + data.path : "");
    if (name === "call_ended" && state.selected === data.id) showCall(data.id);
  } else if (name === "peer_connected") {
    line = "+ peer " + short(data.peer) + " (" + data.path + ")";
    refreshPeers().catch(() => {});
  } else if (name === "peer_disconnected") {
    line = "- peer " + short(data.peer);
    refreshPeers().catch(() => {});
  } else if (name === "lagged") {
    line = "… missed " + data.missed + " events";
    refreshCalls().catch(() => {});
  }
  if (line) {
    live.prepend(el("li", { "data-event": name }, new Date().toLocaleTimeString() + "  " + line));
    while (live.children.length > 200) live.lastChild.remove();
  }
}

async function follow() {
  for (let wait = 1000; ; wait = Math.min(wait * 2, 15000)) {
    try {
      const response = await api("/v1/mesh/events");
      if (response.ok) {
        $("feed-state").textContent = "feed: live";
        wait = 1000;
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffered = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffered += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
          let cut;
          while ((cut = buffered.indexOf("\n\n")) >= 0) {
            const block = buffered.slice(0, cut);
            buffered = buffered.slice(cut + 2);
            let name = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith("event:")) name = line.slice(6).trim();
              else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
            }
            if (data.length) onEvent(name, JSON.parse(data.join("\n")));
          }
        }
      }
    } catch (err) {
      // the node restarted or the key is missing: try again
    }
    $("feed-state").textContent = "feed: reconnecting";
    await new Promise((r) => setTimeout(r, wait));
  }
}

async function refreshAll() {
  await refreshStatus();
  await Promise.all([refreshPeers(), refreshModels(), refreshCalls()]);
}

function start() {
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("key").value;
    sessionStorage.setItem("mesh-api-key", state.key);
    $("key-form").hidden = true;
    refreshAll().catch(() => {});
  });
  $("chat-form").addEventListener("submit", chat);
  $("replay").addEventListener("click", () => replay().catch((err) => { $("replay-meta").textContent = String(err); }));
  $("capture").addEventListener("change", async (e) => {
    const saved = await json("/v1/mesh/capture", { method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ capture: e.target.checked }) });
    e.target.dataset.saved = String(saved.capture);
  });
  refreshAll().catch(() => {});
  setInterval(() => { refreshModels().catch(() => {}); refreshPeers().catch(() => {}); }, 10000);
  follow();
}

start();
