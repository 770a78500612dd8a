// orch serve dashboard: plain script, no build step. Talks to /api/v1 and follows /api/v1/events.
"use strict";

const STATES = ["pending", "running", "stopping", "backoff", "done", "failed", "stopped"];
const COLORS = {
  pending: "#4b5363", running: "#3b82f6", stopping: "#f59e0b", backoff: "#f97316",
  done: "#22c55e", failed: "#ef4444", stopped: "#a78bfa",
};
const API = "/api/v1";
const $ = (id) => document.getElementById(id);

// --- helpers -----------------------------------------------------------------------
function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function num(n) { return n == null ? "-" : Number(n).toLocaleString("en-US"); }
function rate(r, unit) {
  if (r == null) return "-";
  const u = unit === "shards" ? " shards" : "";
  if (r >= 100) return Math.round(r).toLocaleString("en-US") + u + "/s";
  if (r >= 1) return r.toFixed(1) + u + "/s";
  if (r > 0) return (r * 60).toFixed(1) + u + "/min";
  return "0" + u + "/s";
}
function dur(s) {
  if (s == null || !isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d " + Math.floor((s % 86400) / 3600) + "h";
}
function bytes(b) {
  if (b == null) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (i ? b.toFixed(1) : b) + " " + u[i];
}
function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour12: false }) : d.toLocaleString([], { hour12: false });
}
function pct(done, total) { return total ? Math.min(100, (100 * done) / total) : null; }
function badge(state) { return `<span class="badge s-${esc(state)}">${esc(state)}</span>`; }
function progressCell(done, total, state) {
  const p = pct(done || 0, total);
  const cls = state === "done" ? "done" : state === "failed" ? "failed" : "";
  const label = done == null ? "" : total ? `${num(done)}/${num(total)}` : num(done);
  const width = p == null ? (state === "done" ? 100 : 0) : p;
  return `<div class="pcell"><div class="progress ${cls}"><div style="width:${width}%"></div></div><span>${label}${p == null ? "" : " · " + p.toFixed(0) + "%"}</span></div>`;
}
async function api(path, opts = {}) {
  const init = { credentials: "same-origin", ...opts };
  if (opts.body !== undefined) {
    init.method = opts.method || "POST";
    init.headers = { "content-type": "application/json" };
    init.body = JSON.stringify(opts.body);
  }
  const res = await fetch(API + path, init);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.error || res.status + " " + res.statusText);
  return data;
}
let toastTimer = null;
function toast(text, ok) {
  const t = $("toast");
  t.textContent = text;
  t.className = "toast" + (ok ? " ok" : "");
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}
async function act(path, body, done) {
  try {
    await api(path, { method: "POST", body: body || {} });
    if (done) toast(done, true);
  } catch (e) {
    toast(e.message);
  }
}
function throttle(fn, ms) {
  let timer = null, pending = false;
  return function () {
    if (timer) { pending = true; return; }
    fn();
    timer = setTimeout(function tick() {
      timer = null;
      if (pending) { pending = false; fn(); timer = setTimeout(tick, ms); }
    }, ms);
  };
}

// --- event stream ------------------------------------------------------------------
let source = null;
function follow(query, onEvent, onOpen) {
  if (source) source.close();
  source = new EventSource(API + "/events" + query);
  const conn = $("conn");
  source.onopen = () => {
    conn.textContent = "live"; conn.className = "conn live";
    if (onOpen) onOpen(); // catch up with whatever happened before the stream was open
  };
  source.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn down"; };
  source.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch (e) { return; }
    onEvent(ev);
  };
}

// --- runs list -----------------------------------------------------------------------
const runsState = { runs: [], stats: {} };

