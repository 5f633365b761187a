"""Report pages of a small real study: every section, the front equals Optuna's, failures shown,
byte-identical regeneration, and the page as headless Chromium renders it."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import statistics
import xml.etree.ElementTree as ET
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import optuna
import pytest

from qlsearch.report import write_report
from qlsearch.report._data import TrialRow, dominates, load_study_data
from qlsearch.report._dynamics import dynamics_section
from qlsearch.report._explore import page_data
from qlsearch.report._front import _get_front_info, _get_hypervolume_info
from qlsearch.report._hypervolume import _slice_volume, hypervolume
from qlsearch.report._importance import MIN_TRIALS, _get_importance_info
from qlsearch.report._routing import routing_section
from qlsearch.report._tables import agreement
from qlsearch.study import parse_study

ray = pytest.importorskip("ray")
CHROMIUM = Path("/usr/bin/chromium")


def small_study(tmp: Path):
    return parse_study({
        "name": "small", "description": "Queryable LoRA vs LoRA on Sin-Cos (report test)",
        "objectives": ["val_mse", "forward_ms", "trainable_params"],
        "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
        "train": {"epochs": 3, "pretrain_epochs": 1, "batch_size": 200},
        "space": {"queryable": {"r": [2, 4], "num_atoms": [2, 4], "top_k": [1, 2, 4], "num_blocks": 2,
                                "d_k": 8}},
        "seeds": [0, 1], "num_trials": 4,
        "baselines": [{"method": "lora", "knobs": {"r": 4}},
                      {"method": "lora", "knobs": {"r": 2, "lr": 1e30}, "label": "lora-diverges"}],
        "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
        "cache_dir": str(tmp / "cache"),
    })


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One real sweep (4 searched trials + 2 baselines, one of them diverging), reported once."""
    tmp = tmp_path_factory.mktemp("report")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        from qlsearch.search import run_sweep

        study = small_study(tmp)
        run_sweep(study, root=tmp / "runs", verbose=False)
    finally:
        ray.shutdown()
    page = write_report(study, root=tmp / "runs", out=tmp / "reports")
    return study, tmp, page


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_report_has_every_section(swept):
    study, tmp, page = swept
    assert page == tmp / "reports" / "small" / "index.html"
    text = page.read_text()
    for key in ("header", "explore", "front", "trials", "baselines", "curves", "dynamics", "routing",
                "importance", "sweeps"):
        assert f'<section id="{key}">' in text
    for what in ("study file", "storage", "trials", "dates", "coverage", "budget per method", "seeds",
                 "environment", "hardware", "sweep overhead", "implementation"):
        assert f"<dt>{what}</dt>" in text
    # forward_ms beside LoRA: the page says what queryable's layers do that PEFT's do not
    assert "queryable: its layers run one GEMM for the A of a unit&#x27;s Q, K and V" in text
    assert "5 finished, 1 failed, 0 running" in text
    folder = page.parent
    data = load_study_data(study, tmp / "runs")
    routed = [t.number for t in data.complete if t.method == "queryable"]
    for stem in ("front", "front_3d", "layer_grad_norms", "gradient_concentration", "atom_entropy",
                 *(f"atom_usage_{n}" for n in routed)):
        for suffix in ("png", "svg", "pdf"):
            assert (folder / "figures" / f"{stem}.{suffix}").stat().st_size > 0, (stem, suffix)
    for stem in ("trials", "front", "baselines", "sweeps"):
        assert (folder / "tables" / f"{stem}.csv").is_file()
    for t in data.trials:  # every trial's record, as JSON and as the script the page loads
        record = json.loads((folder / "trials" / f"{t.number}.json").read_text())
        assert record["trial"] == t.number and len(record["seeds"]) == len(t.records)
        assert (folder / "trials" / f"{t.number}.js").read_text().startswith("window.qlsearchRecord(")
    # r in {2, 4} x (M = 2: k in {1, 2}; M = 4: k in {1, 2, 4}) = 2 x 5 grid points
    distinct = {json.dumps(t.knobs, sort_keys=True) for t in data.trials if not t.baseline}
    assert f"queryable: {len(distinct)} of the space&#x27;s 10 grid points run" in text
    assert "seeds</dt><dd>2 (0, 1)" in text
    # the study's storage and machines, as the records say: no absolute path of this machine
    assert str(tmp) not in text.split('<section id="explore">')[0]
    with open("/proc/cpuinfo") as fh:
        cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    assert cpu in text and "(every trial), from the trial records" in text
    # four searched trials: too few for a hypervolume history or importances, and the page says so
    assert "Hypervolume history: not drawn, 4 searched trial(s)" in text
    assert not (folder / "figures" / "hypervolume.png").exists()
    # the mlp synthetic study repeats the paper's deep-narrow stress test (Tables 9/10)
    assert "paper Table 10: test MSE" in text and "scale may differ" in text
    markdown = (folder / "report.md").read_text()
    for title in ("## Pareto front", "## Trials", "## Baselines", "## Optimisation dynamics",
                  "## Routing: atom usage", "## Knob importance", "## Sweeps"):
        assert title in markdown
    # four searched trials are too few for importances: said, not crashed
    assert f"at least {MIN_TRIALS}" in text


