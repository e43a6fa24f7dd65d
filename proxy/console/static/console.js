// The proxy's console: reads the admin API with the admin key as a bearer token. The key lives
// in this closure only: never in a URL, storage or a cookie; a reload asks for it again.
(() => {
  "use strict";

  // how often each page asks again (Usage: when asked); budgets cost a store read per client
  const REFRESH_MS = { budgets: 10000, keys: 2000, tasks: 2000, live: 2000 };
  const DAY_MS = 86400000;
  const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac"];
  const SVG = "http://www.w3.org/2000/svg";

  let adminKey = null;
  let timer = null;
  let current = null;
  let usageLoaded = false;
  let lastUsage = null; // the report drawn last: redrawn at a new width

  const $ = (id) => document.getElementById(id);

  // An element with attributes and children (text is always text: no markup from data).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const num = (x) => (x === null || x === undefined ? "" : String(Number(Number(x).toFixed(6))));
  const int = (x) => Number(x || 0).toLocaleString("en");
  const pct = (x) => (x === null || x === undefined ? "" : (x * 100).toFixed(1) + " %");
  const isoDay = (ms) => new Date(ms).toISOString().slice(0, 10);
  const when = (unix) => (unix ? new Date(unix * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC" : "");

  // A round top for an axis of `parts` steps (1, 2, 2.5 or 5 times a power of ten each).
  function niceTop(max, parts) {
    if (!(max > 0)) return parts;
    const raw = max / parts;
    const power = 10 ** Math.floor(Math.log10(raw));
    return parts * [1, 2, 2.5, 5, 10].map((m) => m * power).find((step) => step >= raw * (1 - 1e-9));
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "";
    if (seconds < 90) return Math.round(seconds) + " s";
    if (seconds < 5400) return Math.round(seconds / 60) + " min";
    return (seconds / 3600).toFixed(1) + " h";
  }

  function untilText(unix) {
    if (!unix) return "";
    const left = unix - Date.now() / 1000;
    return left > 0 ? "in " + ago(left) : when(unix);
  }

  function table(node, head, rows, foot) {
    for (const row of rows) { // each cell names its column: a phone shows rows as cards (console.css)
      [...row.children].forEach((cell, i) => cell.setAttribute("data-label", head[i] || ""));
    }
    node.replaceChildren(
      el("thead", null, el("tr", null, head.map((h) => el("th", null, h)))),
      el("tbody", null, rows.length ? rows : [el("tr", null, el("td", { colspan: head.length, class: "empty" }, "nothing"))]),
      ...(foot ? [el("tfoot", null, foot)] : []),
    );
  }

  function problem(text) {
    const node = $("problem");
    node.textContent = text || "";
    node.hidden = !text;
  }

  // ---- the admin API ----------------------------------------------------------------------

  async function call(path, method) {
    const response = await fetch(path, {
      method: method || "GET", cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
      headers: { authorization: "Bearer " + adminKey },
    });
    if (response.status === 401) {
      signOut("The admin key was refused.");
      throw new Error("refused");
    }
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || "HTTP " + response.status);
    }
    return response;
  }

  const json = async (path, method) => (await call(path, method)).json();

  // ---- signing in and out -------------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    const input = $("admin-key");
    const key = input.value.trim();
    input.value = "";
    const error = $("sign-in-error");
    error.hidden = true;
    let response;
    try {
      response = await fetch("/admin/keys", {
        cache: "no-store", credentials: "omit", headers: { authorization: "Bearer " + key },
      });
    } catch (failure) {
      error.textContent = "The proxy did not answer: " + failure.message;
      error.hidden = false;
      return;
    }
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      error.textContent = "Refused: " + ((body && body.error && body.error.message) || "HTTP " + response.status);
      error.hidden = false;
      return;
    }
    adminKey = key;
    $("sign-in").hidden = true;
    $("tabs").hidden = false;
    $("sign-out").hidden = false;
    route();
  }

  function signOut(message) {
    adminKey = null;
    clearInterval(timer);
    timer = null;
    current = null;
    usageLoaded = false;
    lastUsage = null;
    for (const page of document.querySelectorAll(".page")) page.hidden = true;
    $("tabs").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    const error = $("sign-in-error");
    error.textContent = message || "";
    error.hidden = !message;
    problem("");
  }

  // ---- pages --------------------------------------------------------------------------------

  const PAGES = { usage: loadUsage, budgets: loadBudgets, keys: loadKeys, tasks: loadTasks, live: loadLive };

  function route() {
    if (adminKey === null) return;
    const [name, detail] = (location.hash.slice(1) || "usage").split("/");
    const page = PAGES[name] ? name : "usage";
    for (const link of document.querySelectorAll("#tabs a")) {
      link.classList.toggle("current", link.dataset.page === page);
    }
    for (const node of document.querySelectorAll(".page")) node.hidden = node.id !== "page-" + page;
    if (page === "tasks") showTask(detail ? decodeURIComponent(detail) : null);
    if (page !== current) {
      current = page;
      clearInterval(timer);
      timer = REFRESH_MS[page] ? setInterval(refresh, REFRESH_MS[page]) : null;
      if (page !== "usage" || !usageLoaded) refresh();
    }
  }

  async function refresh() {
    const page = current;
    if (document.hidden && page !== "usage") return; // a tab in the background asks nothing
    try {
      await PAGES[page]();
      if (page === current) problem("");
    } catch (failure) {
      if (adminKey !== null && failure.message !== "refused") problem(failure.message);
    }
  }

  // ---- usage --------------------------------------------------------------------------------

  function radio(name) {
    return document.querySelector(`input[name="${name}"]:checked`).value;
  }

  function usageQuery(format) {
    const params = new URLSearchParams({ group_by: "day", split_by: radio("split") });
    const since = $("usage-since").value;
    const until = $("usage-until").value;
    if (since) params.set("since", since);
    if (until) params.set("until", isoDay(Date.parse(until + "T00:00:00Z") + DAY_MS)); // the whole last day
    if ($("usage-client").value) params.set("client", $("usage-client").value);
    if ($("usage-model").value.trim()) params.set("model", $("usage-model").value.trim());
    if (format) params.set("format", format);
    return "/admin/usage?" + params.toString();
  }

  async function fillFilters() {
    const since = $("usage-since").value || undefined;
    const [budgets, models] = await Promise.all([
      json("/admin/budgets"),
      json("/admin/usage?group_by=model" + (since ? "&since=" + since : "")),
    ]);
    const select = $("usage-client");
    const chosen = select.value;
    select.replaceChildren(el("option", { value: "" }, "all"),
      ...budgets.data.map((b) => el("option", { value: b.client, selected: b.client === chosen }, b.client)));
    $("usage-models").replaceChildren(...models.data.map((m) => el("option", { value: m.group })));
  }

  async function loadUsage() {
    if (!$("usage-since").value) {
      const today = Date.parse(isoDay(Date.now()) + "T00:00:00Z");
      $("usage-since").value = isoDay(today - 29 * DAY_MS);
      $("usage-until").value = isoDay(today);
    }
    const [report] = await Promise.all([json(usageQuery()), usageLoaded ? null : fillFilters()]);
    usageLoaded = true;
    lastUsage = [report, radio("split"), radio("metric")];
    drawUsage(...lastUsage);
  }

  function drawUsage(report, dimension, metric) {
    const first = Date.parse($("usage-since").value + "T00:00:00Z");
    const last = Date.parse($("usage-until").value + "T00:00:00Z");
    const days = [];
    for (let t = first; t <= last && days.length < 400; t += DAY_MS) days.push(isoDay(t));
    const byDay = new Map(days.map((d) => [d, { requests: 0, cost: 0, failed: 0, parts: new Map() }]));
    const splitTotals = new Map();
    for (const row of report.data) {
      const day = byDay.get(row.group) || { requests: 0, cost: 0, failed: 0, parts: new Map() };
      byDay.set(row.group, day);
      day.requests += row.requests;
      day.cost += row.cost;
      day.failed += row.failed;
      day.parts.set(row.split, row);
      splitTotals.set(row.split, (splitTotals.get(row.split) || 0) + row[metric]);
    }
    const splits = [...splitTotals.keys()].sort((a, b) => splitTotals.get(b) - splitTotals.get(a) || (a < b ? -1 : 1));
    const color = new Map(splits.map((s, i) => [s, COLORS[i % COLORS.length]]));

    $("usage-totals").replaceChildren(
      el("div", { class: "total", id: "total-requests" }, el("span", null, "Requests"), el("b", null, int(report.total.requests))),
      el("div", { class: "total", id: "total-cost" }, el("span", null, "Cost"), el("b", null, num(report.total.cost))),
      el("div", { class: "total", id: "total-failed" }, el("span", null, "Failed"), el("b", null, int(report.total.failed))),
    );
    $("usage-legend").replaceChildren(...splits.map((s) =>
      el("span", { class: "key" }, el("i", { class: "swatch", "data-color": color.get(s) }), s)));
    for (const swatch of document.querySelectorAll("#usage-legend .swatch")) swatch.style.background = swatch.dataset.color;

    // the chart: one stacked bar per day
    const box = $("usage-chart");
    const width = Math.max(300, box.clientWidth || 600);
    const height = 240;
    const pad = { left: 56, right: 8, top: 10, bottom: 24 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const top = niceTop(Math.max(...days.map((d) => byDay.get(d)[metric]), 0), 4);
    const step = plotW / Math.max(days.length, 1);
    const barW = Math.max(2, step * 0.75);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "plot" });
    for (let i = 0; i <= 4; i++) {
      const y = pad.top + plotH - (plotH * i) / 4;
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }),
        svg("text", { x: pad.left - 6, y: y + 4, class: "axis", "text-anchor": "end" },
          num((top * i) / 4)));
    }
    const labelEvery = Math.ceil(days.length / Math.max(1, Math.floor(plotW / 48)));
    days.forEach((dayName, i) => {
      const day = byDay.get(dayName);
      const x = pad.left + i * step + (step - barW) / 2;
      const group = svg("g", { class: "day", "data-day": dayName, "data-cost": day.cost, "data-requests": day.requests });
      let y = pad.top + plotH;
      for (const split of splits) {
        const part = day.parts.get(split);
        if (!part || !part[metric]) continue;
        const h = (part[metric] / top) * plotH;
        y -= h;
        group.append(svg("rect", { x, y, width: barW, height: Math.max(h, 0.5), fill: color.get(split) },
          svg("title", null, `${dayName} · ${split}: ${int(part.requests)} requests, cost ${num(part.cost)}`)));
      }
      group.append(svg("title", null, `${dayName}: ${int(day.requests)} requests, cost ${num(day.cost)}`));
      chart.append(group);
      if (i % labelEvery === 0) {
        chart.append(svg("text", { x: x + barW / 2, y: height - 6, class: "axis", "text-anchor": "middle" }, dayName.slice(5)));
      }
    });
    box.replaceChildren(chart);

    // the table: each day's total, then its parts
    const rows = [];
    for (const dayName of [...byDay.keys()].sort().reverse()) {
      const day = byDay.get(dayName);
      if (!day.requests && !day.cost && !day.failed) continue;
      rows.push(el("tr", { class: "day-total", "data-day": dayName },
        el("td", null, dayName), el("td", null, "all"), el("td", { class: "n" }, int(day.requests)),
        el("td", { class: "n cost" }, num(day.cost)), el("td", { class: "n" }, int(day.failed))));
      for (const split of splits) {
        const part = day.parts.get(split);
        if (!part) continue;
        rows.push(el("tr", { class: "part" }, el("td", null, ""),
          el("td", null, el("i", { class: "swatch", "data-color": color.get(split) }), split),
          el("td", { class: "n" }, int(part.requests)), el("td", { class: "n" }, num(part.cost)),
          el("td", { class: "n" }, int(part.failed))));
      }
    }
    table($("usage-table"), ["Day (UTC)", dimension, "Requests", "Cost", "Failed"], rows,
      el("tr", null, el("td", null, "Total"), el("td", null, ""), el("td", { class: "n" }, int(report.total.requests)),
        el("td", { class: "n" }, num(report.total.cost)), el("td", { class: "n" }, int(report.total.failed))));
    for (const swatch of document.querySelectorAll("#usage-table .swatch")) swatch.style.background = swatch.dataset.color;
  }

  async function downloadCsv() {
    try {
      const blob = await (await call(usageQuery("csv"))).blob();
      const link = el("a", { href: URL.createObjectURL(blob), download: `usage-${radio("split")}-by-day.csv` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    } catch (failure) {
      if (failure.message !== "refused") problem(failure.message);
    }
  }

  // ---- budgets ------------------------------------------------------------------------------

  async function loadBudgets() {
    const budgets = await json("/admin/budgets");
    const rows = budgets.data.map((b) => {
      const fill = el("div", { class: "fill", "data-share": b.share === null ? "" : b.share });
      const row = el("div", { class: "budget" + (b.over_80 ? " warn" : "") + (b.share >= 1 ? " spent" : ""), "data-client": b.client },
        el("div", { class: "who" }, el("b", null, b.client), b.over_80 ? el("span", { class: "badge warn" }, "over 80 %") : null),
        el("div", { class: "track" }, fill),
        el("div", { class: "what" },
          b.budget === null ? `spent ${num(b.spent)} (${b.period}), no budget`
            : `${num(b.spent)} of ${num(b.budget)} (${b.period}) · ${pct(b.share)}`,
          b.held ? ` · ${num(b.held)} held` : "",
          ` · ${int(b.requests_last_hour)} requests in the last hour`));
      fill.style.width = b.share === null ? "0" : Math.min(100, b.share * 100) + "%";
      return row;
    });
    $("budget-bars").replaceChildren(...(rows.length ? rows : [el("p", { class: "empty" }, "no clients")]));
  }

  // ---- upstream keys ------------------------------------------------------------------------

  async function setKey(fingerprint, action) {
    try {
      await call(`/admin/keys/${encodeURIComponent(fingerprint)}/${action}`, "POST");
      await loadKeys();
    } catch (failure) {
      if (failure.message !== "refused") problem(failure.message);
    }
  }

  async function loadKeys() {
    const keys = await json("/admin/keys");
    const rows = keys.data.map((k) => el("tr", { "data-fingerprint": k.fingerprint, "data-state": k.state },
      el("td", null, el("code", null, k.fingerprint)),
      el("td", null, k.provider),
      el("td", null, el("span", { class: "badge " + k.state }, k.state)),
      el("td", null, k.reason || ""),
      el("td", null, untilText(k.until)),
      el("td", { class: "n" }, k.rate_limit === null ? int(k.calls_in_window) : `${int(k.calls_in_window)} / ${int(k.rate_limit)}`),
      el("td", { class: "n" }, int(k.in_flight)),
      el("td", { class: "n" }, `${int(k.requests)} / ${int(k.failures)}`),
      el("td", { class: "n" }, k.credits === null ? "" : num(k.credits)),
      el("td", { class: "n" }, k.vip_level === null ? "" : k.vip_level),
      el("td", null,
        k.state !== "disabled" ? el("button", { type: "button", class: "disable", onclick: () => setKey(k.fingerprint, "disable") }, "Disable") : null,
        k.state !== "active" ? el("button", { type: "button", class: "enable", onclick: () => setKey(k.fingerprint, "enable") }, "Enable") : null)));
    table($("keys-table"), ["Fingerprint", "Provider", "State", "Reason", "Until", "Calls in window", "In flight",
      "Calls / failures", "Credits", "VIP", ""], rows);
  }

  // ---- tasks --------------------------------------------------------------------------------

  const taskLink = (id) => el("a", { href: "#tasks/" + encodeURIComponent(id), class: "task-id" }, id);

  async function loadTasks() {
    const board = await json("/admin/tasks?limit=100");
    $("task-counts").replaceChildren(...Object.entries(board.counts).map(([state, n]) =>
      el("div", { class: "total", "data-state": state }, el("span", null, state), el("b", null, int(n)))));
    table($("tasks-waiting"), ["Task", "Client", "Model", "Upstream", "State", "Age", "Polls", "Last problem"],
      board.waiting.map((t) => el("tr", { "data-task": t.id, "data-state": t.state },
        el("td", null, taskLink(t.id)), el("td", null, t.client), el("td", null, t.model), el("td", null, t.upstream),
        el("td", null, el("span", { class: "badge " + t.state }, t.late ? t.state + " (late)" : t.state)),
        el("td", { class: "n" }, ago(t.age)), el("td", { class: "n" }, t.polls === null ? "" : t.polls),
        el("td", null, t.last_problem || ""))));
    table($("tasks-finished"), ["Task", "Client", "Model", "State", "Finished", "Reason"],
      board.finished.map((t) => el("tr", { "data-task": t.id, "data-state": t.state },
        el("td", null, taskLink(t.id)), el("td", null, t.client), el("td", null, t.model),
        el("td", null, el("span", { class: "badge " + t.state }, t.state)), el("td", null, when(t.updated)),
        el("td", null, t.reason || ""))));
  }

  async function showTask(id) {
    const box = $("task-detail");
    if (!id) {
      box.hidden = true;
      return;
    }
    try {
      const t = await json("/admin/tasks/" + encodeURIComponent(id));
      const fields = [["Task", t.id], ["State", t.state], ["Client", t.client], ["Model", t.model],
        ["Upstream", t.upstream], ["Key", t.key], ["Upstream task", t.upstream_task_id], ["Request", t.request_id],
        ["Created", when(t.created)], ["Updated", when(t.updated)], ["Deadline", when(t.deadline)],
        ["Progress", t.progress === null ? "" : pct(t.progress)], ["Polls", t.polls], ["Reason", t.reason],
        ["Last problem", t.last_problem], ["Polled by", t.owner], ["Results", t.urls.length]];
      box.replaceChildren(el("a", { href: "#tasks", class: "close" }, "close"),
        el("dl", null, fields.map(([name, value]) => [el("dt", null, name), el("dd", null, value === null ? "" : value)])));
      box.hidden = false;
    } catch (failure) {
      if (failure.message !== "refused") problem(failure.message);
    }
  }

  // ---- live ---------------------------------------------------------------------------------

  function line(box, points, format, color) {
    const width = Math.max(300, box.clientWidth || 600);
    const height = 150;
    const pad = { left: 48, right: 8, top: 8, bottom: 20 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const top = niceTop(Math.max(...points, 0), 2);
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "plot" });
    for (let i = 0; i <= 2; i++) {
      const y = pad.top + plotH - (plotH * i) / 2;
      chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y, y2: y, class: "grid" }),
        svg("text", { x: pad.left - 6, y: y + 4, class: "axis", "text-anchor": "end" }, format((top * i) / 2)));
    }
    const x = (i) => pad.left + (plotW * i) / Math.max(points.length - 1, 1);
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    const path = points.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
    chart.append(svg("path", { d: `${path}L${x(points.length - 1)},${y(0)}L${x(0)},${y(0)}Z`, fill: color, "fill-opacity": 0.15 }),
      svg("path", { d: path, fill: "none", stroke: color, "stroke-width": 1.5 }));
    for (const [i, label] of [[0, "-15 min"], [Math.floor(points.length / 2), "-7.5 min"], [points.length - 1, "now"]]) {
      chart.append(svg("text", { x: x(i), y: height - 4, class: "axis", "text-anchor": i ? (label === "now" ? "end" : "middle") : "start" }, label));
    }
    box.replaceChildren(chart);
  }

  async function loadLive() {
    const live = await json("/admin/live");
    const buckets = live.data;
    const seconds = live.bucket_seconds;
    const rate = buckets.map((b) => b.requests / seconds);
    const errors = buckets.map((b) => (b.requests ? (b.errors / b.requests) * 100 : 0));
    const lastMinute = buckets.slice(-60 / seconds); // the one under way included
    const requests = lastMinute.reduce((n, b) => n + b.requests, 0);
    const failed = lastMinute.reduce((n, b) => n + b.errors, 0);
    const all = buckets.reduce((n, b) => n + b.requests, 0);
    $("live-totals").replaceChildren(
      el("div", { class: "total", id: "live-rps" }, el("span", null, "Requests/s, last minute"), el("b", null, (requests / 60).toFixed(2))),
      el("div", { class: "total", id: "live-error-rate" }, el("span", null, "Errors, last minute"), el("b", null, requests ? ((failed / requests) * 100).toFixed(1) + " %" : "0 %")),
      el("div", { class: "total", id: "live-requests" }, el("span", null, "Requests, 15 min"), el("b", null, int(all))),
    );
    line($("live-rate"), rate, (v) => v.toFixed(v < 10 ? 1 : 0), "#4e79a7");
    line($("live-errors"), errors, (v) => v.toFixed(0) + " %", "#e15759");
    const counted = live.scope === "proxy" ? "Every replica's answers (through Redis, up to a second late)"
      : "Counted by the process that answered this page (with several workers and no Redis, each counts its own)";
    $("live-note").textContent = `${counted}, in ${seconds}-second buckets. Updated ` +
      new Date().toLocaleTimeString() + ".";
  }

  // ---- start --------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", () => signOut(""));
    $("usage-filters").addEventListener("submit", (event) => {
      event.preventDefault();
      refresh();
    });
    $("usage-filters").addEventListener("change", (event) => {
      if (event.target.type === "radio") refresh();
    });
    $("usage-csv").addEventListener("click", downloadCsv);
    window.addEventListener("hashchange", route);
    let resizing = null;
    window.addEventListener("resize", () => { // charts are drawn to their box's width
      clearTimeout(resizing);
      resizing = setTimeout(() => {
        if (current === "usage" && lastUsage) drawUsage(...lastUsage);
        else if (current === "live") refresh();
      }, 150);
    });
    $("admin-key").focus();
  });
})();
