"""Learning curves: train and validation loss per epoch for each method, mean ± std over seeds,
with the epoch each seed selected (its lowest validation loss) marked.

One line pair per method (a baseline under its label): the method's best completed
configuration on the study's first objective, which is measured on validation, so the
curves never let the test set choose what is drawn. Seeds stopped early have shorter
histories; each epoch is averaged over the seeds that reached it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import NamedTuple

from qlsearch.report._data import (
    FigureRef,
    Section,
    StudyData,
    TrialRow,
    new_figure,
    save_figure,
    trial_label,
)


class Band(NamedTuple):
    """One loss over epochs: the mean over the seeds that reached each epoch, and its std."""

    epochs: list[int]
    mean: list[float]
    std: list[float]  # 0 where one seed reached the epoch


class Curve(NamedTuple):
    number: int
    label: str
    train: Band
    val: Band
    selected: list[tuple[int, float]]  # per seed: (selected epoch, its validation loss)
    seeds: int


class CurvesInfo(NamedTuple):
    curves: list[Curve]
    chosen_by: str  # the objective that picked each method's configuration


def _band(histories: list[dict], key: str) -> Band:
    by_epoch: dict[int, list[float]] = {}
    for h in histories:
        for epoch, value in zip(h.get("epochs") or [], h.get(key) or [], strict=False):
            by_epoch.setdefault(int(epoch), []).append(float(value))
    epochs = sorted(by_epoch)
    mean = [statistics.fmean(by_epoch[e]) for e in epochs]
    std = [statistics.stdev(by_epoch[e]) if len(by_epoch[e]) > 1 else 0.0 for e in epochs]
    return Band(epochs, mean, std)


def _best_per_method(data: StudyData) -> list[TrialRow]:
    """Each method's best completed trial on the first objective (baselines by label), in
    order of first appearance."""
    sign = 1.0 if data.study.directions[0] == "minimize" else -1.0
    best: dict[str, TrialRow] = {}
    for t in data.complete:
        who = t.baseline or t.method or "?"
        if who not in best or sign * t.values[0] < sign * best[who].values[0]:
            best[who] = t
    return list(best.values())


def _get_curves_info(data: StudyData) -> CurvesInfo:
    curves = []
    for t in _best_per_method(data):
        histories = [r["history"] for r in t.records if (r.get("history") or {}).get("val_loss")]
        if not histories:
            continue  # records written before validation existed
        selected = [(h["selected_epoch"], h["val_loss"][h["epochs"].index(h["selected_epoch"])])
                    for h in histories if h.get("selected_epoch") in (h.get("epochs") or [])]
        curves.append(Curve(t.number, trial_label(data, t), _band(histories, "train_loss"),
                            _band(histories, "val_loss"), selected, len(histories)))
    return CurvesInfo(curves, data.study.objectives[0].label)


def _plot_curves(info: CurvesInfo, folder: Path, stem: str) -> None:
    fig, axes = new_figure(1, 1, figsize=(8.5, 4.2))
    ax = axes[0][0]
    for i, curve in enumerate(info.curves):
        color = f"C{i % 10}"
        for band, style, what in ((curve.val, "-", "validation"), (curve.train, "--", "train")):
            ax.plot(band.epochs, band.mean, style, color=color, linewidth=1.3,
                    label=f"{curve.label} ({what}, {curve.seeds} seeds)")
            if any(band.std):
                low = [max(m - s, 1e-12) for m, s in zip(band.mean, band.std, strict=True)]
                high = [m + s for m, s in zip(band.mean, band.std, strict=True)]
                ax.fill_between(band.epochs, low, high, color=color, alpha=0.12, linewidth=0)
        if curve.selected:
            epochs, values = zip(*curve.selected, strict=True)
            ax.plot(epochs, values, "*", color=color, markersize=9, markeredgecolor="black", markeredgewidth=0.5)
    values = [v for c in info.curves for b in (c.train, c.val) for v in b.mean if v > 0]
    if values and max(values) / min(values) > 30:
        ax.set_yscale("log")
        # a band whose mean - std is <= 0 has no log-scale bottom: it runs off the axis there
        ax.set_ylim(min(values) / 3, max(v + s for c in info.curves for b in (c.train, c.val)
                                         for v, s in zip(b.mean, b.std, strict=True)) * 1.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=7, frameon=False)
    save_figure(fig, folder, stem)


def curves_section(data: StudyData, figures: Path) -> Section:
    info = _get_curves_info(data)
    if not info.curves:
        return Section("curves", "Learning curves", ["Learning curves: not recorded — no completed trial has "
                                                      "a validation history (`history.val_loss`)."])
    _plot_curves(info, figures, "learning_curves")
    caption = (f"Train (dashed) and validation (solid) loss per epoch for each method's best configuration "
               f"by {info.chosen_by}; mean over seeds, band ± one std. Stars: the epoch each seed "
               "selected (its lowest validation loss), where its test metrics are read.")
    return Section("curves", "Learning curves", [], [FigureRef("learning_curves", caption)])
