// The report's interactive part: the front with chosen axes, filters, parallel coordinates,
// a sortable table, CSV download and each trial's record. Reads the JSON that
// qlsearch/report/_explore.py embeds in index.html; draws the scatter with plotly.js
// (shipped beside this file, no network) and the parallel coordinates as plain SVG.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("qlsearch-data").textContent);
  const $ = (id) => document.getElementById(id);
  const fieldByKey = Object.fromEntries(data.fields.map((f) => [f.key, f]));
  const state = {
    x: data.default_x,
    y: data.default_y,
    methods: new Set(data.methods),
    ranges: Object.fromEntries(data.knob_ranges.map((k) => [k.name, [k.low, k.high]])),
    text: "",
    sort: { key: "number", dir: 1 },
  };

  // ---- values and formatting ------------------------------------------------------------
  function value(t, key) {
    const v = t.values[key];
    return v === undefined || v === null ? null : v;
  }
  function fmt(v) {
    if (v === null || v === undefined || v === "") return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && Math.abs(v) >= 1000) return v.toLocaleString("en-US");
    return Number(v.toPrecision(4)).toString();
  }
  // "12.3 ± 0.4" or "12.3 −1.2/+3.4"; with what the spread is unless short (the table's cell title says it)
  function withSpread(t, key, short) {
    const v = value(t, key);
    if (v === null) return "";
    const e = t.err[key];
    if (!e) return fmt(v);
    const text = e[0] === e[1] ? `${fmt(v)} ± ${fmt(e[0])}` : `${fmt(v)} −${fmt(e[0])}/+${fmt(e[1])}`;
    return short ? text : `${text} (${t.err_kind[key]})`;
  }
  function knobText(t) {
    return Object.entries(t.knobs).map(([k, v]) => `${k}=${v}`).join(", ");
  }

  // ---- filters ----------------------------------------------------------------------------
  function visible(t) {
    if (!state.methods.has(t.method)) return false;
    for (const [name, [lo, hi]] of Object.entries(state.ranges)) {
      const v = t.knobs[name];
      if (typeof v === "number" && (v < lo || v > hi)) return false;
    }
    if (state.text) {
      const hay = `#${t.number} ${t.state} ${t.method} ${t.baseline || ""} ${knobText(t)} ${t.machine}`;
      if (!hay.toLowerCase().includes(state.text)) return false;
    }
    return true;
  }
  const shown = () => data.trials.filter(visible);

  function buildControls() {
    for (const sel of [$("axis-x"), $("axis-y")]) {
      for (const f of data.fields) {
        const opt = document.createElement("option");
        opt.value = f.key;
        opt.textContent = f.label;
        sel.appendChild(opt);
      }
    }
    $("axis-x").value = state.x;
    $("axis-y").value = state.y;
    $("axis-x").addEventListener("change", (e) => { state.x = e.target.value; redraw(); });
    $("axis-y").addEventListener("change", (e) => { state.y = e.target.value; redraw(); });
    const methods = $("filter-methods");
    for (const m of data.methods) {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.checked = true;
      box.value = m;
      box.dataset.method = m;
      box.addEventListener("change", () => {
        if (box.checked) state.methods.add(m); else state.methods.delete(m);
        redraw();
      });
      label.append(box, " " + m);
      methods.appendChild(label);
    }
    const ranges = $("filter-knobs");
    for (const k of data.knob_ranges) {
      const span = document.createElement("span");
      span.className = "range";
      const lo = document.createElement("input");
      const hi = document.createElement("input");
      for (const [input, i, v] of [[lo, 0, k.low], [hi, 1, k.high]]) {
        input.type = "number";
        input.value = v;
        input.step = "any";
        input.id = `knob-${k.name}-${i ? "max" : "min"}`;
        input.addEventListener("input", () => {
          const n = parseFloat(input.value);
          state.ranges[k.name][i] = Number.isNaN(n) ? (i ? Infinity : -Infinity) : n;
          redraw();
        });
      }
      span.append(`${k.name} from `, lo, " to ", hi);
      ranges.appendChild(span);
    }
    $("filter-text").addEventListener("input", (e) => { state.text = e.target.value.trim().toLowerCase(); redraw(); });
    $("download-csv").addEventListener("click", downloadCsv);
  }

  // ---- the front ----------------------------------------------------------------------------
  function hover(t) {
    const lines = [`<b>${t.label}</b>`, `trial #${t.number}, ${t.method}${t.baseline ? " (baseline)" : ""}`];
    if (knobText(t)) lines.push(knobText(t));
    for (const o of data.objectives) lines.push(`${fieldByKey[o].label}: ${withSpread(t, o)}`);
    lines.push(`seeds: ${t.seeds}; trial time: ${fmt(t.trial_seconds)} s`);
    if (t.on_front) lines.push("on the Pareto front (all objectives)");
    return lines.join("<br>");
  }

  function drawFront() {
    const fx = fieldByKey[state.x], fy = fieldByKey[state.y];
    const pts = shown().filter((t) => value(t, state.x) !== null && value(t, state.y) !== null);
    const groups = [...new Set(pts.map((t) => t.group))];
    const traces = groups.map((g, i) => {
      const ts = pts.filter((t) => t.group === g);
      const err = (key) => {
        const have = ts.some((t) => t.err[key]);
        return have ? { type: "data", symmetric: false, array: ts.map((t) => (t.err[key] || [0, 0])[1]),
                        arrayminus: ts.map((t) => (t.err[key] || [0, 0])[0]), thickness: 1, width: 3 }
                    : { visible: false };
      };
      return {
        type: "scatter", mode: "markers", name: g,
        x: ts.map((t) => value(t, state.x)), y: ts.map((t) => value(t, state.y)),
        customdata: ts.map((t) => t.number),
        hovertext: ts.map(hover), hoverinfo: "text",
        error_x: err(state.x), error_y: err(state.y),
        // colour by method (as in the parallel coordinates), baselines as stars
        marker: { symbol: ts.map((t) => (t.baseline ? "star" : data.symbols[i % data.symbols.length])),
                  color: data.colours[data.methods.indexOf(ts[0].method) % data.colours.length],
                  size: 12, opacity: 0.75,
                  line: { width: ts.map((t) => (t.on_front ? 2 : 0)), color: "black" } },
      };
    });
    const axis = (f, values) => {
      const pos = values.filter((v) => v > 0);
      const log = pos.length === values.length && pos.length > 1 && Math.max(...pos) / Math.min(...pos) > 20;
      return { title: { text: `${f.label}${f.better ? ` (${f.better})` : ""}` }, type: log ? "log" : "linear",
               zeroline: false };
    };
    const layout = {
      margin: { l: 70, r: 20, t: 10, b: 60 }, hovermode: "closest", height: 460,
      xaxis: axis(fx, pts.map((t) => value(t, state.x))), yaxis: axis(fy, pts.map((t) => value(t, state.y))),
      legend: { orientation: "h", y: -0.2 }, showlegend: true,
    };
    $("front-count").textContent = `${pts.length} of ${data.trials.length} trials drawn` +
      (pts.length < shown().length ? ` (${shown().length - pts.length} shown trials lack one of the two values)` : "");
    return Plotly.react("explore-front", traces, layout, { displaylogo: false, responsive: true })
      .then(tagPoints);
  }

  // One SVG element per trial carries data-trial, so a point can be found and followed.
  function tagPoints() {
    const el = $("explore-front");
    el.querySelectorAll(".scatterlayer .trace").forEach((g) => {
      const trace = g.__data__ && g.__data__[0] && g.__data__[0].trace;
      if (!trace) return;
      g.querySelectorAll("path.point").forEach((p, j) => {
        p.setAttribute("data-trial", String(trace.customdata[j]));
      });
    });
    el.dataset.x = state.x;
    el.dataset.y = state.y;
  }

  // ---- parallel coordinates (plain SVG: no WebGL needed) ------------------------------------
  function drawParallel() {
    const ns = "http://www.w3.org/2000/svg";
    const svg = $("explore-parallel");
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const dims = data.parallel;
    const ts = shown().filter((t) => dims.every((d) => d.knob || value(t, d.key) !== null));
    const W = Math.max(640, svg.parentNode.clientWidth || 900), H = 320, top = 40, bottom = 30;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", W);
    svg.setAttribute("height", H);
    const step = (W - 120) / Math.max(1, dims.length - 1);
    const get = (t, d) => (d.knob ? t.knobs[d.key.slice(5)] : value(t, d.key));
    const scales = dims.map((d) => {
      const vs = data.trials.map((t) => get(t, d)).filter((v) => typeof v === "number");
      const lo = Math.min(...vs), hi = Math.max(...vs);
      const log = d.log && lo > 0;
      const f = (v) => (log ? Math.log10(v) : v);
      return (v) => {
        if (typeof v !== "number") return null;
        const span = f(hi) - f(lo);
        return H - bottom - (span > 0 ? (f(v) - f(lo)) / span : 0.5) * (H - top - bottom);
      };
    });
    const add = (tag, attrs, parent) => {
      const e = document.createElementNS(ns, tag);
      for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
      (parent || svg).appendChild(e);
      return e;
    };
    dims.forEach((d, i) => {
      const x = 60 + i * step;
      add("line", { x1: x, x2: x, y1: top, y2: H - bottom, stroke: "#888" });
      const title = add("text", { x, y: top - 22, "text-anchor": "middle", "font-size": 11 });
      title.textContent = d.label;
      const vs = data.trials.map((t) => get(t, d)).filter((v) => typeof v === "number");
      for (const v of [Math.min(...vs), Math.max(...vs)]) {
        const tick = add("text", { x: x + 4, y: scales[i](v) + 4, "font-size": 9, fill: "#555" });
        tick.textContent = fmt(v);
      }
    });
    const colours = data.colours;
    for (const t of ts) {
      const points = dims.map((d, i) => [60 + i * step, scales[i](get(t, d))]).filter((p) => p[1] !== null);
      const line = add("polyline", {
        points: points.map((p) => p.join(",")).join(" "), fill: "none",
        stroke: colours[data.methods.indexOf(t.method) % colours.length], "stroke-width": t.on_front ? 2.5 : 1.2,
        opacity: 0.8, "data-trial": t.number, class: "pc-line",
      });
      add("title", {}, line).textContent = `${t.label}\n${knobText(t)}`;
      line.addEventListener("click", () => openTrial(t.number));
    }
  }

  // ---- the table --------------------------------------------------------------------------
  function tableColumns() {
    return [
      { key: "number", label: "#", get: (t) => t.number },
      { key: "state", label: "state", get: (t) => t.state },
      { key: "method", label: "method", get: (t) => t.method },
      { key: "baseline", label: "baseline", get: (t) => t.baseline || "" },
      { key: "knobs", label: "knobs", get: knobText, cls: "knobs" },
      ...data.fields.filter((f) => !f.knob).map((f) => ({ key: f.key, label: f.label, get: (t) => value(t, f.key),
                                                         show: (t) => withSpread(t, f.key, true),
                                                         title: (t) => t.err_kind[f.key] || "" })),
      { key: "on_front", label: "front", get: (t) => (t.on_front ? "yes" : "") },
      { key: "seeds", label: "seeds", get: (t) => t.seeds },
      { key: "trial_seconds", label: "seconds", get: (t) => t.trial_seconds },
      { key: "machine", label: "machine", get: (t) => t.machine },
      { key: "failure", label: "failure", get: (t) => t.failure || "" },
    ];
  }

  function sorted(rows, columns) {
    const col = columns.find((c) => c.key === state.sort.key) || columns[0];
    return rows.slice().sort((a, b) => {
      const va = col.get(a), vb = col.get(b);
      if (va === vb) return a.number - b.number;
      if (va === null || va === "") return 1;
      if (vb === null || vb === "") return -1;
      return (va < vb ? -1 : 1) * state.sort.dir;
    });
  }

  function drawTable() {
    const columns = tableColumns();
    const head = $("explore-table").querySelector("thead");
    const body = $("explore-table").querySelector("tbody");
    head.innerHTML = "";
    body.innerHTML = "";
    const tr = document.createElement("tr");
    for (const c of columns) {
      const th = document.createElement("th");
      th.textContent = c.label + (state.sort.key === c.key ? (state.sort.dir > 0 ? " ▲" : " ▼") : "");
      th.dataset.key = c.key;
      th.className = "sortable";
      th.addEventListener("click", () => {
        state.sort = { key: c.key, dir: state.sort.key === c.key ? -state.sort.dir : 1 };
        drawTable();
      });
      tr.appendChild(th);
    }
    head.appendChild(tr);
    for (const t of sorted(shown(), columns)) {
      const row = document.createElement("tr");
      row.dataset.trial = t.number;
      if (t.state === "failed") row.className = "failed";
      for (const c of columns) {
        const td = document.createElement("td");
        if (c.cls) td.className = c.cls;
        td.textContent = c.show ? c.show(t) : fmt(c.get(t));
        if (c.title && c.title(t)) td.title = c.title(t);
        row.appendChild(td);
      }
      row.addEventListener("click", () => openTrial(t.number));
      body.appendChild(row);
    }
    $("table-count").textContent = `${shown().length} of ${data.trials.length} trials`;
  }

  function downloadCsv() {
    const columns = tableColumns();
    const quote = (v) => {
      const s = v === null || v === undefined ? "" : String(v);
      return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
    };
    const header = [];
    for (const c of columns) {
      header.push(c.key);
      if (c.show) header.push(`${c.key}_err_minus`, `${c.key}_err_plus`);
    }
    const lines = [header.map(quote).join(",")];
    for (const t of sorted(shown(), columns)) {
      const cells = [];
      for (const c of columns) {
        cells.push(c.get(t));
        if (c.show) cells.push(...(t.err[c.key] || ["", ""]));
      }
      lines.push(cells.map(quote).join(","));
    }
    const link = $("download-link");
    link.href = URL.createObjectURL(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }));
    link.download = `${data.study}-trials.csv`;
    link.click();
  }

  // ---- a trial's record: trials/<n>.js sets it (a script, so it loads from disk too) -------
  window.qlsearchRecord = function (record) {
    $("record-json").textContent = JSON.stringify(record, null, 2);
    $("record").dataset.trial = record.trial;
  };
  function openTrial(number) {
    const t = data.trials.find((x) => x.number === number);
    $("record-title").textContent = `Trial #${number}: ${t.label}`;
    $("record-link").href = t.record;
    $("record-link").textContent = t.record;
    $("record-json").textContent = "loading…";
    const old = $("record-script");
    if (old) old.remove();
    const s = document.createElement("script");
    s.id = "record-script";
    s.src = t.record.replace(/\.json$/, ".js");
    document.body.appendChild(s);
    $("record").hidden = false;
    $("record").scrollIntoView({ block: "nearest" });
    history.replaceState(null, "", `#trial-${number}`);
  }

  function redraw() {
    drawParallel();
    drawTable();
    return drawFront();
  }

  buildControls();
  redraw().then(() => {
    const el = $("explore-front");
    el.on("plotly_click", (ev) => openTrial(ev.points[0].customdata));
    el.on("plotly_afterplot", tagPoints);
    const m = /^#trial-(\d+)$/.exec(location.hash);
    if (m) openTrial(parseInt(m[1], 10));
    document.body.dataset.explore = "ready";
  });
})();
