// The status page: reads status/data.json every 2 s and renders it. No framework, no
// external assets; every value is set as text (never parsed as HTML).
"use strict";

const REFRESH_MS = 2000;
const MAX_VALUES = 12;
let lastUpdate = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 1) return "now";
  if (seconds < 120) return Math.round(seconds) + " s ago";
  if (seconds < 7200) return Math.round(seconds / 60) + " min ago";
  return Math.round(seconds / 3600) + " h ago";
}

function duration(seconds) {
  if (!seconds) return "0 s";
  if (seconds < 120) return seconds.toFixed(1) + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function bytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1 << 20) return (n / 1024).toFixed(1) + " KiB";
  return (n / (1 << 20)).toFixed(1) + " MiB";
}

function value(v) {
  if (v === null) return "null";
  if (typeof v === "number" && !Number.isInteger(v)) return String(Math.round(v * 1000) / 1000);
  return String(v);
}

function badge(text, cls) {
  return el("span", { class: "badge " + cls }, text);
}

function replaceRows(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}

function renderDevices(devices) {
  document.getElementById("device-count").textContent = "(" + devices.length + ")";
  replaceRows("#devices", devices.map((d) => {
    const values = el("td", { class: "values" });
    for (const p of d.lastValues.slice(0, MAX_VALUES)) {
      values.append(el("span", { "data-point": p.name }, p.name + "=" + value(p.value) + (p.unit ? " " + p.unit : "")));
    }
    if (d.lastValues.length > MAX_VALUES) values.append(el("span", { class: "muted" }, "+" + (d.lastValues.length - MAX_VALUES) + " more"));
    const error = d.lastError ? d.lastError.kind + ", " + age((Date.now() - Date.parse(d.lastError.at)) / 1000) : "none";
    return el("tr", { "data-device": d.name, "data-state": d.state },
      el("td", {}, d.name),
      el("td", {}, d.protocol),
      el("td", {}, badge(d.state, d.state)),
      el("td", {}, age(d.lastReadingAgeSeconds)),
      el("td", { class: "num" }, d.readings),
      el("td", { class: d.lastError ? "warn" : "muted" }, error),
      values);
  }));
}

function renderUplinks(uplinks) {
  replaceRows("#uplinks", uplinks.map((u) => el("tr", { "data-uplink": u.name, "data-connected": String(u.connected) },
    el("td", {}, u.name + (u.kind === "http" ? " (HTTP)" : " (MQTT " + (u.protocolVersion === 3 ? "3.1.1" : "5") + ")")),
    el("td", {}, u.connected ? badge("connected", "connected") : badge("disconnected", "disconnected")),
    el("td", { class: "num" }, u.backlogMessages + " readings, " + bytes(u.backlogBytes)),
    el("td", { class: "num" }, duration(u.oldestUnsentAgeSeconds)),
    el("td", { class: "num" }, u.accepted),
    el("td", { class: "num" }, u.delivered),
    el("td", { class: "num" }, u.redeliveries),
    el("td", {}, u.bufferReachable === false ? badge("not answering", "down") : "ok"))));
}

function renderDrops(status) {
  const rows = [];
  for (const u of status.uplinks) {
    for (const [reason, n] of Object.entries(u.dropped)) {
      rows.push(el("tr", { "data-drop": u.name + " " + reason }, el("td", {}, u.name), el("td", {}, reason), el("td", { class: "num" }, n)));
    }
  }
  if (status.unroutedReadings > 0) {
    rows.push(el("tr", { "data-drop": "none no_uplink" }, el("td", {}, "(none)"), el("td", {}, "no_uplink"), el("td", { class: "num" }, status.unroutedReadings)));
  }
  replaceRows("#drops", rows);
  document.getElementById("drops").hidden = rows.length === 0;
  document.getElementById("no-drops").hidden = rows.length > 0;
}

function render(status) {
  document.getElementById("node").textContent = "· node " + status.node;
  document.title = "Fieldgate · " + status.node;
  const ready = document.getElementById("ready");
  ready.textContent = status.ready ? "ready" : "not ready";
  ready.className = "badge " + (status.ready ? "ready" : "not-ready");
  const reasons = document.getElementById("not-ready");
  reasons.hidden = status.ready;
  reasons.textContent = status.notReady.join("; ");
  document.getElementById("config-version").textContent = status.config.version || "(no version)";
  const buffer = status.buffer.connected;
  document.getElementById("buffer").textContent = buffer === null ? "-" : buffer ? "NATS connected" : "NATS down";
  renderDevices(status.devices);
  renderUplinks(status.uplinks);
  renderDrops(status);
}

async function refresh() {
  const fresh = document.getElementById("freshness");
  try {
    const response = await fetch("status/data.json", { cache: "no-store", credentials: "same-origin" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    render(await response.json());
    lastUpdate = new Date();
    fresh.className = "muted";
    fresh.textContent = "updated " + lastUpdate.toLocaleTimeString();
    document.body.dataset.updated = lastUpdate.toISOString();
  } catch (e) {
    fresh.className = "stale";
    fresh.textContent = "no answer from the gateway (" + e.message + ")" + (lastUpdate ? "; showing " + lastUpdate.toLocaleTimeString() : "");
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