def test_front_figure_points_are_optunas_best_trials(swept):
    study, tmp, _ = swept
    data = load_study_data(study, tmp / "runs")
    info = _get_front_info(data)
    best = optuna.load_study(study_name="small", storage=study.storage_url(tmp / "runs")).best_trials
    assert info.front == sorted(t.number for t in best)
    assert {p.number for p in info.points if p.on_front} == set(info.front)
    directions = study.directions
    for panel in info.panels:  # the dashed curve: non-dominated in its own pair of objectives
        pair = [directions[0], directions[panel.x]]
        values = {p.number: (p.values[0], p.values[panel.x]) for p in info.points}
        for n in panel.frontier:
            assert not any(dominates(v, values[n], pair) for m, v in values.items() if m != n)
    assert info.baselines == ["lora"]  # the diverged baseline has no point
    hv = _get_hypervolume_info(data)
    assert hv.numbers == [p.number for p in info.points if not p.baseline]  # baselines are no search step
    assert all(b >= a for a, b in zip(hv.hypervolume, hv.hypervolume[1:], strict=False))  # never shrinks
    assert hv.random is None  # no small-random study in the storage


def test_hypervolume_has_the_random_search_reference_when_stored(swept, tmp_path):
    """``<study>-random`` in the same storage is drawn on the same normalisation: its curve is
    the hypervolume of its own searched trials, step by step, its baselines left out."""
    import shutil

    study, tmp, _ = swept
    data = load_study_data(study, tmp / "runs")
    shutil.copyfile(tmp / "runs" / "small" / "study.db", tmp_path / "study.db")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    random = optuna.create_study(study_name="small-random", storage=url, directions=study.directions)
    steps = [(0.5, 1.0, 100.0), (0.2, 2.0, 50.0), (0.9, 0.5, 10.0)]
    for values in steps:
        random.add_trial(optuna.trial.create_trial(values=list(values)))
    random.add_trial(optuna.trial.create_trial(values=[0.0, 0.0, 0.0], user_attrs={"baseline": "lora"}))
    hv = _get_hypervolume_info(data._replace(storage_url=url))
    assert hv.random_name == "small-random" and len(hv.random) == len(steps)
    lower, upper = np.array(hv.lower), np.array(hv.upper)  # all three objectives are minimised
    normalised = (np.array(steps) - lower) / np.where(upper > lower, upper - lower, 1.0)
    for i, got in enumerate(hv.random):  # points beyond the reference add nothing
        inside = normalised[: i + 1][np.all(normalised[: i + 1] < 1.1, axis=1)]
        assert got == pytest.approx(_slice_volume(inside, np.full(3, 1.1)) if len(inside) else 0.0)


