"""Pareto fronts in the style of the paper's Fig. 5, and the hypervolume as trials accumulate.

Fig. 5 plots accuracy against each cost (latency, trainable parameters):
markers are the routing sparsity top-k, marker size the trainable parameter
count, and a dashed curve the non-dominated frontier. Here the first
objective plays accuracy's part against every other objective; baselines are
distinct, labelled points; directions come from each ``Metric``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.ticker import MaxNLocator

from qlsearch.metrics import Metric
from qlsearch.report._data import (
    FigureRef,
    Section,
    StudyData,
    TrialRow,
    front_numbers,
    new_figure,
    non_dominated,
    save_figure,
    seed_values,
)
from qlsearch.report._hypervolume import hypervolume

SEARCHED_MARKERS = ("o", "s", "^", "D", "v", "P", "h", "<", ">", "p")
BASELINE_MARKERS = ("*", "X", "d", "H", "8", "p", "P")
BASELINE_COLOURS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
SIZE_RANGE = (40.0, 320.0)  # marker areas (points^2) for the fewest and most trainable parameters


class FrontPoint(NamedTuple):
    number: int
    values: tuple[float, ...]  # the objectives, in the study's order
    group: str  # the legend entry: "k=2", a method, or a baseline's label
    baseline: str | None
    trainable_params: float | None
    on_front: bool  # non-dominated over all objectives (Optuna's best_trials)


class Panel(NamedTuple):
    """The first objective (y) against objective ``x``; ``frontier``: the trial numbers that
    are non-dominated in this pair, in increasing x (the dashed curve)."""

    x: int
    frontier: list[int]


class FrontInfo(NamedTuple):
    objectives: list[Metric]
    points: list[FrontPoint]
    front: list[int]  # trial numbers of the Pareto front over all objectives
    panels: list[Panel]
    groups: list[str]  # searched groups, in legend order
    baselines: list[str]  # baseline labels, in legend order
    n_failed: int
    n_unfinished: int


class HypervolumeInfo(NamedTuple):
    numbers: list[int]  # completed trials, by trial number
    hypervolume: list[float]  # of the front of the completed trials up to each number
    lower: list[float]  # per objective, the normalisation (in minimisation form)
    upper: list[float]
    reference: float  # the reference point, the same in every normalised objective
    failed: list[int]  # trial numbers that failed (they add nothing)


def _trainable_params(data: StudyData, t: TrialRow) -> float | None:
    names = [m.name for m in data.study.objectives]
    if "trainable_params" in names:
        return t.values[names.index("trainable_params")]
    found = seed_values(t, "profile", "trainable_params")
    return float(np.mean(found)) if found else None


def _group(t: TrialRow, multi_method: bool) -> str:
    if t.baseline:
        return t.baseline
    k = t.knobs.get("top_k")
    if k is None:
        return t.method or "?"
    return f"{t.method} k={k}" if multi_method else f"k={k}"


def _sort_key(group: str):
    """``k=1`` < ``k=2`` < ``k=10``, then names."""
    head, _, tail = group.rpartition("k=")
    return (head, int(tail) if tail.isdigit() else math.inf, group)


def _get_front_info(data: StudyData) -> FrontInfo:
    """The points of every completed trial, the front, and each panel's 2-D frontier."""
    complete = data.complete
    directions = data.study.directions
    multi_method = len({t.method for t in complete if not t.baseline}) > 1
    front = set(front_numbers(data))
    points = [FrontPoint(t.number, t.values, _group(t, multi_method), t.baseline,
                         _trainable_params(data, t), t.number in front) for t in complete]
    panels = []
    for x in range(1, len(directions)):
        pairs = [(p.values[0], p.values[x]) for p in points]
        keep = non_dominated(pairs, [directions[0], directions[x]])
        frontier = sorted((points[i] for i in keep), key=lambda p: (p.values[x], p.values[0], p.number))
        panels.append(Panel(x, [p.number for p in frontier]))
    return FrontInfo(
        objectives=list(data.study.objectives),
        points=points,
        front=sorted(front),
        panels=panels,
        groups=sorted({p.group for p in points if not p.baseline}, key=_sort_key),
        baselines=[b.label for b in data.study.baselines if any(p.baseline == b.label for p in points)]
        + sorted({p.baseline for p in points if p.baseline} - {b.label for b in data.study.baselines}),
        n_failed=sum(t.state == "FAIL" for t in data.trials),
        n_unfinished=sum(t.state in ("RUNNING", "WAITING") for t in data.trials),
    )


