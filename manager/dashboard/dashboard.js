// The Ferry dashboard: fleet, device and rollout pages over the manager's
// JSON API, refreshed when /v1/stream says something changed. Plain
// JavaScript, served by the manager; nothing is fetched from elsewhere.
"use strict";

const TOKEN_KEY = "ferry-operator-token";
const app = document.getElementById("app");
const liveBadge = document.getElementById("live");

// A token passed as #token=... is kept (in this browser) and removed from the address.
if (location.hash.startsWith("#token=")) {
  localStorage.setItem(TOKEN_KEY, decodeURIComponent(location.hash.slice(7)));
  history.replaceState(null, "", location.pathname + "#/");
}
const token = () => localStorage.getItem(TOKEN_KEY) || "";

async function api(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json" },
  });
  const body = await response.json().catch(() => null);
  if (response.status === 401) {
    localStorage.removeItem(TOKEN_KEY);
    showLogin((body && body.error) || "the token was refused");
    throw new Error("unauthorised");
  }
  if (!response.ok) throw new Error((body && body.error) || response.statusText);
  return body;
}

// Builds an element: el("td", {class: "x"}, "text", child...). Text is never parsed as HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const badge = (text) => el("span", { class: "badge " + text }, text.replace("_", " "));
const link = (href, text) => el("a", { href }, text);
const card = (label, value, id) => el("div", { class: "card", id }, el("div", { class: "n" }, value), el("div", { class: "l" }, label));
const table = (head, rows) =>
  el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows));
const pct = (x) => (x === null || x === undefined ? "–" : Math.round(x) + "%");
const bytes = (n) => {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
};
const ago = (time) => {
  if (!time) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(time)) / 1000));
  return s < 60 ? s + " s ago" : s < 3600 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
};
const services = (device) => (device.reported && device.reported.services) || [];
const unhealthy = (device) =>
  ((device.health && device.health.services) || []).filter((s) => s.state !== "active");

function bar(counts) {
  const total = Math.max(counts.devices, 1);
  const part = (cls, n) => (n ? el("span", { class: cls, style: `width:${(100 * n) / total}%` }) : null);
  return el("div", { class: "bar", title: `${counts.installed}/${counts.devices} installed` },
    part("installed", counts.installed), part("failed", counts.failed),
    part("reverted", counts.reverted || 0), part("in_flight", counts.in_flight));
}

// ---- pages ----

async function fleetPage() {
  const [devices, rollouts] = await Promise.all([api("/v1/devices"), api("/v1/rollouts")]);
  const online = devices.filter((d) => d.online).length;
  const sick = devices.filter((d) => unhealthy(d).length > 0);
  const versions = {};
  for (const d of devices) for (const s of services(d)) {
    const key = s.service + " " + s.version;
    versions[key] = (versions[key] || 0) + 1;
  }
  return [
    el("h1", {}, "Fleet"),
    el("div", { class: "cards" },
      card("devices", devices.length, "devices-total"), card("online", online, "devices-online"),
      card("offline", devices.length - online, "devices-offline"), card("unhealthy", sick.length, "devices-unhealthy"),
      card("rollouts running", rollouts.filter((r) => r.state === "running").length)),
    el("h2", {}, "Versions"),
    Object.keys(versions).length
      ? table(["service and version", "devices"], Object.entries(versions).sort().map(([k, n]) => el("tr", {}, el("td", {}, k), el("td", {}, n))))
      : el("p", { class: "muted" }, "No service installed yet."),
    el("h2", {}, "Devices"),
    table(["device", "tags", "services", "CPU", "memory used", "disk free", "last seen"],
      devices.map((d) => {
        const h = d.health || {};
        const mem = h.memory ? 100 * (1 - h.memory.available_bytes / h.memory.total_bytes) : null;
        return el("tr", { "data-device": d.device_id },
          el("td", {}, el("span", { class: "dot" + (d.online ? " on" : "") }), link("#/device/" + encodeURIComponent(d.device_id), d.device_id)),
          el("td", {}, d.tags.join(", ")),
          el("td", {}, services(d).map((s) => s.service + " " + s.version).join(", ") || "–",
            unhealthy(d).map((s) => [" ", badge(s.state)])),
          el("td", {}, pct(h.cpu && h.cpu.usage_percent)), el("td", {}, pct(mem)),
          el("td", {}, bytes(h.disk && h.disk.free_bytes)), el("td", {}, ago(d.last_seen)));
      })),
    el("h2", {}, "Rollouts"),
    rolloutTable(rollouts.slice(0, 10)),
  ];
}