def test_failed_trials_appear_as_failed(swept):
    study, tmp, page = swept
    with open(page.parent / "tables" / "trials.csv") as fh:
        rows = {r["baseline"]: r for r in csv.DictReader(fh)}
    diverged = rows["lora-diverges"]
    assert diverged["state"] == "failed" and "diverged" in diverged["failure"]
    assert diverged["val_mse"] == "" and diverged["on_front"] == "False"
    text = page.read_text()
    assert '<tr class="failed">' in text and "non-finite training loss" in text
    with open(page.parent / "tables" / "baselines.csv") as fh:
        baselines = {r["row"]: r for r in csv.DictReader(fh)}
    assert baselines["lora-diverges"]["state"] == "failed"
    assert baselines["lora"]["state"] == "completed" and baselines["lora"]["paper Table 10: test MSE"]


def test_paper_numbers_as_ratios_to_lora(swept):
    """Ours and the paper's, each divided by its own LoRA on the same task (paper Table 10)."""
    from qlsearch.baselines import paper_table

    study, tmp, page = swept
    with open(page.parent / "tables" / "baselines.csv") as fh:
        rows = {r["row"]: r for r in csv.DictReader(fh)}
    trials = _trials_csv(page.parent)
    paper = paper_table(10)
    paper = {r.method: r.mean for r in paper[paper.function == "sin_cos"].itertuples()}
    def test_mse(row: dict) -> float:  # ours: the seed mean of the trial records' test MSE
        records = [json.loads(p.read_text()) for p in
                   sorted((tmp / "runs" / "small" / "trials").glob("*/seed*.json"))]
        number = int(row["trial"])
        assert trials[number]["state"] == "completed"
        mine = [r for r in records if r["config"]["knobs"] == json.loads(trials[number]["knobs"])
                and r.get("baseline") == (trials[number]["baseline"] or None)]
        return statistics.fmean(r["metrics"]["test_mse"] for r in mine)

    lora_mse = test_mse(rows["lora"])
    assert float(rows["lora"]["ours/lora test_mse"]) == pytest.approx(1.0)
    assert float(rows["lora"]["paper/lora test_mse"]) == pytest.approx(1.0)
    best = next(r for label, r in rows.items() if label.startswith("best searched queryable"))
    ours = test_mse(best) / lora_mse
    assert float(best["ours/lora test_mse"]) == pytest.approx(ours)
    assert float(best["paper/lora test_mse"]) == pytest.approx(paper["queryable"] / paper["lora"])
    assert best["agree test_mse"] == agreement(ours, paper["queryable"] / paper["lora"])


def test_agreement_of_ratios():
    assert agreement(0.464, 0.405) == "yes"  # the example: both better than LoRA
    assert agreement(1.8, 3.0) == "yes"
    assert agreement(0.5, 2.0) == "no"
    assert agreement(1.05, 0.95) == "yes"  # both as good as LoRA (within 10%)
    assert agreement(1.05, 0.5) == "no"
    assert agreement(None, 0.5) == ""


def test_regenerating_gives_identical_files(swept):
    study, tmp, page = swept
    before = _files(page.parent)
    write_report(study, root=tmp / "runs", out=tmp / "reports")
    assert _files(page.parent) == before


def test_sections_say_not_recorded_without_the_data(swept):
    study, tmp, _ = swept
    data = load_study_data(study, tmp / "runs")
    bare = data._replace(trials=tuple(t._replace(records=()) for t in data.trials))
    dynamics = dynamics_section(bare, tmp / "unused")
    routing = routing_section(bare, tmp / "unused")
    assert not dynamics.figures and all("not recorded" in p for p in dynamics.paragraphs)
    assert not routing.figures and "not recorded" in routing.paragraphs[0]


def test_unknown_study_is_a_clear_error(tmp_path):
    study = small_study(tmp_path)
    (tmp_path / "runs" / "small").mkdir(parents=True)
    with pytest.raises(ValueError, match="not found"):
        write_report(study, root=tmp_path / "runs", out=tmp_path / "reports")


# ---- pieces -------------------------------------------------------------------------------------


def test_hypervolume_equals_the_exact_slicing_volume():
    rng = np.random.default_rng(0)
    assert hypervolume([[1.0, 2.0], [2.0, 1.0]], [3.0, 3.0]) == pytest.approx(3.0)
    assert hypervolume([[0.5, 0.5, 0.5]], [1.0, 1.0, 1.0]) == pytest.approx(0.125)
    for dim in (2, 3):
        points = rng.random((12, dim))
        reference = np.full(dim, 1.1)
        assert hypervolume(points, reference) == pytest.approx(_slice_volume(points, reference))


