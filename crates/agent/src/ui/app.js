// keel's dashboard script: renders /v1/ui/state (polled every second) and the
// events timeline (server-sent events from /v1/events/stream). Plain DOM, no
// framework, nothing fetched from outside this agent.
"use strict";

const POLL_INTERVAL_MS = 1000;
const EVENTS_SHOWN_MAX = 500;
const FAMILIES = ["leader", "member", "alarm", "node", "check", "job", "allocation", "controller", "fault"];

let logsAvailable = false;
let eventFilter = null;
const seenEvents = new Set();

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function pill(text, kind) {
  return el("span", { class: "pill " + (kind || "") }, text);
}

function bytes(count) {
  if (count === null || count === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(count);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return (unit === 0 ? value.toFixed(0) : value.toFixed(1)) + " " + units[unit];
}

function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 0.001) return (value * 1e6).toFixed(0) + " µs";
  if (value < 1) return (value * 1000).toFixed(value < 0.01 ? 2 : 1) + " ms";
  return value.toFixed(2) + " s";
}

function clock(unixMs) {
  return new Date(unixMs).toLocaleTimeString([], { hour12: false });
}

function statusKind(status) {
  switch (status) {
    case "alive": case "passing": case "running": case "complete": case "successful": case "ready": return "ok";
    case "suspect": case "warning": case "pending": return "warn";
    case "down": case "critical": case "failed": case "unreachable": case "not ready": return "bad";
    default: return "";
  }
}

function replace(id, ...children) {
  const target = document.getElementById(id);
  target.replaceChildren(...children.flat());
}

function renderSummary(state) {
  const cluster = state.cluster || {};
  const members = cluster.members || [];
  const reachable = members.filter((member) => member.reachable).length;
  const leader = members.find((member) => member.id === cluster.leader);
  const nodes = state.nodes || [];
  const alive = nodes.filter((node) => node.status === "alive").length;
  const instances = (state.services || []).reduce((sum, service) => sum + service.instances.length, 0);
  replace("summary",
    pill(leader ? "leader " + leader.name + " · term " + cluster.term : "no leader", leader ? "ok" : "bad"),
    pill(reachable + "/" + members.length + " members answer", reachable === members.length && members.length > 0 ? "" : "bad"),
    pill(alive + "/" + nodes.length + " nodes alive", alive === nodes.length ? "" : "warn"),
    pill((state.services || []).length + " services · " + instances + " instances"),
    pill((state.jobs || []).length + " jobs"),
  );
  document.getElementById("live").classList.toggle("stale", Boolean(state.agent && state.agent.stale));
  document.getElementById("updated").textContent = "revision " + (state.agent ? state.agent.revision : "–");
}

function renderMembers(state) {
  const cluster = state.cluster || {};
  const rows = (cluster.members || []).map((member) => {
    const status = member.status;
    const isLeader = member.id === cluster.leader;
    let role;
    if (!member.reachable) role = pill("unreachable", "bad");
    else if (isLeader) role = pill("leader", "leader");
    else if (member.is_learner) role = pill("learner", "warn");
    else role = pill("follower");
    let health;
    if (!member.reachable) health = pill("down", "bad");
    else if (member.ready === true) health = pill("ready", "ok");
    else if (member.ready === false) health = pill("not ready", "bad");
    else health = pill("unknown");
    const alarms = member.alarms.length ? member.alarms.map((alarm) => pill(alarm, "bad")) : el("span", { class: "muted" }, "none");
    return el("tr", {
      class: (isLeader ? "leader " : "") + (member.reachable ? "" : "unreachable"),
      "data-member": member.name || member.id,
      "data-role": isLeader ? "leader" : member.reachable ? "follower" : "unreachable",
    },
      el("td", { class: "name" }, el("b", {}, member.name || "(unstarted)")),
      el("td", { class: "mono" }, member.id),
      el("td", {}, role),
      el("td", { class: "num" }, status ? status.term : "–"),
      el("td", { class: "num" }, status ? status.commit_index : "–"),
      el("td", { class: "num" }, status ? status.applied_index : "–"),
      el("td", { class: "num" }, status ? bytes(status.db_size_bytes) : "–"),
      el("td", {}, alarms),
      el("td", { title: member.error || "" }, health),
    );
  });
  document.querySelector("#members tbody").replaceChildren(...rows);
  document.getElementById("members-note").textContent = cluster.error ? "membership unknown: " + cluster.error : "";
}

function usageBar(label, used, total, text) {
  const share = total > 0 ? Math.min(100, (100 * used) / total) : 0;
  const kind = share >= 90 ? "full" : share >= 75 ? "high" : "";
  return el("div", { class: "bar" },
    el("span", {}, label),
    el("div", { class: "track" }, el("div", { class: "fill " + kind, style: "width:" + share.toFixed(1) + "%" })),
    el("span", { class: "value" }, text));
}

