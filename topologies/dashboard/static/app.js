// aiflow dashboard: one page, no libraries. State arrives as Server-Sent Events from /api/events;
// everything shown from the network is inserted as text, never as HTML.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
// the same colours as the timeline pictures (topologies/trace.py)
const KIND_COLORS = {request: "--request", reply: "--reply", forward: "--forward", event: "--event",
  error: "--error", timeout: "--timeout", copy: "--request"};
const KIND_LABELS = [["request", "request"], ["copy", "broker copy"], ["reply", "reply"],
  ["forward", "forward"], ["event", "progress"], ["error", "error"], ["timeout", "timeout"]];

const app = {state: null, runs: new Map(), selected: null, picked: [], tierOf: {}};

function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
function $(id) { return document.getElementById(id); }
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}
function svg(tag, attrs = {}, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function fmt(x, digits = 0) { return x === null || x === undefined ? "—" : Number(x).toFixed(digits); }

// -- the network ------------------------------------------------------------------------------
function renderState(s) {
  app.state = s;
  app.tierOf = {};
  for (const n of s.nodes) for (const a of n.agents) if (n.online) app.tierOf[a.id] = n.tier;
  const online = s.nodes.filter(n => n.online).length;
  $("net-summary").textContent = `${online} node${online === 1 ? "" : "s"} online, ${s.agents.length} agents · ${s.broker} · ${s.namespace}`;
  const tiers = $("tiers");
  tiers.replaceChildren();
  for (const t of s.tiers) {
    const box = el("div", {class: "tier", "data-tier": t.tier});
    box.append(el("h3", {text: `${t.tier} (${t.online}/${t.nodes.length})`}));
    const link = t.rtt_ms === null ? "RTT not measured yet"
      : `RTT ${fmt(t.rtt_ms, 1)} ms` + (t.throughput_mbps ? ` · ${fmt(t.throughput_mbps, 1)} Mbit/s` : "");
    box.append(el("div", {class: "link", text: link}));
    for (const id of t.nodes) box.append(renderNode(s.nodes.find(n => n.id === id)));
    tiers.append(box);
  }
  if (!s.tiers.length) tiers.append(el("p", {class: "hint", text: "No nodes yet: start one with `aiflow node --broker … --tier edge --agent …`."}));
  renderMembers(s.agents);
}

function renderNode(n) {
  const box = el("div", {class: "node" + (n.online ? "" : " offline"), "data-node": n.id});
  const meta = [];
  if (n.cpu) meta.push(`cpu ${fmt(n.cpu.process * 100)}%`);
  if (n.link && n.link.rtt_ms !== null) meta.push(`${fmt(n.link.rtt_ms, 1)} ms`);
  if (n.link && !n.link.up) meta.push("link down");
  box.append(el("div", {class: "node-head"},
    el("span", {}, el("span", {class: "status-dot"}), n.id), el("span", {class: "meta", text: meta.join(" · ")})));
  for (const a of n.agents) {
    const load = a.in_flight === null ? "" : `${a.in_flight} busy · ${a.queued} queued · ${fmt(a.service_ms)} ms`;
    const row = el("div", {class: "agent", "data-agent": a.id},
      el("span", {text: `${a.id}` + (a.type ? ` (${a.type})` : "")}),
      el("span", {class: "load" + (a.in_flight ? " busy" : ""), text: load}));
    box.append(row);
  }
  return box;
}

// -- the form ---------------------------------------------------------------------------------
function renderMembers(agents) {
  app.picked = app.picked.filter(a => agents.includes(a));
  const box = $("f-members");
  const known = [...box.querySelectorAll("input")].map(i => i.value).join("\n");
  if (known !== agents.join("\n")) {
    box.replaceChildren();
    for (const a of agents) {
      const input = el("input", {type: "checkbox", value: a, name: "member"});
      input.checked = app.picked.includes(a);
      input.addEventListener("change", () => {
        app.picked = input.checked ? [...app.picked, a] : app.picked.filter(x => x !== a);
        showOrder();
      });
      box.append(el("label", {"data-member": a}, input, el("span", {text: a}), el("span", {class: "order"})));
    }
    const agg = $("f-aggregator");
    const chosen = agg.value;
    agg.replaceChildren(...agents.map(a => el("option", {value: a, text: a})));
    if (agents.includes(chosen)) agg.value = chosen;
  }
  showOrder();
}

function showOrder() {
  const cascade = $("f-pattern").value === "cascade";
  for (const label of $("f-members").querySelectorAll("label")) {
    const i = app.picked.indexOf(label.dataset.member);
    label.querySelector(".order").textContent = cascade && i >= 0 ? String(i + 1) : "";
  }
}

function showFields() {
  const p = $("f-pattern").value;
  for (const label of document.querySelectorAll("[data-for]")) label.hidden = !label.dataset.for.split(" ").includes(p);
  showOrder();
}

async function submitRun(ev) {
  ev.preventDefault();
  $("form-error").textContent = "";
  const pattern = $("f-pattern").value;
  const body = {pattern, members: app.picked, task: $("f-task").value.trim(), timeout: Number($("f-timeout").value)};
  if (pattern === "ensemble" || pattern === "debate") body.aggregate = $("f-aggregate").value;
  if (pattern === "debate") body.rounds = Number($("f-rounds").value);
  if (pattern === "cascade") body.accept = $("f-accept").value;
  if (pattern === "moa") body.aggregator = $("f-aggregator").value;
  $("f-submit").disabled = true;
  try {
    const r = await fetch("/api/runs", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    const data = await r.json();
    if (!r.ok) { $("form-error").textContent = data.error ? data.error.message : `HTTP ${r.status}`; return; }
    upsertRun(data.run);
    select(data.id);
  } catch (e) {
    $("form-error").textContent = `could not start the run: ${e}`;
  } finally {
    $("f-submit").disabled = false;
  }
}

// -- runs -------------------------------------------------------------------------------------
function upsertRun(summary, extra = {}) {
  const old = app.runs.get(summary.id) || {events: [], graph: null, result: null};
  const run = {...old, ...extra, summary};
  app.runs.set(summary.id, run);
  renderRunList();
  return run;
}

function renderRunList() {
  const list = $("run-list");
  list.replaceChildren();
  for (const run of [...app.runs.values()].reverse()) {
    const s = run.summary;
    const li = el("li", {"data-run": s.id, class: s.id === app.selected ? "selected" : ""},
      el("span", {class: "st-" + s.status, text: `${s.pattern} · ${s.status}`}),
      el("span", {class: "task", text: s.task}),
      el("span", {text: s.answer === null || s.answer === undefined ? "" : String(s.answer)}));
    li.addEventListener("click", () => select(s.id));
    list.append(li);
  }
}

async function select(id) {
  app.selected = id;
  renderRunList();
  let run = app.runs.get(id);
  if (run && !run.graph && run.summary.status !== "file") {
    const r = await fetch(`/api/runs/${encodeURIComponent(id)}`);
    if (r.ok) { const d = await r.json(); run = upsertRun(run.summary, {graph: d.graph, result: d.status === "running" ? null : d, events: d.trace || run.events}); }
  }
  renderRun(app.runs.get(id));
}

function renderRun(run) {
  if (!run) return;
  const s = run.summary, res = run.result;
  $("run").hidden = false;
  $("run-title").textContent = `${s.pattern}: ${s.task}`;
  $("run-status").textContent = s.status;
  $("run-answer").textContent = s.answer === null || s.answer === undefined ? (s.status === "running" ? "…" : "no answer") : String(s.answer);
  $("run-answered-by").textContent = s.answered_by || (res && res.outcome ? res.outcome.source : "—");
  $("run-elapsed").textContent = s.elapsed_ms === null || s.elapsed_ms === undefined ? "—" : `${fmt(s.elapsed_ms)} ms`;
  $("run-bytes").textContent = res && res.bytes_on_wire !== undefined ? `${res.bytes_on_wire}` : "—";
  $("run-error").textContent = s.error || "";
  const dl = $("run-download");
  dl.hidden = !res;
  if (res) dl.href = URL.createObjectURL(new Blob([JSON.stringify(res, null, 2)], {type: "application/json"}));
  const events = res && res.trace ? res.trace : run.events;
  const graph = run.graph || graphFromTrace(events);
  drawGraph(graph, events, res);
  renderContributions(res ? res.contributions || [] : liveContributions(events));
  drawTimeline(events);
}

function liveContributions(events) {
  // while a run is going: every answer that has arrived so far (replies, and stages that forwarded)
  return events.filter(e => ["reply", "forward", "error", "timeout"].includes(e.kind)).map(e => ({
    agent: e.sender, label: e.label, answer: e.answer ?? null, confidence: null,
    latency_ms: e.latency_ms, error: e.error}));
}

function renderContributions(rows) {
  const body = $("contributions").querySelector("tbody");
  body.replaceChildren();
  for (const c of rows) {
    body.append(el("tr", {"data-agent": c.agent},
      el("td", {text: c.agent}), el("td", {text: c.label || ""}),
      el("td", {class: "ans", text: c.answer === null || c.answer === undefined ? "" : String(c.answer)}),
      el("td", {text: c.confidence === null || c.confidence === undefined ? "" : fmt(c.confidence, 2)}),
      el("td", {text: fmt(c.latency_ms)}), el("td", {class: "error", text: c.error || ""})));
  }
}

// -- the pattern graph --------------------------------------------------------------------------
function graphFromTrace(events) {
  // A run file without its pattern (``aiflow run --trace-out``): who talked to whom, in three columns
  // (manager, group topics, agents), drawn like a pattern graph.
  const ids = [...new Set(events.flatMap(e => [e.sender, e.recipient]))];
  const column = id => id === "manager" ? 0 : (id.startsWith("group:") ? 1 : 2);
  const rows = [0, 0, 0];
  const nodes = ["manager", ...ids.filter(i => i !== "manager")].map(id => {
    const x = column(id), y = rows[x]++;
    return {id, kind: x === 2 ? "agent" : "task", tier: null, label: id, x, y};
  });
  const W = 130, H = 30;
  for (const n of nodes) n.box = [20 + n.x * 180, 20 + n.y * 50 + (Math.max(...rows) - rows[n.x]) * 25, W, H];
  const at = Object.fromEntries(nodes.map(n => [n.id, n.box]));
  const seen = new Set(), edges = [];
  for (const e of events) {
    const key = `${e.sender}>${e.recipient}`, a = at[e.sender], b = at[e.recipient];
    if (seen.has(key) || e.sender === e.recipient || a[0] === b[0]) continue;
    seen.add(key);
    const right = a[0] < b[0];  // from the sender's side facing the recipient to the recipient's
    edges.push({source: e.sender, target: e.recipient, kind: e.kind,
      points: [[a[0] + (right ? W : 0), a[1] + H / 2], [b[0] + (right ? 0 : W), b[1] + H / 2]]});
  }
  return {name: "trace", nodes, edges, clusters: [], width: 20 + 3 * 180, height: 40 + Math.max(...rows) * 50};
}

function drawGraph(graph, events, res) {
  // Positions, box sizes and edge curves come from the server: the same layered layout as
  // ``aiflow graph draw`` (topologies.graph.AgentGraph.layout), in pixels.
  const box = $("graph");
  box.replaceChildren();
  box.setAttribute("viewBox", `0 0 ${graph.width} ${graph.height}`);
  box.style.height = `${Math.min(graph.height + 10, 420)}px`;
  const defs = svg("defs");
  const marker = svg("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse"});
  marker.append(svg("path", {d: "M0,0 L10,5 L0,10 z", fill: "#9aa3b2"}));
  defs.append(marker);
  box.append(defs);
  for (const c of graph.clusters || []) {  // a debate's members see each other's answers: one frame, not n² arrows
    const [x, y, w] = c.box;
    box.append(svg("rect", {x, y, width: w, height: c.box[3], rx: 8, class: "peers"}));
    box.append(svg("text", {x: x + w / 2, y: y - 4, "text-anchor": "middle", class: "peers-label"}, c.caption));
  }
  for (const e of graph.edges) {
    if (!e.points || e.points.length < 2) continue;
    const d = "M" + e.points.map(p => p.join(",")).join(" L");
    box.append(svg("path", {d, class: "gedge", "data-source": e.source, "data-target": e.target, "marker-end": "url(#arrow)"}));
  }
  const state = nodeStates(events, res);
  for (const n of graph.nodes) {
    const [x, y, w, h] = n.box;
    const tier = n.tier || app.tierOf[n.id] || null;
    const fill = n.kind === "agent" ? css(`--${tier || "unknown"}`) : "#ffffff";
    const g = svg("g", {class: "gnode " + (state[n.id] || ""), "data-node": n.id, transform: `translate(${x},${y})`});
    g.append(svg("rect", {width: w, height: h, rx: n.kind === "agent" ? 4 : 12, fill}));
    const lines = String(n.label || n.id).split("\n");
    lines.forEach((line, i) => g.append(svg("text", {x: w / 2, y: h / 2 + 4 + (i - (lines.length - 1) / 2) * 14, "text-anchor": "middle", class: "glabel"}, line)));
    g.append(svg("title", {}, `${n.id} (${n.kind}${tier ? ", " + tier : ""})`));
    box.append(g);
  }
}

function nodeStates(events, res) {
  const st = {};
  for (const e of events) {
    if (e.kind === "request" && !e.recipient.startsWith("group:")) st[e.recipient] = st[e.recipient] || "asked";
    if (e.kind === "reply" || e.kind === "forward") st[e.sender] = "answered";
    if (e.kind === "error" || e.kind === "timeout") st[e.sender] = "failed";
  }
  const stood = res && (res.answered_by || null);
  if (stood) st[stood] = "stood";
  return st;
}

function flashEdges(ev) {
  const box = $("graph");
  const ends = ev.kind === "request" ? [null, ev.recipient] : [ev.sender, null];
  for (const p of box.querySelectorAll(".gedge")) {
    if ((ends[0] && p.dataset.source === ends[0]) || (ends[1] && p.dataset.target === ends[1])) {
      p.classList.add("flash");
      setTimeout(() => p.classList.remove("flash"), 700);
    }
  }
}

// -- the timeline -----------------------------------------------------------------------------
function timelinePrimitives(events) {
  // Lanes and arrows: each message goes from its sender's lane at its start to its recipient's lane
  // at its end. A group publish goes to the broker's lane; the broker's copies then go to each
  // member that answered through the group, so their replies start from a visible copy.
  const lanes = ["manager"];
  const add = l => { if (!lanes.includes(l)) lanes.push(l); };
  const arrows = [];
  const groups = events.filter(e => e.via === "group" && e.kind === "request");
  if (groups.length) add("broker");
  for (const e of events) { add(e.sender); if (!e.recipient.startsWith("group:")) add(e.recipient); }
  for (const e of events) {
    if (e.recipient.startsWith("group:")) {
      arrows.push({from: e.sender, to: "broker", t0: e.start, t1: e.end, kind: "request", label: e.label});
      // the members the broker copied it to (recorded since the trace has ``members``; older files:
      // the group replies of the same round)
      const members = e.members && e.members.length ? e.members
        : events.filter(r => r.via === "group" && r.kind !== "request" && r.label === e.label && r.start === e.start).map(r => r.sender);
      for (const m of members) { add(m); arrows.push({from: "broker", to: m, t0: e.end, t1: e.end, kind: "copy", label: e.label}); }
    } else {
      const kind = e.kind;
      const answer = e.kind === "reply" || e.kind === "error" || e.kind === "timeout";
      // the time between the request and its answer, on the answering lane (the member at work)
      if (answer && e.end > e.start) arrows.push({from: e.sender, to: e.sender, t0: e.start, t1: e.end, kind: "wait", color: kind, label: e.label});
      arrows.push({from: e.sender, to: e.recipient, t0: answer ? e.end : e.start, t1: e.end, kind, label: e.label, answer: e.answer});
    }
  }
  return {lanes: lanes.filter(l => !l.startsWith("group:")), arrows};
}

function drawTimeline(events) {
  const box = $("timeline");
  box.replaceChildren();
  const legend = $("timeline-legend");
  legend.replaceChildren(...KIND_LABELS.flatMap(([k, text]) => [el("i", {class: k === "copy" ? "dashed" : "", style: `background:${css(KIND_COLORS[k])}`}), text]));
  if (!events.length) { box.setAttribute("viewBox", "0 0 600 40"); box.append(svg("text", {x: 10, y: 24}, "no messages yet")); return; }
  const {lanes, arrows} = timelinePrimitives(events);
  const t0 = Math.min(...events.map(e => e.start)), t1 = Math.max(...events.map(e => e.end), t0 + 1e-3);
  const left = 130, right = 20, laneH = 28, W = 900, H = lanes.length * laneH + 40;
  box.setAttribute("viewBox", `0 0 ${W} ${H}`);
  box.style.height = `${Math.min(H, 480)}px`;
  const x = t => left + (t - t0) / (t1 - t0) * (W - left - right);
  const y = l => 14 + lanes.indexOf(l) * laneH + laneH / 2;
  lanes.forEach(l => {
    box.append(svg("line", {x1: left, x2: W - right, y1: y(l), y2: y(l), class: "lane"}));
    box.append(svg("text", {x: left - 6, y: y(l) + 4, "text-anchor": "end"}, l.length > 20 ? l.slice(0, 19) + "…" : l));
  });
  for (const a of arrows) {
    if (!lanes.includes(a.from) || !lanes.includes(a.to)) continue;
    const color = css(KIND_COLORS[a.color || a.kind] || "--event");
    if (a.kind === "wait") { box.append(svg("line", {x1: x(a.t0), y1: y(a.from), x2: x(a.t1), y2: y(a.to), stroke: color, class: "wait"})); continue; }
    const line = svg("line", {x1: x(a.t0), y1: y(a.from), x2: x(a.t1), y2: y(a.to), stroke: color, class: `ev ev-${a.kind}` + (a.kind === "copy" ? " copy" : ""), "data-kind": a.kind});
    line.append(svg("title", {}, `${a.kind}: ${a.from} → ${a.to} ${a.label || ""}` + (a.answer ? ` · answer ${a.answer}` : "")));
    box.append(line);
    box.append(svg("circle", {cx: x(a.t1), cy: y(a.to), r: 2.6, fill: color}));
  }
  const ms = (t1 - t0) * 1e3;
  box.append(svg("text", {x: left, y: H - 6}, "0 ms"));
  box.append(svg("text", {x: W - right, y: H - 6, "text-anchor": "end"}, `${ms.toFixed(ms < 10 ? 1 : 0)} ms`));
}

// -- files ------------------------------------------------------------------------------------
async function openFile(ev) {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const d = JSON.parse(await file.text());
    const events = d.trace || (d.events ? d.events : []);
    if (!Array.isArray(events)) throw new Error("no trace in this file");
    const id = "file:" + file.name;
    const summary = {id, pattern: d.pattern || "run", task: d.task || file.name, status: "file", answer: d.answer ?? null,
      answered_by: d.answered_by ?? null, elapsed_ms: d.elapsed_ms ?? null, error: d.error ?? null, members: []};
    upsertRun(summary, {graph: d.graph || null, result: {...d, trace: events}, events});
    select(id);
  } catch (e) {
    $("form-error").textContent = `${file.name}: not a run file (${e.message})`;
  } finally {
    ev.target.value = "";
  }
}