def _get_hypervolume_info(data: StudyData, reference: float = 1.1) -> HypervolumeInfo | None:
    """The hypervolume of the front of trials ``0..n`` for each completed ``n``.

    Objectives are put in minimisation form (maximised ones negated) and
    normalised to [0, 1] over all completed trials, so the objectives weigh
    alike and the curve of one study is comparable along its trials; the
    reference point is ``reference`` in every objective (a little worse than
    the worst trial, so the worst still adds volume).
    """
    complete = data.complete
    if len(data.study.objectives) < 2 or not complete:
        return None
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in data.study.directions])
    values = np.array([t.values for t in complete]) * sign
    lower, upper = values.min(axis=0), values.max(axis=0)
    span = np.where(upper > lower, upper - lower, 1.0)
    normalised = (values - lower) / span
    curve = [hypervolume(normalised[: i + 1], np.full(len(sign), reference)) for i in range(len(complete))]
    failed = [t.number for t in data.trials if t.state == "FAIL"]
    return HypervolumeInfo([t.number for t in complete], curve, lower.tolist(), upper.tolist(), reference, failed)


# ---- drawing ------------------------------------------------------------------------------


def _log_scale(values) -> bool:
    values = [v for v in values if v is not None]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def _sizes(info: FrontInfo):
    known = [p.trainable_params for p in info.points if p.trainable_params is not None]
    if not known:
        return lambda v: 80.0, []
    lo, hi = min(known), max(known)

    def size(v):
        if v is None or hi == lo:
            return 80.0
        return SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * math.sqrt((v - lo) / (hi - lo))

    shown = sorted({lo, hi} | ({(lo + hi) / 2} if hi > lo else set()))
    return size, shown


def _style(info: FrontInfo):
    """Marker and colour of each legend entry."""
    style = {g: (SEARCHED_MARKERS[i % len(SEARCHED_MARKERS)], "tab:blue") for i, g in enumerate(info.groups)}
    for i, label in enumerate(info.baselines):
        style[label] = (BASELINE_MARKERS[i % len(BASELINE_MARKERS)], BASELINE_COLOURS[i % len(BASELINE_COLOURS)])
    return style


def _scatter(ax, info: FrontInfo, x: int, y: int, size, style) -> None:
    for p in info.points:
        marker, colour = style[p.group]
        area = size(p.trainable_params) * (2.2 if p.baseline else 1.0)  # a star looks smaller than a disc
        ax.scatter(p.values[x], p.values[y], s=area, marker=marker,
                   facecolor=colour, alpha=0.9 if p.on_front else 0.45,
                   edgecolor="black" if p.on_front else "none", linewidth=1.4, zorder=3)


def _legend_handles(info: FrontInfo, size, shown_sizes, style):
    from matplotlib.lines import Line2D

    def dot(marker, colour, label, ms=8.0, edge="none"):
        return Line2D([], [], linestyle="", marker=marker, markersize=ms, markerfacecolor=colour,
                      markeredgecolor=edge, label=label)

    handles = [dot(style[g][0], style[g][1], g) for g in info.groups]
    handles += [dot(style[b][0], style[b][1], f"{b} (baseline)", ms=12) for b in info.baselines]
    handles.append(dot("o", "white", "on the Pareto front (all objectives)", edge="black"))
    handles.append(Line2D([], [], color="black", linestyle="--", label="non-dominated frontier (this pair)"))
    for v in shown_sizes:
        handles.append(dot("o", "lightgrey", f"{v:,.0f} trainable params", ms=math.sqrt(size(v)), edge="grey"))
    return handles