async function showRuns() {
  $("runs-view").hidden = false;
  $("crumbs").innerHTML = "";
  document.title = "orch · runs";
  await loadRuns();
  loadTasks();
  follow("", (ev) => {
    if (ev.type === "progress") {
      runsState.stats[ev.run] = ev;
      renderRuns();
    } else if (ev.type === "run" || ev.type === "reset") {
      reloadRuns();
    } else if (ev.type === "shard" && (ev.state === "failed" || ev.state === "done")) {
      reloadRuns();
    }
  }, () => reloadRuns());
}
const reloadRuns = throttle(() => loadRuns(), 1000);
async function loadRuns() {
  try {
    runsState.runs = await api("/runs");
  } catch (e) { toast(e.message); return; }
  renderRuns();
}
function renderRuns() {
  const rows = runsState.runs.map((r) => {
    const st = runsState.stats[r.id] || {};
    const done = st.items_done ?? r.items_done;
    const total = st.items_total ?? r.items_total;
    const counts = (r.state === "running" && st.counts) || r.counts || st.counts || {};
    const doneShards = counts.done || 0;
    const prog = total ? progressCell(done, total, r.state)
      : progressCell(doneShards, r.shard_count, r.state).replace("</span>", " shards</span>");
    const failed = counts.failed || 0;
    const live = r.state === "running";
    return `<tr data-run="${esc(r.id)}">
      <td><a href="/runs/${encodeURIComponent(r.id)}">${esc(r.name || r.id)}</a></td>
      <td class="mono muted">${esc(r.id)}</td>
      <td>${badge(r.state)}</td>
      <td>${prog}</td>
      <td class="num">${live ? rate(st.rate, st.unit) : "-"}</td>
      <td class="num">${live ? dur(st.eta_s) : "-"}</td>
      <td>${esc(when(r.started_at))}</td>
      <td class="num">${failed ? `<span style="color:var(--failed)">${num(failed)}</span>` : "0"}</td>
    </tr>`;
  });
  document.querySelector("#runs-table tbody").innerHTML = rows.join("");
  $("runs-empty").hidden = runsState.runs.length > 0;
}
async function loadTasks() {
  let tasks = [];
  try { tasks = await api("/tasks"); } catch (e) { return; }
  if (!tasks.length) return;
  $("task-select").innerHTML = tasks.map((t) => `<option>${esc(t.name)}</option>`).join("");
  $("start-form").hidden = false;
  $("start-form").onsubmit = async (e) => {
    e.preventDefault();
    const task = $("task-select").value;
    try {
      const r = await api("/runs", { body: { task } });
      toast(`started ${task}: ${r.id}`, true);
      reloadRuns();
    } catch (err) { toast(err.message); }
  };
}

// --- run page --------------------------------------------------------------------------
const R = {
  id: null, run: null, cells: "", legend: STATES, stats: null,
  page: { cursor: "0", history: [], next: null, total: 0, limit: 25 },
  drawer: null,
};

async function showRun(key) {
  $("run-view").hidden = false;
  R.key = key;
  let run;
  try {
    run = await api(`/runs/${encodeURIComponent(key)}?shards=0`);
  } catch (e) {
    $("run-title").textContent = e.message;
    return;
  }
  R.id = run.id;
  R.run = run;
  document.title = `orch · ${run.name || run.id}`;
  $("crumbs").innerHTML = `/ <a href="/">runs</a> / ${esc(run.name || run.id)}`;
  $("legend").innerHTML = STATES.map((s) => `<span><i style="background:${COLORS[s]}"></i>${s}</span>`).join("");
  $("state-filter").innerHTML = `<option value="">all states</option>` + STATES.map((s) => `<option>${s}</option>`).join("");
  wireRun();
  renderHead();
  follow(`?run=${encodeURIComponent(run.id)}`, onRunEvent, () => { refreshRun(); refreshGrid(); });
  await Promise.all([loadGrid(), loadPage(), loadAttention(), loadStats()]);
  setInterval(() => renderElapsed(), 1000);
  // a safety net under the event stream: a live run's header is re-read every 10 s
  setInterval(() => { if (R.run.state === "running") refreshRun(); }, 10000);
}

function wireRun() {
  $("stop-run").onclick = () => act(`/runs/${R.id}/stop`, {}, "stopping every shard");
  $("resume-run").onclick = () => act(`/runs/${R.id}/resume`, {}, "resuming");
  $("conc-minus").onclick = () => scale(-1);
  $("conc-plus").onclick = () => scale(+1);
  $("state-filter").onchange = () => { R.page.cursor = "0"; R.page.history = []; loadPage(); };
  $("sort").onchange = () => { R.page.cursor = "0"; R.page.history = []; loadPage(); };
  $("next").onclick = () => { if (R.page.next) { R.page.history.push(R.page.cursor); R.page.cursor = R.page.next; loadPage(); } };
  $("prev").onclick = () => { if (R.page.history.length) { R.page.cursor = R.page.history.pop(); loadPage(); } };
  $("dr-close").onclick = closeDrawer;
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDrawer(); });
  document.querySelectorAll(".seg button").forEach((b) => {
    b.onclick = () => {
      document.querySelectorAll(".seg button").forEach((x) => x.classList.toggle("on", x === b));
      if (R.drawer) { R.drawer.stream = b.dataset.stream; R.drawer.offset = null; $("dr-log").textContent = ""; pollLog(); }
    };
  });
  const canvas = $("grid");
  canvas.onmousemove = (e) => {
    const i = cellAt(e);
    const tip = $("grid-tip");
    if (i == null) { tip.hidden = true; return; }
    tip.hidden = false;
    tip.textContent = `#${i} · ${R.legend[+R.cells[i]] || "?"}`;
    const box = canvas.parentElement.getBoundingClientRect();
    tip.style.left = (e.clientX - box.left + 12) + "px";
    tip.style.top = (e.clientY - box.top + 12) + "px";
  };
  canvas.onmouseleave = () => { $("grid-tip").hidden = true; };
  canvas.onclick = (e) => { const i = cellAt(e); if (i != null) openDrawer(String(i)); };
  window.addEventListener("resize", throttle(drawGrid, 200));
}