def _row(number: int, knobs: dict, values: tuple) -> TrialRow:
    when = datetime(2026, 1, 1)
    return TrialRow(number, "COMPLETE", "queryable", None, knobs, values, (0.0,) * len(values), None, 1.0,
                    when, when, ())


def test_importance_per_objective_when_enough_trials(swept):
    study, tmp, _ = swept
    data = load_study_data(study, tmp / "runs")
    grid = [(r, k) for k in (1, 2, 4) for r in (2, 4)] * 3  # the MSE follows k, the parameters follow r
    rows = [_row(i, {"r": r, "top_k": k, "num_blocks": 2}, (float(k) + 0.01 * i, 5.0 + k, 100.0 * r + i))
            for i, (r, k) in enumerate(grid)]
    info = _get_importance_info(data._replace(trials=tuple(rows)))
    assert info.reason is None and info.knobs == ["r", "top_k"]
    assert set(info.importances) == {"val_mse", "forward_ms", "trainable_params", "Pareto front"}
    for values in info.importances.values():
        assert math.isclose(sum(values.values()), 1.0, abs_tol=1e-6)
    assert info.importances["val_mse"]["top_k"] > info.importances["val_mse"]["r"]
    assert info.importances["trainable_params"]["r"] > info.importances["trainable_params"]["top_k"]


def test_page_data_is_generic_over_recorded_metrics(swept):
    """A metric no code here knows (``val_accuracy``) and a recorded ``*_std`` become axes and
    error bars; the std over seeds is the sample std of the seed values."""
    study, tmp, _ = swept
    data = load_study_data(study, tmp / "runs")

    def with_new_fields(x):
        return x._replace(records=tuple(
            {**r, "metrics": {**r["metrics"], "val_accuracy": 0.5 + 0.1 * i + 0.01 * x.number},
             "profile": {**r["profile"], "forward_ratio": 1.0 + 0.1 * x.number, "forward_ratio_std": 0.05}}
            for i, r in enumerate(x.records[:1] if x is one_seed else x.records)))

    t, one_seed = data.complete[0], data.complete[1]
    seeds = with_new_fields(t).records
    blob = page_data(data._replace(trials=tuple(with_new_fields(x) for x in data.trials)))
    keys = [f["key"] for f in blob["fields"]]
    assert keys[:3] == ["val_mse", "forward_ms", "trainable_params"] and "val_accuracy" in keys
    row = next(r for r in blob["trials"] if r["number"] == t.number)
    values = [0.5 + 0.1 * i + 0.01 * t.number for i in range(len(seeds))]
    assert row["values"]["val_accuracy"] == pytest.approx(statistics.fmean(values))
    assert row["err"]["val_accuracy"] == pytest.approx([statistics.stdev(values)] * 2)
    assert row["err_kind"]["val_accuracy"] == f"std over {len(seeds)} seeds"
    assert "forward_ratio" in keys and "forward_ratio_std" not in keys
    single = next(r for r in blob["trials"] if r["number"] == one_seed.number)  # one seed: the record's std
    assert single["err"]["forward_ratio"] == [0.05, 0.05] and single["err_kind"]["forward_ratio"] == "recorded std"
    json.dumps(blob, allow_nan=False)  # what JSON.parse reads: no NaN or Infinity (a diverged trial has them)


# ---- the page in a browser ------------------------------------------------------------------------

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed at "
                                    "/usr/bin/chromium (apt-get install -y chromium, as .ci/run does)")