function renderNodes(state) {
  const nodes = (state.nodes || []).slice().sort((a, b) => a.name.localeCompare(b.name));
  const cards = nodes.map((node) => {
    const usage = node.usage;
    const bars = usage ? [
      usageBar("CPU", usage.cpu_percent, 100, usage.cpu_percent.toFixed(0) + "% of " + node.cpu_cores),
      usageBar("Memory", usage.memory_used_bytes, node.memory_total_bytes, bytes(usage.memory_used_bytes)),
      usageBar("Disk", node.disk_total_bytes - usage.disk_free_bytes, node.disk_total_bytes, bytes(usage.disk_free_bytes) + " free"),
    ] : [el("div", { class: "empty" }, "no usage reported")];
    const labels = Object.entries(node.labels || {}).map(([key, value]) => el("span", { class: "chip" }, key + "=" + value));
    const phi = node.phi === null || node.phi === undefined ? "–" : node.phi.toFixed(1);
    return el("div", { class: "node " + node.status, "data-node": node.name },
      el("div", { class: "node-head" }, el("span", { class: "node-name" }, node.name), pill(node.status, statusKind(node.status))),
      el("div", { class: "node-meta" }, node.address + " · phi " + phi + " · " + node.instances + " instances"),
      bars,
      labels.length ? el("div", { style: "margin-top:6px" }, labels) : null);
  });
  replace("nodes", cards.length ? cards : el("div", { class: "empty" }, "No node registered."));
  document.getElementById("nodes-note").textContent = nodes.length + " known";
}

function renderServices(state) {
  const services = state.services || [];
  const blocks = services.map((service) => {
    const passing = service.instances.filter((instance) => instance.passing).length;
    return el("div", { class: "service" },
      el("div", { class: "service-head" },
        el("span", { class: "service-name" }, service.name),
        pill(passing + "/" + service.instances.length + " passing", passing === service.instances.length ? "ok" : passing > 0 ? "warn" : "bad"),
        service.tags.map((tag) => el("span", { class: "chip" }, tag))),
      service.instances.map((instance) => el("div", { class: "instance" },
        el("span", { class: "mono" }, instance.node + " / " + instance.id),
        el("span", { class: "mono muted" }, instance.address + ":" + instance.port),
        el("span", {},
          instance.node_status !== "alive" ? pill("node " + instance.node_status, statusKind(instance.node_status)) : null,
          instance.checks.length === 0 ? el("span", { class: "muted" }, "no checks") : null,
          instance.checks.map((check) => el("span", { class: "check", title: check.output },
            pill(check.status, statusKind(check.status)), " ", check.name || check.id,
            el("span", { class: "output" }, "(" + check.kind + ", " + check.type + ")")))))));
  });
  replace("services", blocks.length ? blocks : el("div", { class: "empty" }, "No service registered."));
  document.getElementById("services-note").textContent = services.length + " services";
}

function renderJobs(state) {
  const jobs = (state.jobs || []).map((job) => {
    const counts = Object.entries(job.allocations || {}).map(([status, count]) => pill(count + " " + status, statusKind(status)));
    const groups = Object.entries(job.groups || {}).map(([group, count]) => el("span", { class: "chip" }, group + " × " + count));
    return el("div", { class: "job" },
      el("div", {}, el("span", { class: "job-name" }, job.name), " ", el("span", { class: "muted" }, (job.type || "") + " v" + job.version),
        job.stopped ? [" ", pill("stopped", "warn")] : null),
      el("div", {}, groups),
      el("div", { style: "margin-top:4px" }, counts.length ? counts : el("span", { class: "muted" }, "no allocations")),
      job.deployment ? el("div", { class: "muted" }, "deployment of v" + job.deployment.job_version + ": " + job.deployment.status) : null);
  });
  replace("jobs", el("div", { class: "jobs" }, jobs.length ? jobs : el("div", { class: "empty" }, "No job registered.")));
  const rows = (state.allocations || []).map((allocation) => {
    const tasks = (allocation.tasks || []).map((task) => el("span", { class: "chip" },
      task.name + ": " + (task.state || "?") + (task.restarts ? " ↻" + task.restarts : "")));
    const logs = logsAvailable && (allocation.tasks || []).length
      ? (allocation.tasks || []).map((task) => el("a", {
        href: "/v1/allocation/" + encodeURIComponent(allocation.id) + "/logs?task=" + encodeURIComponent(task.name) + "&type=stdout",
        target: "_blank",
      }, "logs" + ((allocation.tasks || []).length > 1 ? " (" + task.name + ")" : "")))
      : null;
    return el("tr", {},
      el("td", { class: "mono", title: allocation.id }, allocation.id.slice(0, 8)),
      el("td", {}, allocation.job + " v" + allocation.version),
      el("td", {}, allocation.group + "[" + allocation.index + "]"),
      el("td", {}, allocation.node),
      el("td", {}, allocation.desired),
      el("td", {}, pill(allocation.status || "unknown", statusKind(allocation.status))),
      el("td", {}, tasks),
      el("td", {}, logs));
  });
  document.querySelector("#allocations tbody").replaceChildren(...rows);
  document.getElementById("allocations").hidden = rows.length === 0;
  const counts = Object.entries(state.allocation_counts || {}).filter(([, count]) => count > 0)
    .map(([status, count]) => count + " " + status).join(" · ");
  document.getElementById("jobs-note").textContent = counts;
}