async function scale(delta) {
  const cur = R.run.jobs || 1;
  const jobs = Math.max(1, cur + delta);
  try {
    await api(`/runs/${R.id}/scale`, { body: { jobs } });
    R.run.jobs = jobs;
    renderHead();
  } catch (e) { toast(e.message); }
}

function renderHead() {
  const r = R.run;
  const st = R.stats || {};
  $("run-title").textContent = r.name || r.id;
  $("run-id").textContent = r.id;
  $("run-started").textContent = when(r.started_at);
  const state = r.state;
  const b = $("run-state");
  b.className = "badge s-" + state;
  b.textContent = state;
  $("stop-run").hidden = state !== "running";
  $("resume-run").hidden = !(state === "stopped" || state === "lost" || state === "failed");
  $("conc").style.visibility = state === "running" ? "visible" : "hidden";
  $("conc-value").textContent = r.jobs ?? "-";
  $("conc-minus").disabled = !r.jobs || r.jobs <= 1;
  const done = st.items_done ?? r.items_done;
  const exact = st.items_total ?? r.items_total;
  const total = exact ?? st.items_total_estimate;
  const approx = exact == null && total != null ? "≈ " : "";
  const counts = (state === "running" && st.counts) || r.counts || st.counts || {};
  const p = total ? pct(done, total) : r.shard_count ? (100 * (counts.done || 0)) / r.shard_count : 0;
  const bar = $("run-bar");
  bar.style.width = (state === "done" ? 100 : p) + "%";
  bar.parentElement.className = "progress big" + (state === "done" ? " done" : state === "failed" ? " failed" : "");
  $("run-items").textContent = total ? `${num(done)} / ${approx}${num(total)}` : done ? num(done) : `${num(counts.done || 0)} / ${num(r.shard_count)} shards`;
  $("run-pct").textContent = p != null ? approx + p.toFixed(1) + "%" + (approx ? " (est.)" : "") : "";
  const live = state === "running";
  $("run-rate").textContent = live ? rate(st.rate, st.unit) : "-";
  $("run-eta").textContent = live ? dur(st.eta_s) : state === "done" ? "done" : "-";
  $("run-eta-at").textContent = live && st.eta_s != null ? "at " + new Date(Date.now() + st.eta_s * 1000).toLocaleTimeString([], { hour12: false }) : "";
  $("run-counts").innerHTML = STATES.filter((s) => counts[s]).map((s) =>
    `<span class="chip" data-state="${s}"><i style="background:${COLORS[s]}"></i>${s} <b>${num(counts[s])}</b></span>`).join("");
  $("run-counts").querySelectorAll(".chip").forEach((c) => {
    c.onclick = () => { $("state-filter").value = c.dataset.state; R.page.cursor = "0"; R.page.history = []; loadPage(); };
  });
  const note = $("run-note");
  if (state === "lost") {
    note.hidden = false;
    note.textContent = "The master of this run died. Shown is its last known state; Resume run finishes it from the checkpoints.";
  } else note.hidden = true;
  drawSpark(live ? st.spark || [] : []);
  renderElapsed();
}
function renderElapsed() {
  const r = R.run;
  if (!r || !r.started_at) return;
  const end = r.ended_at ? new Date(r.ended_at) : r.state === "running" ? new Date() : null;
  $("run-elapsed").textContent = end ? dur((end - new Date(r.started_at)) / 1000) : "";
}
function drawSpark(points) {
  const svg = $("spark");
  if (!points.length) { svg.innerHTML = ""; return; }
  const max = Math.max(...points, 1e-9);
  const w = 180, h = 36, n = points.length;
  const xs = (i) => (n === 1 ? w : (i * w) / (n - 1));
  const ys = (v) => h - 2 - (v / max) * (h - 4);
  const line = points.map((v, i) => `${i ? "L" : "M"}${xs(i).toFixed(1)},${ys(v).toFixed(1)}`).join("");
  svg.innerHTML = `<path class="area" d="${line}L${w},${h}L0,${h}Z"/><path class="line" d="${line}"/>`;
}

