"""Learning curves: per method, train/validation loss over epochs as mean ± std over seeds,
each seed's selected epoch marked; drawn from the records' histories."""

from __future__ import annotations

import math
from datetime import datetime

from qlsearch.report._curves import _get_curves_info, curves_section
from qlsearch.report._data import StudyData, TrialRow
from qlsearch.study import parse_study

STUDY = parse_study({
    "name": "curves", "objectives": ["val_mse", "trainable_params"],
    "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
    "space": {"queryable": {"r": [2, 4]}},
    "baselines": [{"method": "lora", "knobs": {"r": 4}}],
})


def record(seed: int, val: list[float], train: list[float], epochs: list[int] | None = None) -> dict:
    epochs = epochs or list(range(1, len(val) + 1))
    selected = epochs[val.index(min(val))]
    return {"seed": seed, "history": {"epochs": epochs, "train_loss": train, "val_loss": val,
                                      "test_loss": [0.0] * len(val), "selected_epoch": selected}}


def trial(number: int, method: str, value: float, records: list[dict], baseline: str | None = None) -> TrialRow:
    when = datetime(2026, 1, 1)
    return TrialRow(number, "COMPLETE", method, baseline, {}, (value, 100.0), (0.0, 0.0), None, 1.0, when, when,
                    tuple(records))


def data(*trials: TrialRow) -> StudyData:
    return StudyData(STUDY, "sqlite://", tuple(trials), {})


def test_each_method_is_drawn_once_from_its_best_validation_configuration():
    worse = trial(0, "queryable", 0.5, [record(0, [3.0, 2.0], [3.0, 2.0])])
    better = trial(1, "queryable", 0.2, [record(0, [4.0, 1.0, 2.0], [4.0, 1.0, 0.5]),
                                         record(1, [2.0, 3.0, 1.0], [2.0, 1.0, 0.3])])
    lora = trial(2, "lora", 0.3, [record(0, [1.0, 0.5], [1.0, 0.4])], baseline="lora")
    info = _get_curves_info(data(worse, better, lora))
    assert [c.number for c in info.curves] == [1, 2] and info.chosen_by == "validation MSE"
    curve = info.curves[0]
    assert curve.val.epochs == [1, 2, 3] and curve.seeds == 2
    assert curve.val.mean == [3.0, 2.0, 1.5] and curve.train.mean == [3.0, 1.0, 0.4]
    assert math.isclose(curve.val.std[0], math.sqrt(2.0))  # stdev of 4 and 2
    assert curve.selected == [(2, 1.0), (3, 1.0)]  # each seed's own lowest validation loss


def test_seeds_stopped_early_average_over_the_seeds_that_reached_an_epoch(tmp_path):
    short = record(0, [2.0, 1.0], [2.0, 1.0])
    full = record(1, [4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0])
    info = _get_curves_info(data(trial(0, "queryable", 0.1, [short, full])))
    band = info.curves[0].val
    assert band.epochs == [1, 2, 3, 4] and band.mean == [3.0, 2.0, 2.0, 1.0]
    assert band.std[2:] == [0.0, 0.0]
    section = curves_section(data(trial(0, "queryable", 0.1, [short, full])), tmp_path)
    assert section.figures and (tmp_path / "learning_curves.png").stat().st_size > 0


def test_records_without_validation_history_are_said_not_drawn(tmp_path):
    old = {"seed": 0, "history": {"epochs": [1], "train_loss": [1.0], "test_loss": [1.0]}}
    section = curves_section(data(trial(0, "queryable", 0.1, [old])), tmp_path)
    assert not section.figures and "not recorded" in section.paragraphs[0]
