"""The page's interactive part: the front on axes the reader picks, filters, parallel
coordinates, a sortable table with CSV download, and each trial's record one click away.

Why plotly.js: it ships inside the ``plotly`` PyPI package as one file
(``plotly/package_data/plotly.min.js``, MIT), so the report copies it next to
``index.html`` and the page works from disk or any static host with no network
fetch; its SVG scatter has hover, zoom, log axes and asymmetric error bars
built in. Matplotlib stays for the static, paper-ready figures. The parallel
coordinates are drawn as plain SVG by ``explore.js`` (plotly's ``parcoords``
needs WebGL, which headless and remote-desktop browsers often lack).

Everything the page shows comes from the records and the Optuna study and is
generic over them: every numeric scalar in a record's ``metrics`` or
``profile`` section becomes a choosable axis (new metrics appear with no code
here), and a metric's error bar is, in order of preference, its std over seeds,
the record's own ``<name>_std``, or the interquartile range of
``<name>_spread`` (a timing's repeats). A trial's records are written as
``trials/<n>.json`` (linked) and ``trials/<n>.js`` (loaded by a script tag on
click: browsers refuse ``fetch`` from ``file://`` but not scripts).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from qlsearch.metrics import METRICS
from qlsearch.report._data import (
    Section,
    StudyData,
    axis_label,
    finite,
    front_numbers,
    machine_text,
    trial_label,
    trial_values,
)
from qlsearch.report._tables import STATES

SYMBOLS = ["circle", "square", "diamond", "triangle-up", "triangle-down", "pentagon", "hexagon", "cross"]
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _clean(value):
    """JSON that ``JSON.parse`` reads: non-finite floats become the strings ``inf``/``nan``."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _fields(data: StudyData, trials: list[dict], knobs: list[str]) -> list[dict]:
    """The choosable axes: the objectives, then every other field that varies, then the knobs."""
    objectives = [m.name for m in data.study.objectives]
    seen: dict[str, set] = {}
    for t in trials:
        for name, v in t["values"].items():
            seen.setdefault(name, set()).add(v)
    others = sorted(n for n, vs in seen.items() if n not in objectives and len(vs) > 1)
    fields = []
    for name in [*objectives, *others]:
        metric = METRICS.get(name)
        fields.append({"key": name, "label": axis_label(data, name),
                       "better": ("higher is better" if metric.higher_is_better else "lower is better")
                       if metric else None, "objective": name in objectives})
    fields += [{"key": f"knob.{k}", "label": f"knob {k}", "better": None, "objective": False, "knob": True}
               for k in knobs]
    return fields


def _numeric_knobs(data: StudyData) -> list[tuple[str, float, float]]:
    """(knob, low, high) of every numeric knob that takes more than one finite value."""
    seen: dict[str, set] = {}
    for t in data.trials:
        for k, v in t.knobs.items():
            if finite(v):
                seen.setdefault(k, set()).add(v)
    return [(k, min(vs), max(vs)) for k, vs in sorted(seen.items()) if len(vs) > 1]


def page_data(data: StudyData) -> dict:
    """What ``explore.js`` reads (embedded in the page as JSON)."""
    front = set(front_numbers(data))
    knob_ranges = _numeric_knobs(data)
    trials = []
    for t in data.trials:
        values, err, kind = trial_values(data, t)
        for k, _, _ in knob_ranges:
            if finite(t.knobs.get(k)):
                values[f"knob.{k}"] = t.knobs[k]
        trials.append({
            "number": t.number, "state": STATES.get(t.state, t.state.lower()), "method": t.method or "?",
            "baseline": t.baseline, "group": t.baseline or t.method or "?", "label": trial_label(data, t),
            "knobs": t.knobs, "values": values, "err": err, "err_kind": kind, "on_front": t.number in front,
            "seeds": len(t.records), "trial_seconds": t.trial_seconds, "failure": t.failure,
            "machine": machine_text(t.records[0]) if t.records else "not recorded",
            "record": f"trials/{t.number}.json",
        })
    fields = _fields(data, trials, [k for k, _, _ in knob_ranges])
    keys = [f["key"] for f in fields]
    objectives = [m.name for m in data.study.objectives]
    parallel = [{"key": f"knob.{k}", "label": k, "knob": True, "log": False} for k, _, _ in knob_ranges]
    for name in objectives:
        positive = [t["values"][name] for t in trials if finite(t["values"].get(name)) and t["values"][name] > 0]
        parallel.append({"key": name, "label": METRICS[name].label if name in METRICS else name, "knob": False,
                         "log": bool(positive) and max(positive) / min(positive) > 20})
    return _clean({
        "study": data.study.name,
        "objectives": objectives,
        "fields": fields,
        "default_y": keys[0],
        "default_x": keys[1] if len(keys) > 1 else keys[0],
        "methods": sorted({t["method"] for t in trials}),
        "knob_ranges": [{"name": k, "low": lo, "high": hi} for k, lo, hi in knob_ranges],
        "parallel": parallel,
        "symbols": SYMBOLS,
        "colours": COLOURS,
        "trials": trials,
    })