const refreshRun = throttle(async () => {
  try {
    const r = await api(`/runs/${encodeURIComponent(R.id)}?shards=0`);
    R.run = { ...R.run, ...r };
    // the header's counts come from whichever snapshot is newest: this one now
    if (R.stats && r.counts) R.stats = { ...R.stats, counts: r.counts };
    renderHead();
  } catch (e) { /* the next event retries */ }
}, 700);
const refreshTable = throttle(() => loadPage(), 1000);
const refreshAttention = throttle(() => loadAttention(), 1500);
const refreshGrid = throttle(() => loadGrid(), 2000);

function onRunEvent(ev) {
  if (ev.run !== R.id && ev.type !== "reset") return;
  if (ev.type === "shard") {
    const i = ev.index;
    if (typeof i === "number" && i < R.cells.length) {
      const code = STATES.indexOf(ev.state);
      if (code >= 0) {
        R.cells = R.cells.slice(0, i) + code + R.cells.slice(i + 1);
        paintCell(i);
      }
    }
    const counts = (R.stats && R.stats.counts) || R.run.counts;
    if (counts && ev.from && counts[ev.from]) {
      counts[ev.from] -= 1;
      counts[ev.state] = (counts[ev.state] || 0) + 1;
    }
    refreshTable();
    if (ev.state === "failed" || ev.state === "backoff" || ev.state === "running") refreshAttention();
    renderHeadSoon();
    if (R.drawer && R.drawer.id === ev.shard) loadDrawer();
  } else if (ev.type === "progress") {
    R.stats = ev;
    renderHeadSoon();
    if (gridCounts() !== JSON.stringify(ev.counts)) refreshGrid();
    refreshTable();
  } else if (ev.type === "run") {
    R.run.state = ev.state;
    if (ev.exit_code !== undefined) R.run.exit_code = ev.exit_code;
    renderHead();
    refreshRun();
    refreshTable();
    refreshAttention();
    refreshGrid();
  } else if (ev.type === "reset") {
    refreshRun(); refreshGrid(); refreshTable(); refreshAttention();
  }
}
let headQueued = false;
function renderHeadSoon() {
  if (headQueued) return;
  headQueued = true;
  requestAnimationFrame(() => { headQueued = false; renderHead(); });
}
function gridCounts() {
  const c = {};
  for (const ch of R.cells) { const s = R.legend[+ch]; c[s] = (c[s] || 0) + 1; }
  const out = {};
  for (const s of STATES) if (c[s]) out[s] = c[s];
  return JSON.stringify(out);
}

async function loadStats() {
  try { const s = await api(`/runs/${R.id}/stats`); if (s && s.counts) { R.stats = s; renderHead(); } } catch (e) { /* optional */ }
}