def _plot_fronts(info: FrontInfo, folder: Path, stem: str) -> None:
    size, shown = _sizes(info)
    style = _style(info)
    by_number = {p.number: p for p in info.points}
    y_metric = info.objectives[0]
    fig, axes = new_figure(1, len(info.panels), figsize=(4.6 * len(info.panels) + 2.8, 4.4))
    for ax, panel in zip(axes[0], info.panels, strict=True):
        _scatter(ax, info, panel.x, 0, size, style)
        line = [by_number[n].values for n in panel.frontier]
        ax.plot([v[panel.x] for v in line], [v[0] for v in line], "k--", linewidth=1.2, zorder=2)
        x_metric = info.objectives[panel.x]
        ax.set_xlabel(f"{x_metric.label} ({_better(x_metric)})")
        ax.set_ylabel(f"{y_metric.label} ({_better(y_metric)})")
        if _log_scale([p.values[panel.x] for p in info.points]):
            ax.set_xscale("log")
        if _log_scale([p.values[0] for p in info.points]):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        ax.set_title(f"{y_metric.label} vs {x_metric.label}", fontsize=10)
    fig.legend(handles=_legend_handles(info, size, shown, style), loc="outside right upper",
               fontsize=8, frameon=False)
    save_figure(fig, folder, stem)


def _better(metric: Metric) -> str:
    return "higher is better" if metric.higher_is_better else "lower is better"


def _plot_third(info: FrontInfo, folder: Path, stem: str) -> None:
    """Three objectives in one view: the two costs on the axes, the first objective as colour."""
    import matplotlib as mpl

    size, shown = _sizes(info)
    style = _style(info)
    first, x_metric, y_metric = info.objectives[0], info.objectives[1], info.objectives[2]
    fig, axes = new_figure(1, 1, figsize=(8.6, 4.8))
    ax = axes[0][0]
    colours = [p.values[0] for p in info.points]
    norm = mpl.colors.Normalize(min(colours), max(colours))
    cmap = mpl.colormaps["viridis_r" if not first.higher_is_better else "viridis"]
    for p in info.points:
        marker, _ = style[p.group]
        area = size(p.trainable_params) * (2.2 if p.baseline else 1.0)
        ax.scatter(p.values[1], p.values[2], s=area, marker=marker, color=cmap(norm(p.values[0])), alpha=0.85,
                   edgecolor="black" if p.on_front else "none", linewidth=1.4, zorder=3)
    if _log_scale([p.values[1] for p in info.points]):
        ax.set_xscale("log")
    if _log_scale([p.values[2] for p in info.points]):
        ax.set_yscale("log")
    ax.set_xlabel(f"{x_metric.label} ({_better(x_metric)})")
    ax.set_ylabel(f"{y_metric.label} ({_better(y_metric)})")
    ax.grid(True, alpha=0.3)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                 label=f"{first.label} (yellow = better)", shrink=0.9)
    handles = [h for h in _legend_handles(info, size, shown, style) if h.get_linestyle() != "--"]
    for h in handles[: len(info.groups) + len(info.baselines)]:  # colour is the first objective here
        h.set_markerfacecolor("grey")
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, folder, stem)


def _plot_matrix(info: FrontInfo, folder: Path, stem: str) -> None:
    """Every pair of objectives (lower triangle), for studies with four or more."""
    n = len(info.objectives)
    size, shown = _sizes(info)
    style = _style(info)
    fig, axes = new_figure(n - 1, n - 1, figsize=(3.1 * (n - 1) + 2.8, 3.0 * (n - 1)))
    for i in range(1, n):
        for j in range(n - 1):
            ax = axes[i - 1][j]
            if j >= i:
                ax.set_axis_off()
                continue
            _scatter(ax, info, j, i, size, style)
            for set_scale, axis, index in ((ax.set_xscale, ax.xaxis, j), (ax.set_yscale, ax.yaxis, i)):
                if _log_scale([p.values[index] for p in info.points]):
                    set_scale("log")
                else:
                    axis.set_major_locator(MaxNLocator(4))
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
            if i == n - 1:
                ax.set_xlabel(info.objectives[j].label, fontsize=9)
            if j == 0:
                ax.set_ylabel(info.objectives[i].label, fontsize=9)
    handles = [h for h in _legend_handles(info, size, shown, style) if h.get_linestyle() != "--"]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, folder, stem)