def _write_records(data: StudyData, folder: Path) -> None:
    """``trials/<n>.json`` (each seed's record, as written by the trial) and its ``.js`` twin."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for t in data.trials:
        record = {"trial": t.number, "state": STATES.get(t.state, t.state.lower()), "method": t.method,
                  "baseline": t.baseline, "knobs": t.knobs,
                  "objectives": dict(zip([m.name for m in data.study.objectives], t.values, strict=True))
                  if t.values else None, "failure": t.failure, "trial_seconds": t.trial_seconds,
                  "seeds": list(t.records)}
        text = json.dumps(_clean(record), indent=1)
        (folder / f"{t.number}.json").write_text(text + "\n")
        (folder / f"{t.number}.js").write_text(f"window.qlsearchRecord({text});\n")


def _copy_assets(folder: Path) -> None:
    import plotly

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(plotly.__file__).parent / "package_data" / "plotly.min.js", folder / "plotly.min.js")
    shutil.copyfile(Path(__file__).with_name("explore.js"), folder / "explore.js")


HTML = """<div class="controls">
<label>x axis <select id="axis-x"></select></label>
<label>y axis <select id="axis-y"></select></label>
<span class="group">methods: <span id="filter-methods"></span></span>
<span class="group" id="filter-knobs"></span>
<label>rows containing <input id="filter-text" type="search" placeholder="text"></label>
<button id="download-csv" type="button">Download CSV of what is shown</button><a id="download-link" hidden></a>
</div>
<div id="explore-front" class="plot"></div>
<p id="front-count" class="muted"></p>
<h3>Parallel coordinates: knobs and objectives</h3>
<p class="muted">One line per shown trial, coloured by method, thicker on the Pareto front; click a line for its
record. Objectives spanning more than a factor of 20 are on a log scale.</p>
<div class="scroll"><svg id="explore-parallel" role="img" aria-label="parallel coordinates"></svg></div>
<h3>Trials (click a header to sort, a row for its record)</h3>
<p id="table-count" class="muted"></p>
<div class="scroll"><table id="explore-table"><thead></thead><tbody></tbody></table></div>
<section id="record" hidden><h3 id="record-title"></h3>
<p>Record file: <a id="record-link"></a> (each seed's record as the trial wrote it)</p>
<pre id="record-json"></pre></section>
<noscript><p>The interactive part needs JavaScript; the static figures and tables below do not.</p></noscript>
"""


def explore_section(data: StudyData, folder: Path) -> Section:
    """The interactive section; writes ``assets/`` and ``trials/`` under the report ``folder``."""
    _copy_assets(folder / "assets")
    _write_records(data, folder / "trials")
    blob = json.dumps(page_data(data), separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    html = (HTML + f'<script type="application/json" id="qlsearch-data">{blob}</script>\n'
            '<script src="assets/plotly.min.js"></script>\n<script src="assets/explore.js"></script>')
    paragraphs = [
        "In `index.html`: choose the axes among every recorded numeric metric, filter by method, knob range or text, "
        "hover a point for its configuration, seed mean ± spread and cost, and click a point, line or row "
        "for that trial's record. Error bars are the std over seeds where there are several seeds, else "
        "the spread the record keeps (a timing's interquartile range), else none. Everything here works "
        "from disk: plotly.js and the records ship in this folder. The same study can also be browsed "
        "live with optuna-dashboard (`optuna-dashboard <storage URL above>`)."]
    return Section("explore", "Explore the trials", paragraphs, html=html)