function chart(id, title, times, series, format) {
  const width = 600, height = 130, pad = 4;
  const points = series.flatMap((line) => line.values.filter((value) => value !== null && value !== undefined));
  const top = Math.max(1e-9, ...points) * 1.15;
  // x is time: an idle agent samples less often than one being watched.
  const first = times.length ? times[0] : 0;
  const span = Math.max(1, times.length ? times[times.length - 1] - first : 1);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  for (const share of [0.25, 0.5, 0.75]) {
    const line = document.createElementNS(svg.namespaceURI, "line");
    line.setAttribute("x1", 0); line.setAttribute("x2", width);
    line.setAttribute("y1", height * share); line.setAttribute("y2", height * share);
    line.setAttribute("stroke", "#edf0f5"); line.setAttribute("stroke-width", "1");
    svg.append(line);
  }
  for (const line of series) {
    let path = "";
    line.values.forEach((value, index) => {
      if (value === null || value === undefined) return;
      const x = pad + ((width - 2 * pad) * (times[index] - first)) / span;
      const y = height - pad - ((height - 2 * pad) * value) / top;
      path += (path ? " L" : "M") + x.toFixed(1) + " " + y.toFixed(1);
    });
    const element = document.createElementNS(svg.namespaceURI, "path");
    element.setAttribute("d", path);
    element.setAttribute("fill", "none");
    element.setAttribute("stroke", line.color);
    element.setAttribute("stroke-width", "2");
    element.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(element);
  }
  const legend = el("div", { class: "legend" },
    el("span", {}, el("b", {}, title)),
    series.map((line) => {
      const last = line.values.length ? line.values[line.values.length - 1] : null;
      return el("span", {}, el("span", { class: "swatch", style: "background:" + line.color }), line.name + " ", el("b", {}, format(last)));
    }),
    el("span", {}, "max " + format(top / 1.15)));
  replace(id, svg, legend);
}

function renderCharts(state) {
  const samples = state.samples || [];
  const rate = (value) => (value === null || value === undefined ? "–" : value.toFixed(value < 10 ? 1 : 0) + "/s");
  const times = samples.map((sample) => sample.time_unix_ms);
  chart("chart-throughput", "Throughput", times, [
    { name: "requests", color: "#2f5bea", values: samples.map((sample) => sample.requests_per_second) },
    { name: "Raft commits", color: "#1f9d55", values: samples.map((sample) => sample.commits_per_second) },
  ], rate);
  chart("chart-latency", "Latency", times, [
    { name: "WAL fsync p99", color: "#b7791f", values: samples.map((sample) => sample.fsync_p99_seconds) },
    { name: "read from agent", color: "#7b4bd6", values: samples.map((sample) => sample.read_latency_seconds) },
  ], seconds);
}

function render(state) {
  renderSummary(state);
  renderMembers(state);
  renderCharts(state);
  renderNodes(state);
  renderServices(state);
  renderJobs(state);
}

async function poll() {
  try {
    const response = await fetch("/v1/ui/state", { cache: "no-store" });
    if (!response.ok) throw new Error(response.status + " " + (await response.text()));
    render(await response.json());
    document.getElementById("live").classList.remove("stale");
    document.getElementById("live").title = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    document.getElementById("live").classList.add("stale");
    document.getElementById("updated").textContent = "agent unreachable: " + error.message;
  } finally {
    setTimeout(poll, POLL_INTERVAL_MS);
  }
}

function eventKind(type) {
  if (/(down|unreachable|failed|lost|raised|injected)$/.test(type)) return "bad";
  if (/(suspect|restarted|rescheduled|removed|stopped|drain)$/.test(type)) return "warn";
  if (/(alive|reachable|cleared|healed|started|added)$/.test(type)) return "ok";
  return "info";
}

function checkEventKind(event) {
  if (event.type !== "check.status") return eventKind(event.type);
  return statusKind((event.fields || {}).status) || "info";
}