def _plot_hypervolume(info: HypervolumeInfo, folder: Path, stem: str) -> None:
    fig, axes = new_figure(1, 1, figsize=(6.4, 3.6))
    ax = axes[0][0]
    ax.step(info.numbers, info.hypervolume, where="post", color="tab:blue", marker="o", markersize=4,
            label="completed trial")
    if info.failed:
        ax.scatter(info.failed, [0.0] * len(info.failed), marker="x", color="tab:red", zorder=3,
                   clip_on=False, label="failed trial")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("trial number")
    ax.set_ylabel("hypervolume (normalised objectives)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    save_figure(fig, folder, stem)


# ---- the section ------------------------------------------------------------------------------


def front_section(data: StudyData, figures: Path) -> Section:
    """Fronts (first objective vs each other), the all-pairs view, and the hypervolume curve."""
    info = _get_front_info(data)
    n = len(info.objectives)
    paragraphs = []
    if n < 2:
        return Section("front", "Pareto front", [
            "The study has one objective: there is no trade-off to draw; the best trial is "
            "in the tables below."])
    if not info.points:
        return Section("front", "Pareto front", ["No trial has completed yet: nothing to draw."])
    names = ", ".join(f"#{n}" for n in info.front)
    paragraphs.append(
        f"{len(info.front)} of {len(info.points)} completed trials are on the Pareto front over all "
        f"{n} objectives ({names}); they are outlined in black. Markers show the routing sparsity "
        "top-k (the knob `top_k`) of searched trials, baselines are distinct labelled points, marker "
        "area grows with the trainable parameter count, and the dashed curve is the non-dominated "
        "frontier of each pair of objectives, as in the paper's Fig. 5.")
    hidden = []
    if info.n_failed:
        hidden.append(f"{info.n_failed} failed")
    if info.n_unfinished:
        hidden.append(f"{info.n_unfinished} unfinished")
    if hidden:
        paragraphs.append(f"Not drawn: {' and '.join(hidden)} trial(s) (they have no objective values; "
                          "see the trials table).")
    _plot_fronts(info, figures, "front")
    figs = [FigureRef("front", f"{info.objectives[0].label} against each other objective.")]
    if n == 3:
        _plot_third(info, figures, "front_3d")
        figs.append(FigureRef("front_3d", f"All three objectives: {info.objectives[1].label} and "
                              f"{info.objectives[2].label} on the axes, {info.objectives[0].label} as colour; "
                              "outlined points are the Pareto front over all three."))
    elif n > 3:
        _plot_matrix(info, figures, "front_pairs")
        figs.append(FigureRef("front_pairs", f"All {n} objectives pairwise; outlined points are the "
                                             "Pareto front over all objectives."))
    hv = _get_hypervolume_info(data)
    if hv is not None:
        _plot_hypervolume(hv, figures, "hypervolume")
        bounds = "; ".join(f"{m.name} in [{_plain(lo, hi, m)}]"
                           for m, lo, hi in zip(info.objectives, hv.lower, hv.upper, strict=True))
        figs.append(FigureRef(
            "hypervolume",
            f"Hypervolume of the front as trials accumulate (final {hv.hypervolume[-1]:.4g}). Each "
            f"objective is normalised to [0, 1] over the completed trials ({bounds}), maximised ones "
            f"negated; reference point {hv.reference} in every objective."))
    return Section("front", "Pareto front", paragraphs, figs)


def _plain(lower: float, upper: float, metric: Metric) -> str:
    """The normalisation bounds in the metric's own sign."""
    lo, hi = sorted((-lower, -upper) if metric.higher_is_better else (lower, upper))
    return f"{lo:.4g}, {hi:.4g}"