def _shots(tmp_path: Path) -> Path:
    """Where screenshots go: $QLSEARCH_SCREENSHOTS (to keep them) or the test's tmp folder."""
    folder = Path(os.environ.get("QLSEARCH_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _not_blank(png: Path) -> None:
    from PIL import Image

    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=float)
    grey = pixels.mean(axis=2)
    assert grey.std() > 10 and len(np.unique(grey)) > 50, f"{png} looks blank"


def _points(page) -> dict[int, dict]:
    """Trial number -> bounding box of its one element on the front."""
    found = page.eval_on_selector_all(
        "#explore-front [data-trial]",
        "els => els.map(e => { const b = e.getBoundingClientRect();"
        " return [e.dataset.trial, b.x + b.width / 2, b.y + b.height / 2]; })")
    numbers = [int(n) for n, _, _ in found]
    assert len(numbers) == len(set(numbers)), "one element per trial"
    return {int(n): {"x": x, "y": y} for n, x, y in found}


def _click_point(page, number: int) -> None:
    """A real mouse click on the centre of trial ``number``'s point (plotly picks the nearest)."""
    page.locator("#explore-front").scroll_into_view_if_needed()
    centre = _points(page)[number]
    page.mouse.move(centre["x"] - 6, centre["y"] - 6)
    page.mouse.move(centre["x"], centre["y"])
    page.mouse.click(centre["x"], centre["y"])
    page.wait_for_selector(f'#record[data-trial="{number}"]', state="visible", timeout=10_000)


def _lonely(points: dict[int, dict], gap: float = 14.0) -> list[int]:
    """Trials whose point has no other within ``gap`` px, so a click there can only mean it."""
    return [n for n, p in points.items()
            if all(abs(p["x"] - q["x"]) + abs(p["y"] - q["y"]) > gap for m, q in points.items() if m != n)]


def _drive(page_path: Path, trials: dict[int, dict], shots: Path, name: str) -> None:
    """Open the page, check it, change an axis, filter, and click through to trial records.

    ``trials``: trial number -> its row of ``tables/trials.csv`` (written by the Python side,
    independent of the page's JavaScript).
    """
    from playwright.sync_api import sync_playwright

    complete = {n for n, row in trials.items() if row["state"] == "completed"}
    problems: list[str] = []
    loaded: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"failed to load {r.url}"))
            page.on("requestfinished", lambda r: loaded.append(r.url))
            page.goto(page_path.resolve().as_uri())
            page.wait_for_selector("body[data-explore=ready]", timeout=60_000)

            # renders: one element per completed trial on the front, every image decoded
            assert set(_points(page)) == complete
            assert page.eval_on_selector_all("img", "els => els.filter(e => !e.complete || "
                                                    "e.naturalWidth === 0).map(e => e.src)") == []
            assert any(u.endswith("assets/plotly.min.js") for u in loaded)
            assert any(u.endswith("assets/explore.js") for u in loaded)
            page.screenshot(path=shots / f"{name}-page.png", full_page=True)
            _not_blank(shots / f"{name}-page.png")

            # another x axis redraws the front: new title, same trials, points moved
            before = _points(page)
            options = page.eval_on_selector_all("#axis-x option", "els => els.map(e => [e.value, e.textContent])")
            current = page.eval_on_selector("#axis-x", "e => e.value")
            other, label = next((v, t) for v, t in options if v == "trainable_params" and v != current)
            page.select_option("#axis-x", other)
            page.wait_for_function(f"document.getElementById('explore-front').dataset.x === '{other}'")
            assert page.text_content("#explore-front .xtitle").startswith(label)
            after = _points(page)
            assert set(after) == complete
            assert any(abs(after[n]["x"] - before[n]["x"]) > 1 for n in complete)
            page.locator("#explore-front").screenshot(path=shots / f"{name}-front.png")
            _not_blank(shots / f"{name}-front.png")

            # filter by method: the baselines' method goes, from the front and the table
            # (or, where every method was searched alike, the last of them)
            method = next((row["method"] for row in trials.values() if row["baseline"]),
                          sorted({row["method"] for row in trials.values()})[-1])
            page.uncheck(f'#filter-methods input[data-method="{method}"]')
            kept = {n for n in complete if trials[n]["method"] != method}
            assert set(_points(page)) == kept
            rows = page.eval_on_selector_all("#explore-table tbody tr", "els => els.map(e => +e.dataset.trial)")
            assert set(rows) == {n for n, row in trials.items() if row["method"] != method}
            page.check(f'#filter-methods input[data-method="{method}"]')
            assert set(_points(page)) == complete

            # filter by a knob's range: up to its smallest value keeps the trials with that value or none
            knob = page.eval_on_selector("#filter-knobs input[id$='-max']", "e => e.id")[len("knob-"):-len("-max")]
            values = {n: json.loads(row["knobs"]).get(knob) for n, row in trials.items()}
            low = min(v for v in values.values() if isinstance(v, int | float))
            page.fill(f"#knob-{knob}-max", str(low))
            within = {n for n, v in values.items() if not isinstance(v, int | float) or v <= low}
            assert set(_points(page)) == within & complete != complete

            # the CSV of what is shown: those trials, full precision
            with page.expect_download() as download:
                page.click("#download-csv")
            with open(download.value.path()) as fh:
                rows = list(csv.DictReader(fh))
            assert {int(r["number"]) for r in rows} == within
            first = next(iter(trials.values()))
            objective = next(k for k in first if k in ("val_mse", "val_accuracy"))
            for r in rows:
                if r[objective]:
                    assert float(r[objective]) == float(trials[int(r["number"])][objective])
            page.fill(f"#knob-{knob}-max", "")
            assert set(_points(page)) == complete

            # hover: the configuration and the objectives with their spread
            number = sorted(_lonely(_points(page)))[0]
            centre = _points(page)[number]
            page.mouse.move(centre["x"] - 6, centre["y"] - 6)
            page.mouse.move(centre["x"], centre["y"])
            page.wait_for_selector("#explore-front .hovertext", timeout=10_000)
            assert f"trial #{number}" in page.text_content("#explore-front .hovertext")

            # click a point through to its record: the trial's own seed records, shown and linked
            _click_point(page, number)
            shown = json.loads(page.text_content("#record-json"))
            record_file = page_path.parent / page.get_attribute("#record-link", "href")
            assert shown["trial"] == number and shown == json.loads(record_file.read_text())
            assert len(shown["seeds"]) == int(trials[number]["seeds"])
            page.screenshot(path=shots / f"{name}-record.png")
            _not_blank(shots / f"{name}-record.png")

            # and a table row (sorted by a header click) opens its trial too
            page.click('#explore-table th[data-key="number"]')
            last = max(trials)
            page.click(f'#explore-table tbody tr[data-trial="{last}"]')
            page.wait_for_selector(f'#record[data-trial="{last}"]', timeout=10_000)
        finally:
            browser.close()
    assert problems == []