// --- grid (canvas: one cell per shard, readable at 10,000) -------------------------------
const G = { size: 10, gap: 2, cols: 1 };
async function loadGrid() {
  try {
    const g = await api(`/runs/${R.id}/grid`);
    R.cells = g.cells;
    R.legend = g.legend;
  } catch (e) { return; }
  drawGrid();
}
function layout(n, width) {
  for (const size of [26, 20, 16, 12, 10, 8, 6, 5, 4, 3]) {
    const gap = size >= 8 ? 3 : 1;
    const cols = Math.max(1, Math.floor((width + gap) / (size + gap)));
    const rows = Math.ceil(n / cols);
    if (rows * (size + gap) <= (size >= 16 ? 260 : 440) || size === 3) return { size, gap, cols, rows };
  }
  return { size: 3, gap: 1, cols: 1, rows: n };
}
function drawGrid() {
  const canvas = $("grid");
  const width = canvas.parentElement.clientWidth - 32;
  const n = R.cells.length;
  const l = layout(n, width);
  Object.assign(G, l);
  const dpr = window.devicePixelRatio || 1;
  const h = Math.max(1, l.rows * (l.size + l.gap));
  canvas.style.height = h + "px";
  canvas.style.width = width + "px";
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(h * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, h);
  for (let i = 0; i < n; i++) paintCell(i, ctx);
  $("grid-info").textContent = `${num(n)} shards`;
}
function paintCell(i, ctx) {
  ctx = ctx || $("grid").getContext("2d");
  const x = (i % G.cols) * (G.size + G.gap), y = Math.floor(i / G.cols) * (G.size + G.gap);
  ctx.fillStyle = COLORS[R.legend[+R.cells[i]]] || "#333";
  ctx.clearRect(x, y, G.size, G.size);
  if (G.size >= 10 && ctx.roundRect) {
    ctx.beginPath();
    ctx.roundRect(x, y, G.size, G.size, 3);
    ctx.fill();
  } else ctx.fillRect(x, y, G.size, G.size);
}
function cellAt(e) {
  const r = $("grid").getBoundingClientRect();
  const x = e.clientX - r.left, y = e.clientY - r.top;
  const col = Math.floor(x / (G.size + G.gap)), row = Math.floor(y / (G.size + G.gap));
  if (col < 0 || col >= G.cols) return null;
  const i = row * G.cols + col;
  return i >= 0 && i < R.cells.length ? i : null;
}

// --- table -------------------------------------------------------------------------------
async function loadPage() {
  const q = new URLSearchParams({ cursor: R.page.cursor, limit: R.page.limit, sort: $("sort").value });
  const f = $("state-filter").value;
  if (f) q.set("state", f);
  let page;
  try { page = await api(`/runs/${R.id}/shards?${q}`); } catch (e) { toast(e.message); return; }
  R.page.next = page.next_cursor;
  R.page.total = page.total;
  const start = +page.cursor;
  $("page-info").textContent = page.total ? `${num(start + 1)}–${num(start + page.shards.length)} of ${num(page.total)}` : "none";
  $("prev").disabled = !R.page.history.length;
  $("next").disabled = !page.next_cursor;
  const live = R.run.state === "running";
  const nodes = page.shards.some((s) => s.node);  // Ray runs: where each shard runs
  $("node-th").hidden = !nodes;
  document.querySelector("#shards-table tbody").innerHTML = page.shards.map((s) => `
    <tr class="clickable" data-shard="${esc(s.id)}">
      <td class="mono">${esc(s.id)}</td>
      <td>${badge(s.state)}</td>
      ${nodes ? `<td class="mono muted" title="${esc(s.node || "")}">${esc(s.node ? s.node.slice(0, 12) : "-")}</td>` : ""}
      <td>${progressCell(s.done, s.total, s.state)}</td>
      <td class="num">${s.rate != null ? rate(s.rate) : "-"}</td>
      <td class="num">${s.eta_s != null ? dur(s.eta_s) : "-"}</td>
      <td class="num">${num(s.attempts)}</td>
      <td class="reason">${esc(s.state === "running" || s.state === "pending" ? s.message || "" : s.reason || "")}</td>
      <td class="num">${s.heartbeat_age_s != null ? dur(s.heartbeat_age_s) + " ago" : "-"}</td>
      <td class="num">${bytes(s.rss_bytes)}</td>
      <td class="mono muted" title="${esc(JSON.stringify(s.checkpoint))}">${s.checkpoint != null ? esc(JSON.stringify(s.checkpoint).slice(0, 24)) : "-"}</td>
      <td><button class="btn small" data-restart="${esc(s.id)}" ${live ? "" : "disabled"}>Restart</button></td>
    </tr>`).join("");
  document.querySelectorAll("#shards-table tbody tr").forEach((tr) => {
    tr.onclick = (e) => {
      const b = e.target.closest("button[data-restart]");
      if (b) { e.stopPropagation(); act(`/runs/${R.id}/shards/${encodeURIComponent(b.dataset.restart)}/restart`, {}, `restarting ${b.dataset.restart}`); return; }
      openDrawer(tr.dataset.shard);
    };
  });
}