// -- live updates -------------------------------------------------------------------------------
function connect() {
  const source = new EventSource("/api/events");
  const conn = $("conn");
  source.onopen = () => { conn.className = "conn live"; $("conn-text").textContent = "live"; };
  source.onerror = () => { conn.className = "conn down"; $("conn-text").textContent = "reconnecting…"; };
  source.addEventListener("state", m => {
    const s = JSON.parse(m.data);
    renderState(s);
    if (!s.connected) { conn.className = "conn down"; $("conn-text").textContent = "broker connection lost"; }
  });
  source.addEventListener("runs", m => { for (const r of JSON.parse(m.data).runs) upsertRun(r); });
  source.addEventListener("run", m => {
    const d = JSON.parse(m.data);
    upsertRun(d.run, {graph: d.graph, events: []});
    if (app.selected === d.run.id) renderRun(app.runs.get(d.run.id));
  });
  source.addEventListener("trace", m => {
    const d = JSON.parse(m.data);
    const run = app.runs.get(d.run);
    if (!run) return;
    run.events.push(d.event);
    if (app.selected === d.run) { renderRun(run); flashEdges(d.event); }
  });
  source.addEventListener("done", m => {
    const d = JSON.parse(m.data);
    upsertRun(d.run, {result: d.result, graph: d.result.graph, events: d.result.trace || []});
    if (app.selected === d.run.id) renderRun(app.runs.get(d.run.id));
  });
}

$("run-form").addEventListener("submit", submitRun);
$("f-pattern").addEventListener("change", showFields);
$("open-file").addEventListener("change", openFile);
showFields();
connect();
