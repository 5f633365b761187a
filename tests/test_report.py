"""Report pages of a small real study: every section, the front equals Optuna's, failures shown,
byte-identical regeneration, and the page as headless Chromium renders it."""

from __future__ import annotations

import csv
import hashlib
import math
import os
import subprocess
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
from qlsearch.report._front import _get_front_info, _get_hypervolume_info
from qlsearch.report._hypervolume import _slice_volume, hypervolume
from qlsearch.report._importance import MIN_TRIALS, _get_importance_info
from qlsearch.report._routing import routing_section
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
                      {"method": "lora", "knobs": {"r": 4, "alpha": float("inf")}, "label": "lora-diverges"}],
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
    for key in ("header", "front", "trials", "baselines", "curves", "dynamics", "routing", "importance", "sweeps"):
        assert f'<section id="{key}">' in text
    for what in ("study file", "storage", "trials", "dates", "environment", "hardware", "sweep overhead"):
        assert f"<dt>{what}</dt>" in text
    assert "5 finished, 1 failed, 0 running" in text
    folder = page.parent
    for stem in ("front", "front_3d", "hypervolume", "layer_grad_norms", "gradient_concentration",
                 "atom_usage", "atom_entropy"):
        assert (folder / "figures" / f"{stem}.png").stat().st_size > 0
        assert (folder / "figures" / f"{stem}.svg").stat().st_size > 0
    for stem in ("trials", "front", "baselines", "sweeps"):
        assert (folder / "tables" / f"{stem}.csv").is_file()
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
    assert hv.numbers == [p.number for p in info.points]
    assert all(b >= a for a, b in zip(hv.hypervolume, hv.hypervolume[1:], strict=False))  # never shrinks


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


# ---- the page in a browser ------------------------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links = [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src"))
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={user_data}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="headless Chromium is not installed at /usr/bin/chromium "
                    "(apt-get install -y chromium)")
def test_page_opens_in_headless_chromium_with_every_image(swept, tmp_path):
    from PIL import Image

    _, _, page = swept
    url = page.resolve().as_uri()
    dom = _chromium("--dump-dom", url, user_data=tmp_path / "profile")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Links()
    parsed.feed(dom.stdout)
    assert len(parsed.images) >= 7
    for src in parsed.images:  # relative, present, and a real picture
        assert "://" not in src and not src.startswith("/")
        with Image.open(page.parent / src) as image:
            image.load()
            assert image.width > 0 and image.height > 0
    for href in parsed.links:
        if href.startswith("#"):
            assert f'id="{href[1:]}"' in dom.stdout
            continue
        assert "://" not in href and (page.parent / href).is_file(), href
        if href.endswith(".svg"):
            assert ET.parse(page.parent / href).getroot().tag.endswith("svg")
    shot = tmp_path / "report.png"
    result = _chromium("--hide-scrollbars", "--window-size=1280,4000", f"--screenshot={shot}", url,
                       user_data=tmp_path / "profile")
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text and figures, not a blank page