// --- needs attention -----------------------------------------------------------------------
async function loadAttention() {
  let a;
  try { a = await api(`/runs/${R.id}/attention`); } catch (e) { return; }
  $("att-count").textContent = a.shards.length ? String(a.shards.length) : "";
  $("attention").innerHTML = a.shards.length ? a.shards.map((s) => `
    <div class="att s-${esc(s.state)}" data-shard="${esc(s.id)}">
      <div class="t"><b class="mono">${esc(s.id)}</b>${badge(s.state)}<span class="muted">attempt ${num(s.attempts)}</span></div>
      <div class="r">${esc(s.reason || "")}</div>
      ${s.stderr_tail ? `<pre>${esc(s.stderr_tail.split("\n").slice(-6).join("\n"))}</pre>` : ""}
    </div>`).join("") : `<p class="empty">Nothing failing, hung or stalled.</p>`;
  document.querySelectorAll("#attention .att").forEach((d) => { d.onclick = () => openDrawer(d.dataset.shard); });
}

// --- drawer --------------------------------------------------------------------------------
function openDrawer(key) {
  const stream = document.querySelector(".seg button.on").dataset.stream;
  R.drawer = { key, id: null, stream, offset: null, timer: null };
  $("dr-log").textContent = "";
  $("drawer").hidden = false;
  loadDrawer();
  pollLog();
}
function closeDrawer() {
  if (R.drawer && R.drawer.timer) clearTimeout(R.drawer.timer);
  R.drawer = null;
  $("drawer").hidden = true;
}
async function loadDrawer() {
  const d = R.drawer;
  if (!d) return;
  let s;
  try { s = await api(`/runs/${R.id}/shards/${encodeURIComponent(d.key)}`); } catch (e) { toast(e.message); return; }
  d.id = s.id;
  $("dr-title").textContent = s.id;
  $("dr-state").className = "badge s-" + s.state;
  $("dr-state").textContent = s.state;
  const live = R.run.state === "running";
  $("dr-restart").disabled = !live;
  $("dr-stop").disabled = !live || !["running", "pending", "backoff"].includes(s.state);
  $("dr-restart").onclick = () => act(`/runs/${R.id}/shards/${encodeURIComponent(s.id)}/restart`, {}, `restarting ${s.id}`);
  $("dr-stop").onclick = () => act(`/runs/${R.id}/shards/${encodeURIComponent(s.id)}/stop`, {}, `stopping ${s.id}`);
  const facts = [
    ["index", s.index], ["progress", s.done == null ? "-" : `${num(s.done)}${s.total ? " / " + num(s.total) : ""}`],
    ["rate", rate(s.rate)], ["ETA", dur(s.eta_s)], ["pid", s.pid ?? "-"],
    ["heartbeat", s.heartbeat_age_s != null ? dur(s.heartbeat_age_s) + " ago" : "-"],
    ["memory", bytes(s.rss_bytes)], ["cpu", s.cpu_percent != null ? s.cpu_percent.toFixed(0) + "%" : "-"],
    ["reason", s.reason || "-"], ["message", s.message || "-"],
    ["checkpoint", s.checkpoint != null ? JSON.stringify(s.checkpoint) : "-"],
  ];
  $("dr-facts").innerHTML = facts.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("");
  document.querySelector("#dr-attempts tbody").innerHTML = (s.attempt_list || []).map((a) => `
    <tr><td>${a.attempt}</td><td class="mono">${a.pid ?? "-"}</td><td>${esc(when(a.started_at))}</td><td>${esc(when(a.ended_at))}</td>
    <td>${a.exit_code ?? (a.signal ? "sig " + a.signal : "-")}</td><td class="reason">${esc(a.reason || (a.ended_at ? "" : "running"))}</td></tr>`).join("");
}
async function pollLog() {
  const d = R.drawer;
  if (!d) return;
  if (d.timer) clearTimeout(d.timer);
  const q = new URLSearchParams({ stream: d.stream, limit: 65536 });
  if (d.offset != null) q.set("offset", d.offset);
  try {
    const r = await api(`/runs/${R.id}/shards/${encodeURIComponent(d.key)}/logs?${q}`);
    if (R.drawer !== d) return;
    const pre = $("dr-log");
    if (d.offset != null && r.offset < d.offset) pre.textContent = ""; // rotated
    if (r.data) {
      pre.textContent += r.data;
      if (pre.textContent.length > 400000) pre.textContent = pre.textContent.slice(-300000);
      if ($("dr-follow").checked) pre.scrollTop = pre.scrollHeight;
    }
    d.offset = r.next_offset;
  } catch (e) { /* shown by the next try */ }
  if (R.drawer === d) d.timer = setTimeout(pollLog, 1000);
}

// --- route -----------------------------------------------------------------------------------
const m = location.pathname.match(/^\/runs\/([^/]+)\/?$/);
if (m) showRun(decodeURIComponent(m[1]));
else showRuns();