def _trials_csv(folder: Path) -> dict[int, dict]:
    with open(folder / "tables" / "trials.csv") as fh:
        return {int(r["number"]): r for r in csv.DictReader(fh)}


@needs_chromium
def test_page_in_headless_chromium(swept, tmp_path):
    """The study's report: axes, filters and clicks through to records, in a real browser."""
    _, _, page = swept
    _drive(page, _trials_csv(page.parent), _shots(tmp_path), "small")


@needs_chromium
def test_committed_quickstart_report_in_headless_chromium(tmp_path):
    """``make quickstart``'s report as committed (reports/quickstart/index.html) works the same."""
    page = Path(__file__).resolve().parents[1] / "reports" / "quickstart" / "index.html"
    _drive(page, _trials_csv(page.parent), _shots(tmp_path), "quickstart")


def test_page_links_are_relative_and_present(swept):
    _, _, page = swept
    parsed = _Links()
    parsed.feed(page.read_text())
    assert len(parsed.images) >= 6
    for ref in [*parsed.images, *parsed.links, *parsed.scripts]:
        if ref.startswith("#"):
            assert f'id="{ref[1:]}"' in page.read_text()
            continue
        assert "://" not in ref and not ref.startswith("/") and (page.parent / ref).is_file(), ref
        if ref.endswith(".svg"):
            assert ET.parse(page.parent / ref).getroot().tag.endswith("svg")
        if ref.endswith(".pdf"):
            assert (page.parent / ref).read_bytes().startswith(b"%PDF")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.scripts = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src"))
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        elif tag == "script" and attrs.get("src"):
            self.scripts.append(attrs["src"])