function rolloutTable(rollouts) {
  if (!rollouts.length) return el("p", { class: "muted" }, "No rollouts yet: ferry rollout start SERVICE VERSION …");
  return table(["rollout", "release", "state", "progress", "devices"],
    rollouts.map((r) => el("tr", { "data-rollout": r.id },
      el("td", {}, link("#/rollout/" + r.id, "#" + r.id)), el("td", {}, r.service + " " + r.version),
      el("td", {}, badge(r.state)), el("td", {}, bar(r.counts)),
      el("td", {}, `${r.counts.installed}/${r.counts.devices} installed, ${r.counts.failed} failed`))));
}

async function rolloutsPage() {
  return [el("h1", {}, "Rollouts"), rolloutTable(await api("/v1/rollouts"))];
}

async function rolloutPage(id) {
  const r = await api("/v1/rollouts/" + id);
  const open = r.state === "running" || r.state === "paused";
  const act = async (action) => {
    if (action === "abort" && !confirm(`Abort rollout #${id}? No more devices will get ${r.service} ${r.version}.`)) return;
    try { await api(`/v1/rollouts/${id}/${action}`, { method: "POST", body: "{}" }); render(); }
    catch (e) { app.prepend(el("div", { class: "error" }, e.message)); }
  };
  const plan = r.plan;
  return [
    el("h1", {}, `Rollout #${r.id}: ${r.service} ${r.version} `, el("span", { id: "rollout-state" }, badge(r.state))),
    r.reason ? el("p", { class: "muted", id: "rollout-reason" }, r.reason) : null,
    el("p", { class: "muted" },
      `canary ${plan.canary}, waves ${plan.waves.join("%, ")}%, max in flight ${plan.max_in_flight ?? "∞"}, ` +
      `device timeout ${plan.device_timeout_secs} s, max failures ${plan.max_failures}` +
      (plan.revert_to ? `, reverts to ${plan.revert_to}` : "")),
    el("div", { class: "actions" },
      el("button", { id: "pause", disabled: r.state !== "running", onclick: () => act("pause") }, "Pause"),
      el("button", { id: "resume", disabled: r.state !== "paused", onclick: () => act("resume") }, "Resume"),
      el("button", { id: "abort", class: "danger", disabled: !open, onclick: () => act("abort") }, "Abort")),
    el("h2", {}, "Stages"),
    r.stages.map((s) => el("div", { class: "stage" }, el("strong", {}, s.name), bar(s.counts),
      el("span", { class: "muted" }, `${s.counts.installed}/${s.counts.devices} installed, ${s.counts.failed} failed, ${s.counts.in_flight} installing, ${s.counts.pending} waiting`))),
    el("h2", {}, "Devices"),
    table(["#", "device", "step", "why", "sent"],
      r.devices.map((d) => el("tr", {},
        el("td", {}, d.position + 1), el("td", {}, link("#/device/" + encodeURIComponent(d.device_id), d.device_id)),
        el("td", {}, badge(d.status)), el("td", {}, d.reason || ""), el("td", {}, d.sent_at ? ago(d.sent_at) : "–")))),
  ];
}

function chart(series) {
  // series: [{name, color, points: [0..100]}]; newest on the right.
  const w = 600, h = 140, svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "chart");
  for (const s of series) {
    if (s.points.length < 2) continue;
    const step = w / (s.points.length - 1);
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", s.points.map((v, i) => `${i * step},${h - (h * Math.min(100, Math.max(0, v))) / 100}`).join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", s.color);
    line.setAttribute("stroke-width", "2");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  }
  return el("div", {}, svg, el("div", { class: "legend" }, series.map((s) => el("span", { style: `color:${s.color}` }, "■ " + s.name))));
}

