"""Optimisation dynamics: per-layer adapter gradient norms (paper Fig. 3) and the gradient
concentration index, max/mean of those norms, over epochs (Fig. 4).

Both come from the trial records (``metrics.layer_grad_norms``: the last
epoch's norms; ``history.concentration``: one value per evaluated epoch),
averaged over seeds, for the featured trials (baselines and the front).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

from matplotlib.ticker import MaxNLocator

from qlsearch.report._data import (
    FigureRef,
    Section,
    StudyData,
    elementwise_mean,
    featured,
    new_figure,
    save_figure,
    trial_label,
)


class LayerNorms(NamedTuple):
    number: int
    label: str
    mean: list[float]  # per layer, over seeds
    std: list[float]


class Concentration(NamedTuple):
    number: int
    label: str
    epochs: list[int]
    mean: list[float]  # per epoch, over seeds


class DynamicsInfo(NamedTuple):
    layer_norms: list[LayerNorms]
    concentration: list[Concentration]


def _std(rows: list[list[float]], mean: list[float]) -> list[float]:
    if len(rows) < 2:
        return [0.0] * len(mean)
    return [math.sqrt(sum((r[i] - m) ** 2 for r in rows) / (len(rows) - 1)) for i, m in enumerate(mean)]


def _get_dynamics_info(data: StudyData) -> DynamicsInfo:
    norms, concentration = [], []
    for t in featured(data):
        label = trial_label(data, t)
        rows = [r["metrics"]["layer_grad_norms"] for r in t.records if r.get("metrics", {}).get("layer_grad_norms")]
        mean = elementwise_mean(rows)
        if mean:
            norms.append(LayerNorms(t.number, label, mean, _std(rows, mean)))
        histories = [r.get("history") or {} for r in t.records]
        series = [h["concentration"] for h in histories if h.get("concentration")]
        mean = elementwise_mean(series)
        epochs = next((h.get("epochs") for h in histories if h.get("concentration")), None)
        if mean and epochs and len(epochs) == len(mean):
            concentration.append(Concentration(t.number, label, list(epochs), mean))
    return DynamicsInfo(norms, concentration)


def _finish(fig, ax, xlabel: str, ylabel: str, folder: Path, stem: str) -> None:
    """Integer x ticks, labels, a light grid, the legend below (one column wide); then save."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, frameon=False)
    save_figure(fig, folder, stem)


def _plot_layer_norms(info: DynamicsInfo, folder: Path, stem: str) -> None:
    fig, axes = new_figure(1, 1, figsize=(3.5, 3.6))
    ax = axes[0][0]
    for line in info.layer_norms:
        layers = range(1, len(line.mean) + 1)
        ax.plot(layers, line.mean, marker="o", markersize=3, linewidth=1.3, label=line.label)
        if any(line.std):
            low = [max(m - s, 1e-12) for m, s in zip(line.mean, line.std, strict=True)]
            high = [m + s for m, s in zip(line.mean, line.std, strict=True)]
            ax.fill_between(layers, low, high, alpha=0.1)
    values = [v for line in info.layer_norms for v in line.mean if v > 0]
    if values and max(values) / min(values) > 50:
        ax.set_yscale("log")
    _finish(fig, ax, "adapted layer (input to output)", "adapter gradient norm (last epoch)", folder, stem)


def _plot_concentration(info: DynamicsInfo, folder: Path, stem: str) -> None:
    fig, axes = new_figure(1, 1, figsize=(3.5, 3.4))
    ax = axes[0][0]
    for line in info.concentration:
        ax.plot(line.epochs, line.mean, marker="o", markersize=3, linewidth=1.3, label=line.label)
    _finish(fig, ax, "epoch", "gradient concentration index (max/mean)", folder, stem)


def dynamics_section(data: StudyData, figures: Path) -> Section:
    info = _get_dynamics_info(data)
    paragraphs, figs = [], []
    if info.layer_norms:
        _plot_layer_norms(info, figures, "layer_grad_norms")
        figs.append(FigureRef("layer_grad_norms", "Per-layer adapter gradient norms after post-training "
                              "(paper Fig. 3), mean over seeds (band: ± one std)."))
    else:
        paragraphs.append("Per-layer gradient norms (Fig. 3): not recorded — no completed baseline or "
                          "front trial has `metrics.layer_grad_norms` in its records.")
    if info.concentration:
        _plot_concentration(info, figures, "gradient_concentration")
        figs.append(FigureRef("gradient_concentration", "Gradient concentration index, max/mean of the "
                              "per-layer norms, across epochs (paper Fig. 4), mean over seeds; lower = "
                              "learning spread over more layers."))
    else:
        paragraphs.append("Gradient concentration over epochs (Fig. 4): not recorded — no record has "
                          "`history.concentration`.")
    if figs:
        paragraphs.insert(0, "Drawn for the completed baselines and the Pareto front's trials (at most "
                             "eight), averaged over seeds.")
    return Section("dynamics", "Optimisation dynamics", paragraphs, figs)