function showEvent(event, fresh) {
  if (seenEvents.has(event.id)) return;
  seenEvents.add(event.id);
  const list = document.getElementById("events");
  const item = el("li", {
    class: "event " + checkEventKind(event) + (fresh ? " fresh" : ""),
    "data-type": event.type,
    "data-subject": event.subject,
  },
    el("div", { class: "event-head" },
      el("span", { class: "event-type" }, event.type),
      el("span", { title: new Date(event.time_unix_ms).toISOString() }, clock(event.time_unix_ms) + " · " + event.source)),
    el("div", { class: "event-message" }, event.message));
  item.hidden = !eventVisible(event.type);
  // Newest first; an older event (history arriving late) goes in time order.
  let before = list.firstChild;
  while (before && Number(before.dataset.time) > event.time_unix_ms) before = before.nextSibling;
  item.dataset.time = event.time_unix_ms;
  list.insertBefore(item, before);
  while (list.children.length > EVENTS_SHOWN_MAX) list.lastChild.remove();
}

function eventVisible(type) {
  return eventFilter === null || type === eventFilter || type.startsWith(eventFilter + ".");
}

function renderFilters() {
  const buttons = [null, ...FAMILIES].map((family) => el("button", {
    type: "button",
    class: family === eventFilter ? "on" : "",
    onclick: () => {
      eventFilter = family;
      renderFilters();
      for (const item of document.getElementById("events").children) item.hidden = !eventVisible(item.dataset.type);
    },
  }, family || "all"));
  replace("event-filters", buttons);
}

function followEvents() {
  const note = document.getElementById("events-note");
  const source = new EventSource("/v1/events/stream?since=24h&limit=200");
  let historyDone = false;
  source.onopen = () => { note.textContent = "live"; };
  source.onmessage = (message) => {
    try { showEvent(JSON.parse(message.data), historyDone); } catch (error) { /* not an event */ }
  };
  // The history arrives at once; later events are live.
  setTimeout(() => { historyDone = true; }, 1500);
  source.addEventListener("lagged", (message) => { note.textContent = message.data; });
  source.onerror = () => { note.textContent = "reconnecting…"; };
}

let kvAfter = "";
async function listKeys(more) {
  const prefix = document.getElementById("kv-prefix").value;
  if (!more) kvAfter = "";
  const query = "/v1/ui/kv?limit=100&prefix=" + encodeURIComponent(prefix) + (kvAfter ? "&after=" + encodeURIComponent(kvAfter) : "");
  const list = document.getElementById("kv-keys");
  try {
    const response = await fetch(query);
    if (!response.ok) throw new Error(await response.text());
    const page = await response.json();
    const items = page.keys.map((entry) => el("li", {
      onclick: (click) => { showValue(entry.key, click.currentTarget); },
      title: entry.preview,
    }, el("span", { class: "key" }, entry.key), el("span", { class: "muted" }, bytes(entry.size_bytes))));
    if (more) list.append(...items); else list.replaceChildren(...items);
    if (!more && items.length === 0) list.replaceChildren(el("li", { class: "muted" }, "No key under " + prefix));
    kvAfter = page.keys.length ? page.keys[page.keys.length - 1].key : kvAfter;
    document.getElementById("kv-more").hidden = !page.more;
  } catch (error) {
    list.replaceChildren(el("li", { class: "muted" }, "cannot list: " + error.message));
  }
}

async function showValue(key, item) {
  for (const selected of document.querySelectorAll(".kv-keys li.selected")) selected.classList.remove("selected");
  if (item) item.classList.add("selected");
  const target = document.getElementById("kv-value");
  try {
    const response = await fetch("/v1/ui/kv?key=" + encodeURIComponent(key));
    if (!response.ok) throw new Error(await response.text());
    const entry = await response.json();
    let value = entry.value;
    try { value = JSON.stringify(JSON.parse(value), null, 2); } catch (error) { /* not JSON: as it is */ }
    target.classList.remove("muted");
    target.textContent = entry.key + "\nrevision " + entry.mod_revision + " · version " + entry.version +
      " · lease " + entry.lease + " · " + bytes(entry.size_bytes) + (entry.truncated ? " (truncated)" : "") + "\n\n" + value;
  } catch (error) {
    target.textContent = "cannot read " + key + ": " + error.message;
  }
}

async function probeLogs() {
  try {
    const response = await fetch("/v1/allocations");
    logsAvailable = response.ok;
  } catch (error) {
    logsAvailable = false;
  }
}

function start() {
  const initial = document.getElementById("initial-state");
  try { render(JSON.parse(initial.textContent)); } catch (error) { /* the first poll renders */ }
  renderFilters();
  document.getElementById("kv-form").addEventListener("submit", (submit) => { submit.preventDefault(); listKeys(false); });
  document.getElementById("kv-more").addEventListener("click", () => listKeys(true));
  probeLogs();
  listKeys(false);
  followEvents();
  setTimeout(poll, POLL_INTERVAL_MS);
}

start();