async function devicePage(id) {
  const enc = encodeURIComponent(id);
  const [d, health, events] = await Promise.all([
    api("/v1/devices/" + enc), api("/v1/health?device=" + enc), api("/v1/events?device=" + enc)]);
  const reports = health.map((row) => row.message);
  const h = d.health || {};
  return [
    el("h1", {}, el("span", { class: "dot" + (d.online ? " on" : "") }), d.device_id, " ",
      el("span", { class: "muted" }, d.online ? "online" : "offline", d.tags.length ? " · " + d.tags.join(", ") : "")),
    el("div", { class: "cards" },
      card("CPU", pct(h.cpu && h.cpu.usage_percent)),
      card("memory", h.memory ? bytes(h.memory.total_bytes - h.memory.available_bytes) + " / " + bytes(h.memory.total_bytes) : "–"),
      card("disk free", bytes(h.disk && h.disk.free_bytes)),
      card("temperature", h.temperature_celsius == null ? "–" : h.temperature_celsius.toFixed(1) + " °C"),
      card("agent", h.agent_version || "–")),
    el("h2", {}, "Health over time"),
    chart([
      { name: "CPU %", color: "#2f6fdf", points: reports.map((r) => r.cpu.usage_percent) },
      { name: "memory used %", color: "#e0a100", points: reports.map((r) => 100 * (1 - r.memory.available_bytes / r.memory.total_bytes)) },
      { name: "disk used %", color: "#8a63d2", points: reports.map((r) => 100 * (1 - r.disk.free_bytes / r.disk.total_bytes)) },
    ]),
    el("h2", {}, "Services"),
    table(["service", "version", "state", "restarts", "memory"],
      (h.services || []).map((s) => el("tr", {}, el("td", {}, s.service), el("td", {}, s.version || "–"),
        el("td", {}, badge(s.state)), el("td", {}, s.restarts), el("td", {}, bytes(s.rss_bytes))))),
    el("h2", {}, "Events"),
    table(["when", "release", "step", "status", "detail"],
      events.slice().reverse().slice(0, 50).map((row) => {
        const e = row.message;
        return el("tr", {}, el("td", {}, ago(e.time)),
          el("td", {}, e.release ? e.release.service + " " + e.release.version : "–"),
          el("td", {}, e.step), el("td", {}, badge(e.status)), el("td", {}, e.reason || ""));
      })),
  ];
}

// ---- routing and live updates ----

function showLogin(problem) {
  app.replaceChildren(el("div", { class: "login card" },
    el("h1", {}, "Operator token"),
    el("p", { class: "muted" }, "Paste the token from the manager's data directory (operator.token). It stays in this browser."),
    problem ? el("div", { class: "error" }, problem) : null,
    el("form", { onsubmit: (e) => { e.preventDefault(); localStorage.setItem(TOKEN_KEY, e.target.token.value.trim()); start(); } },
      el("input", { name: "token", type: "password", autocomplete: "off", placeholder: "token" }),
      el("button", { type: "submit" }, "Open the dashboard"))));
}

let rendering = false, again = false;
async function render() {
  if (rendering) { again = true; return; }
  rendering = true;
  try {
    const [, page, id] = location.hash.match(/^#\/(\w*)\/?(.*)$/) || [];
    const view = page === "device" ? devicePage(decodeURIComponent(id))
      : page === "rollout" ? rolloutPage(id)
      : page === "rollouts" ? rolloutsPage() : fleetPage();
    const nodes = await view;
    app.replaceChildren(...[nodes].flat(2).filter(Boolean));
  } catch (e) {
    if (e.message !== "unauthorised") app.replaceChildren(el("div", { class: "error" }, e.message));
  } finally {
    rendering = false;
    if (again) { again = false; render(); }
  }
}

// Reads /v1/stream (server-sent events) and re-renders on each change.
async function live() {
  for (let delay = 1000; ; delay = Math.min(delay * 2, 15000)) {
    try {
      const response = await fetch("/v1/stream", { headers: { Authorization: "Bearer " + token() } });
      if (!response.ok) throw new Error(response.statusText);
      liveBadge.textContent = "live"; liveBadge.className = "live on"; delay = 1000;
      const reader = response.body.getReader(), decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, end); buffer = buffer.slice(end + 2);
          if (message.split("\n").includes("event: change")) render();
        }
      }
    } catch (e) { /* reconnect below */ }
    liveBadge.textContent = "reconnecting"; liveBadge.className = "live off";
    await new Promise((r) => setTimeout(r, delay));
  }
}

let started = false;
function start() {
  if (!token()) return showLogin();
  render();
  if (!started) { started = true; live(); }
}
window.addEventListener("hashchange", render);
start();
