"use strict";
// The status page: reads the monitor's own API (/metrics, /devices, /groups, /instances)
// and follows /events. Nothing is loaded from elsewhere; every text from the fleet is set
// with textContent, never as HTML.
(() => {
  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem("presenced-token") || "",
    counts: { online: null, offline: null, flapping: null },
    trend: [],
    lagSamples: [],
    offline: new Map(),
    flapping: new Map(),
    seqs: new Map(),
    stream: null,
    deviceStream: null,
    device: null,
    errors: [],
  };
  // What a test (or a curious operator) can read: failed requests and script errors.
  window.presenced = { errors: state.errors };
  window.addEventListener("error", (e) => state.errors.push(String(e.message)));
  window.addEventListener("unhandledrejection", (e) => {
    if (!(e.reason instanceof NeedsToken)) state.errors.push(String(e.reason));
  });

  class NeedsToken extends Error {}

  function problem(text) {
    const p = $("problem");
    p.hidden = !text;
    p.textContent = text || "";
  }

  async function api(path) {
    const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
    let r;
    try {
      r = await fetch(path, { headers, cache: "no-store" });
    } catch (e) {
      problem("The monitor does not answer (" + path + ").");
      throw e;
    }
    if (r.status === 401) {
      askToken();
      throw new NeedsToken(path);
    }
    if (!r.ok) {
      const why = await r.text();
      problem(path + ": " + r.status + " " + why);
      throw new Error(path + ": " + r.status);
    }
    problem("");
    return r;
  }
  const json = async (path) => (await api(path)).json();

  // --- the token --------------------------------------------------------------------------
  function askToken() {
    const d = $("token-dialog");
    if (!d.open) d.showModal();
  }
  $("token-open").addEventListener("click", askToken);
  $("token-form").addEventListener("submit", () => {
    state.token = $("token").value.trim();
    sessionStorage.setItem("presenced-token", state.token);
    start();
  });

  // --- theme ------------------------------------------------------------------------------
  const saved = localStorage.getItem("presenced-theme");
  if (saved) document.documentElement.dataset.theme = saved;
  $("theme").addEventListener("click", () => {
    const dark = getComputedStyle(document.documentElement).getPropertyValue("--bg").trim() === "#111315";
    const next = dark ? "light" : "dark";
    document.documentElement.dataset.theme = next;
    localStorage.setItem("presenced-theme", next);
    drawTrend();
  });

  // --- fleet counts, trend and lag (from /metrics) -----------------------------------------
  function parseMetrics(text) {
    const m = { buckets: [], count: 0 };
    for (const line of text.split("\n")) {
      if (line.startsWith("#")) continue;
      const sp = line.lastIndexOf(" ");
      const name = line.slice(0, sp), v = Number(line.slice(sp + 1));
      if (name === 'presenced_devices{state="online"}') m.online = v;
      else if (name === 'presenced_devices{state="offline"}') m.offline = v;
      else if (name === "presenced_devices_flapping") m.flapping = v;
      else if (name === "presenced_notification_lag_seconds_count") m.count = v;
      else if (name.startsWith("presenced_notification_lag_seconds_bucket{")) {
        const le = name.match(/le="([^"]+)"/)[1];
        m.buckets.push([le === "+Inf" ? Infinity : Number(le), v]);
      }
    }
    return m;
  }
  // A quantile of a cumulative histogram, interpolated inside its bucket.
  function quantile(buckets, count, q) {
    if (!count) return null;
    const rank = q * count;
    let lo = 0, below = 0;
    for (const [le, cum] of buckets) {
      if (cum >= rank) {
        if (le === Infinity) return lo;
        const inBucket = cum - below;
        return inBucket ? lo + (le - lo) * ((rank - below) / inBucket) : le;
      }
      lo = le; below = cum;
    }
    return lo;
  }
  const fmtLag = (s) => s === null ? "–" : s < 1 ? Math.round(s * 1000) + " ms" : s.toFixed(2) + " s";

  function showCounts() {
    for (const k of ["online", "offline", "flapping"]) {
      const v = state.counts[k];
      $("n-" + k).textContent = v === null ? "–" : v.toLocaleString();
    }
  }

  async function refreshMetrics() {
    const m = parseMetrics(await (await api("/metrics")).text());
    state.counts = { online: m.online ?? 0, offline: m.offline ?? 0, flapping: m.flapping ?? 0 };
    showCounts();
    const now = Date.now();
    state.trend.push([now, state.counts.online, state.counts.offline]);
    state.trend = state.trend.filter(([t]) => t > now - 600000);
    drawTrend();
    // The lag over the last 5 minutes, from the difference of two scrapes; since the start
    // of this replica until there is such a pair.
    state.lagSamples.push([now, m]);
    state.lagSamples = state.lagSamples.filter(([t]) => t > now - 300000);
    const [, first] = state.lagSamples[0];
    let buckets = m.buckets, count = m.count, note = "since this replica started";
    if (first !== m && m.count > first.count) {
      buckets = m.buckets.map(([le, c], i) => [le, c - (first.buckets[i] ? first.buckets[i][1] : 0)]);
      count = m.count - first.count;
      note = "last " + Math.max(1, Math.round((now - state.lagSamples[0][0]) / 60000)) + " min";
    }
    $("lag").textContent = fmtLag(quantile(buckets, count, 0.5)) + " / " + fmtLag(quantile(buckets, count, 0.99));
    $("lag-note").textContent = count ? note + ", " + count + " offline transitions" : "no offline transition yet";
  }

  function drawTrend() {
    const svg = $("trend");
    const pts = state.trend;
    svg.replaceChildren();
    if (pts.length < 2) return;
    const t0 = pts[0][0], t1 = pts[pts.length - 1][0];
    const max = Math.max(1, ...pts.map(([, a, b]) => Math.max(a, b)));
    const css = getComputedStyle(document.documentElement);
    for (const [i, color] of [[1, "--ok"], [2, "--bad"]]) {
      const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", css.getPropertyValue(color).trim());
      line.setAttribute("stroke-width", "2");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      line.setAttribute("points", pts.map((p) =>
        ((p[0] - t0) / Math.max(1, t1 - t0) * 300).toFixed(1) + "," + (58 - p[i] / max * 56).toFixed(1)).join(" "));
      svg.append(line);
    }
  }

  // --- groups -----------------------------------------------------------------------------
  async function refreshGroups() {
    const page = await json("/groups?limit=1000");
    const groups = page.groups.slice();
    const ratio = (g) => g.devices ? g.online / g.devices : 1;
    groups.sort((a, b) => (b.state === "outage") - (a.state === "outage") || ratio(a) - ratio(b) || (a.group < b.group ? -1 : 1));
    const body = $("groups").tBodies[0];
    body.replaceChildren(...groups.slice(0, 50).map((g) => {
      const tr = document.createElement("tr");
      tr.className = g.state;
      tr.dataset.group = g.group;
      const cells = [g.group, g.state === "outage" ? "OUTAGE (" + g.affected + " affected)" : "ok", g.online, g.offline, g.since ? new Date(g.since).toLocaleTimeString() : "–"];
      for (const c of cells) {
        const td = document.createElement("td");
        td.textContent = String(c);
        tr.append(td);
      }
      return tr;
    }));
    $("groups-empty").hidden = groups.length > 0;
    const outages = groups.filter((g) => g.state === "outage").length;
    $("groups-note").textContent = groups.length
      ? outages + " in outage of " + groups.length + (page.next_cursor ? " (the first 1,000 groups by name)" : "") : "";
  }

  // --- devices ----------------------------------------------------------------------------
  function deviceItem(rec) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.device = rec.device;
    const name = document.createElement("span");
    name.textContent = rec.device + " ";
    const st = document.createElement("span");
    st.className = "state-" + rec.state;
    st.textContent = rec.state + (rec.flapping ? " · flapping" : "");
    b.append(name, st);
    b.addEventListener("click", () => showDevice(rec.device));
    li.append(b);
    return li;
  }
  // Lists are redrawn at most once a frame, from maps of at most 1,000 devices: a mass
  // expiry's thousands of events must not freeze the page when it is needed most.
  const LIST_CAP = 1000;
  const dirty = new Set();
  function renderList(id) {
    if (dirty.size === 0) requestAnimationFrame(drawLists);
    dirty.add(id);
  }
  function drawLists() {
    for (const id of dirty) {
      const map = state[id];
      const recs = [...map.values()].sort((a, b) => (a.device < b.device ? -1 : 1)).slice(0, 200);
      $(id).replaceChildren(...recs.map(deviceItem));
    }
    dirty.clear();
  }
  function keep(map, rec) {
    map.delete(rec.device);
    if (map.size >= LIST_CAP) map.delete(map.keys().next().value);
    map.set(rec.device, rec);
  }
  async function refreshLists() {
    const [off, flap] = await Promise.all([
      json("/devices?state=offline&limit=200"),
      json("/devices?flapping=true&limit=200"),
    ]);
    state.offline = new Map(off.devices.map((d) => [d.device, d]));
    state.flapping = new Map(flap.devices.map((d) => [d.device, d]));
    renderList("offline");
    renderList("flapping");
    $("offline-more").textContent = off.next_cursor ? "(first 200)" : "";
  }

  const hex = (s) => [...new TextEncoder().encode(s)].map((b) => b.toString(16).padStart(2, "0")).join("");
  // Where a listing must start (it lists the ids after its cursor, in id order) to begin
  // with the ids that start with `prefix`: the prefix with its last character one lower and
  // the highest character after it; "" to start at the beginning.
  function searchCursor(prefix) {
    const chars = [...prefix];
    const last = chars.pop().codePointAt(0);
    const lower = last - 1;
    const shorter = chars.length ? hex(chars.join("")) : "";
    // Fall back to the prefix without its last character where the step down is no id
    // character (control, surrogate) or the cursor would pass 128 bytes.
    if (lower <= 0x20 || (lower >= 0x7f && lower <= 0x9f) || (lower >= 0xd800 && lower <= 0xdfff)) return shorter;
    const cursor = chars.join("") + String.fromCodePoint(lower) + "\u{10FFFF}";
    return new TextEncoder().encode(cursor).length > 128 ? shorter : hex(cursor);
  }
  async function search(prefix) {
    const found = new Map();
    let cursor = searchCursor(prefix);
    for (let pages = 0; pages < 10 && found.size < 50; pages++) {
      const page = await json("/devices?limit=100" + (cursor ? "&cursor=" + cursor : ""));
      let past = false;
      for (const d of page.devices) {
        if (d.device.startsWith(prefix)) found.set(d.device, d);
        else if (d.device > prefix) { past = true; break; }
      }
      cursor = page.next_cursor;
      if (past || !cursor) break;
    }
    problem("");
    $("results-h").hidden = $("results").hidden = false;
    $("results-h").textContent = found.size ? "Matches for “" + prefix + "”" : "No device starts with “" + prefix + "”";
    $("results").replaceChildren(...[...found.values()].slice(0, 50).map(deviceItem));
  }
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    const prefix = $("prefix").value.trim();
    if (prefix) search(prefix).catch(() => {});
  });

  // One device: its record, and its events from the log (the last hour, then live).
  async function showDevice(id) {
    state.device = id;
    $("device-panel").hidden = false;
    $("device-id").textContent = id;
    const rec = await json("/devices/" + encodeURIComponent(id)).catch(() => null);
    const dl = $("device-record");
    dl.replaceChildren();
    for (const [k, v] of Object.entries(rec || { device: id, state: "unknown" })) {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = k;
      dd.textContent = v === null ? "–" : String(v);
      dl.append(dt, dd);
    }
    $("device-events").replaceChildren();
    if (state.deviceStream) state.deviceStream.close();
    const hourAgo = (Date.now() - 3600000).toString(36) + ".0".repeat(64);
    state.deviceStream = follow("/events?device=" + encodeURIComponent(id) + "&after=" + hourAgo, (ev, data) => {
      if (ev === "status") addEvent("device-events", data, 50);
    });
    $("device-panel").scrollIntoView({ block: "nearest" });
  }

  // --- the live stream --------------------------------------------------------------------
  function addEvent(listId, s, keep) {
    const li = document.createElement("li");
    const t = document.createElement("time");
    t.dateTime = s.since;
    t.textContent = new Date(s.since).toLocaleTimeString() + " ";
    const what = document.createElement("span");
    what.className = "state-" + s.state;
    what.textContent = s.device + " " + s.state + " (seq " + s.seq + (s.reason ? ", " + s.reason : "") + ")" + (s.flapping ? " · flapping" : "");
    li.append(t, what);
    const list = $(listId);
    list.prepend(li);
    while (list.children.length > keep) list.lastChild.remove();
  }

  function follow(path, onEvent) {
    const sep = path.includes("?") ? "&" : "?";
    const url = state.token ? path + sep + "access_token=" + encodeURIComponent(state.token) : path;
    const es = new EventSource(url);
    for (const name of ["status", "group", "gap"]) {
      es.addEventListener(name, (e) => onEvent(name, JSON.parse(e.data)));
    }
    return es;
  }

  function onStatus(s) {
    // Delivery is at least once: a copy of the status last shown changes nothing (a lower
    // seq is a new life: a forgotten device starts again at 1).
    if (state.seqs.get(s.device) === s.seq) return;
    addEvent("events", s, 50);
    const c = state.counts;
    if (c.online !== null) {
      if (s.state === "offline") { c.online = Math.max(0, c.online - 1); c.offline++; }
      else if (s.seq > 1) { c.offline = Math.max(0, c.offline - 1); c.online++; }
      else c.online++;
      showCounts();
    }
    if (state.seqs.size >= 100000) state.seqs.clear();
    state.seqs.set(s.device, s.seq);
    if (s.state === "offline") keep(state.offline, s); else state.offline.delete(s.device);
    renderList("offline");
    if (s.flapping) keep(state.flapping, s); else state.flapping.delete(s.device);
    renderList("flapping");
    if (s.group) refreshSoon();
  }

  let soon = null;
  function refreshSoon() {
    if (soon) return;
    soon = setTimeout(() => { soon = null; refreshGroups().catch(() => {}); }, 1000);
  }

  function connect() {
    if (state.stream) state.stream.close();
    const es = follow("/events", (ev, data) => {
      if (ev === "status") onStatus(data);
      else if (ev === "group") refreshGroups().catch(() => {});
      else { state.seqs.clear(); refreshAllSoon(); }
    });
    es.addEventListener("open", () => { $("link").textContent = "live"; $("link").className = "link live"; });
    es.addEventListener("error", () => {
      $("link").className = "link down";
      $("link").textContent = es.readyState === EventSource.CLOSED ? "stream closed" : "reconnecting…";
      // A closed stream is one the server refused (a token, or too many clients): the API
      // tells why; try again later.
      if (es.readyState === EventSource.CLOSED) {
        refreshAllSoon();
        setTimeout(() => { if (state.stream === es) connect(); }, 5000);
      }
    });
    state.stream = es;
  }

  async function refreshReplicas() {
    const r = await json("/instances");
    const online = r.instances.filter((i) => i.state === "online");
    $("replicas-note").textContent = online.length + " running" +
      (r.instances.length > online.length ? ", " + (r.instances.length - online.length) + " stopped (not listed)" : "");
    $("replicas").replaceChildren(...online.map((i) => {
      const li = document.createElement("li");
      const st = document.createElement("span");
      st.className = "state-" + i.state;
      st.textContent = i.state;
      li.append(i.instance + " ", st, i.since ? " since " + new Date(i.since).toLocaleTimeString() : "");
      return li;
    }));
  }

  let allSoon = null;
  function refreshAllSoon() {
    if (allSoon) return;
    allSoon = setTimeout(() => { allSoon = null; refreshAll(); }, 1000);
  }

  function refreshAll() {
    return Promise.all([refreshMetrics(), refreshGroups(), refreshLists(), refreshReplicas()]).catch(() => {});
  }

  let timers = [];
  function start() {
    timers.forEach(clearInterval);
    timers = [
      setInterval(() => refreshMetrics().catch(() => {}), 5000),
      setInterval(() => refreshGroups().catch(() => {}), 15000),
      setInterval(() => refreshReplicas().catch(() => {}), 10000),
    ];
    // The stream first, then the snapshot: nothing falls between them.
    connect();
    refreshAll();
  }
  start();
})();
