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
    axis_label,
    front_numbers,
    new_figure,
    non_dominated,
    save_figure,
    seed_values,
    trial_label,
    trial_values,
)
from qlsearch.report._hypervolume import hypervolume

SEARCHED_MARKERS = ("o", "s", "^", "D", "v", "P", "h", "<", ">", "p")
BASELINE_MARKERS = ("*", "X", "d", "H", "8", "p", "P")
BASELINE_COLOURS = ("tab:red", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
SIZE_RANGE = (20.0, 160.0)  # marker areas (points^2) for the fewest and most trainable parameters


class FrontPoint(NamedTuple):
    number: int
    values: tuple[float, ...]  # the objectives, in the study's order
    group: str  # the legend entry: "k=2", a method, or a baseline's label
    baseline: str | None
    trainable_params: float | None
    on_front: bool  # non-dominated over all objectives (Optuna's best_trials)
    errors: tuple[tuple[float, float] | None, ...] = ()  # per objective: (minus, plus), None: not measured
    label: str = ""  # "#3 r=4 M=4": the number and the knobs that vary (a baseline: its label)


class Panel(NamedTuple):
    """The first objective (y) against objective ``x``; ``frontier``: the trial numbers that
    are non-dominated in this pair, in increasing x (the dashed curve)."""

    x: int
    frontier: list[int]


class FrontInfo(NamedTuple):
    objectives: list[Metric]
    labels: list[str]  # axis labels, with units (latency: and the batch it was timed at)
    points: list[FrontPoint]
    front: list[int]  # trial numbers of the Pareto front over all objectives
    panels: list[Panel]
    groups: list[str]  # searched groups, in legend order
    baselines: list[str]  # baseline labels, in legend order
    n_failed: int
    n_unfinished: int


class HypervolumeInfo(NamedTuple):
    numbers: list[int]  # completed searched trials (baselines are no search step), by trial number
    hypervolume: list[float]  # of the front of the searched trials up to each one
    lower: list[float]  # per objective, the normalisation (in minimisation form)
    upper: list[float]
    reference: float  # the reference point, the same in every normalised objective
    failed: list[int]  # search steps (1-based) whose trial failed (they add nothing)
    random: list[float] | None  # the same curve of the study's random-search reference, if it has one
    random_name: str | None


#: Fewer searched trials and the hypervolume curve is not drawn: a handful of steps says
#: nothing about how a search converges.
MIN_HYPERVOLUME_TRIALS = 10


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
    names = [m.name for m in data.study.objectives]
    points = []
    for t in complete:
        errors = trial_values(data, t)[1]
        label = trial_label(data, t) if multi_method or t.baseline else \
            trial_label(data, t).replace(f" {t.method}", "", 1)
        points.append(FrontPoint(t.number, t.values, _group(t, multi_method), t.baseline,
                                 _trainable_params(data, t), t.number in front,
                                 tuple(tuple(errors[n]) if n in errors else None for n in names), label))
    panels = []
    for x in range(1, len(directions)):
        pairs = [(p.values[0], p.values[x]) for p in points]
        keep = non_dominated(pairs, [directions[0], directions[x]])
        frontier = sorted((points[i] for i in keep), key=lambda p: (p.values[x], p.values[0], p.number))
        panels.append(Panel(x, [p.number for p in frontier]))
    return FrontInfo(
        objectives=list(data.study.objectives),
        labels=[axis_label(data, m.name) for m in data.study.objectives],
        points=points,
        front=sorted(front),
        panels=panels,
        groups=sorted({p.group for p in points if not p.baseline}, key=_sort_key),
        baselines=[b.label for b in data.study.baselines if any(p.baseline == b.label for p in points)]
        + sorted({p.baseline for p in points if p.baseline} - {b.label for b in data.study.baselines}),
        n_failed=sum(t.state == "FAIL" for t in data.trials),
        n_unfinished=sum(t.state in ("RUNNING", "WAITING") for t in data.trials),
    )


def _random_reference(data: StudyData) -> tuple[str, list[tuple[float, ...]]] | None:
    """The completed objective values, in trial order, of ``<study>-random`` in the same
    storage: the study run again with ``sampler = "random"`` (same objectives), if it was."""
    import optuna

    from qlsearch._storage import open_storage

    name = f"{data.study.name}-random"
    try:
        storage = open_storage(data.storage_url)
        if name not in optuna.get_all_study_names(storage=storage):
            return None
        other = optuna.load_study(study_name=name, storage=storage)
    except Exception:  # noqa: BLE001  (no reference is not an error of this study)
        return None
    done = [t for t in other.get_trials(deepcopy=False) if t.state.name == "COMPLETE"
            and t.values is not None and len(t.values) == len(data.study.objectives)
            and not t.user_attrs.get("baseline")]
    return name, [tuple(t.values) for t in sorted(done, key=lambda t: t.number)]


def _get_hypervolume_info(data: StudyData, reference: float = 1.1) -> HypervolumeInfo | None:
    """The hypervolume of the front of the searched trials up to each completed one.

    Objectives are put in minimisation form (maximised ones negated) and
    normalised to [0, 1] over all completed trials, baselines included, so the
    objectives weigh alike and the curve of one study is comparable along its
    trials; the reference point is ``reference`` in every objective (a little
    worse than the worst trial, so the worst still adds volume). Baselines are
    enqueued settings, not search steps: they only set the normalisation. A
    random-search reference study (``<study>-random``) is drawn on the same scale.
    """
    searched = [t for t in data.trials if not t.baseline and t.state in ("COMPLETE", "FAIL")]
    complete = [t for t in searched if t.complete]
    if len(data.study.objectives) < 2 or not complete:
        return None
    sign = np.array([1.0 if d == "minimize" else -1.0 for d in data.study.directions])
    values = np.array([t.values for t in data.complete]) * sign
    lower, upper = values.min(axis=0), values.max(axis=0)
    span = np.where(upper > lower, upper - lower, 1.0)
    ref = np.full(len(sign), reference)

    def curve(points) -> list[float]:
        normalised = (np.asarray(points) * sign - lower) / span
        return [hypervolume(normalised[: i + 1], ref) for i in range(len(normalised))]

    random = _random_reference(data)
    failed = [step + 1 for step, t in enumerate(searched) if not t.complete]
    return HypervolumeInfo([t.number for t in complete], curve([t.values for t in complete]), lower.tolist(),
                           upper.tolist(), reference, failed, curve(random[1]) if random and random[1] else None,
                           random[0] if random else None)


# ---- drawing ------------------------------------------------------------------------------


def _log_scale(values) -> bool:
    values = [v for v in values if v is not None]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 20


def _sizes(info: FrontInfo):
    known = [p.trainable_params for p in info.points if p.trainable_params is not None]
    if not known:
        return lambda v: 60.0, []
    lo, hi = min(known), max(known)

    def size(v):
        if v is None or hi == lo:
            return 60.0
        return SIZE_RANGE[0] + (SIZE_RANGE[1] - SIZE_RANGE[0]) * math.sqrt((v - lo) / (hi - lo))

    shown = sorted({lo, hi} | ({(lo + hi) / 2} if hi > lo else set()))
    return size, shown


def _style(info: FrontInfo):
    """Marker and colour of each legend entry."""
    style = {g: (SEARCHED_MARKERS[i % len(SEARCHED_MARKERS)], "tab:blue") for i, g in enumerate(info.groups)}
    for i, label in enumerate(info.baselines):
        style[label] = (BASELINE_MARKERS[i % len(BASELINE_MARKERS)], BASELINE_COLOURS[i % len(BASELINE_COLOURS)])
    return style


def _scatter(ax, info: FrontInfo, x: int, y: int, size, style, labels: bool = True) -> None:
    """Every point with its error bars (where measured) and, when ``labels``, its name; points
    are translucent so coincident ones show through, and one label names them all."""
    for p in info.points:
        marker, colour = style[p.group]
        ex, ey = (p.errors[x], p.errors[y]) if p.errors else (None, None)
        if ex or ey:
            ax.errorbar(p.values[x], p.values[y], xerr=[[ex[0]], [ex[1]]] if ex else None,
                        yerr=[[ey[0]], [ey[1]]] if ey else None, fmt="none", ecolor="0.45",
                        elinewidth=0.8, capsize=2, zorder=2)
        ax.scatter(p.values[x], p.values[y], s=size(p.trainable_params), marker=marker,
                   facecolor=colour, alpha=0.7, edgecolor="black" if p.on_front else "none",
                   linewidth=1.2, zorder=3)
    if labels:
        _label_points(ax, info, x, y)


LABEL_POINTS = 5.5  # label font size


def _label_points(ax, info: FrontInfo, x: int, y: int) -> None:
    """One label per place: points within 3% of the axes of each other share one, listing
    each (``#2, #4 r=4 M=4``); a label that would cover another moves down, with a leader
    line to its point, so every trial's name stays readable."""
    def position(p):
        return [math.log10(v) if scale == "log" and v > 0 else v
                for v, scale in ((p.values[x], ax.get_xscale()), (p.values[y], ax.get_yscale()))]

    spots = [position(p) for p in info.points]
    low = [min(c) for c in zip(*spots, strict=True)]
    spans = [max(max(c) - min(c), 1e-12) for c in zip(*spots, strict=True)]
    unit = [[(v - lo) / sp for v, lo, sp in zip(spot, low, spans, strict=True)] for spot in spots]
    places: list[list[int]] = []
    for i, spot in enumerate(unit):
        near = next((pl for pl in places if all(abs(spot[d] - unit[pl[0]][d]) < 0.03 for d in (0, 1))), None)
        if near is None:
            places.append([i])
        else:
            near.append(i)
    # the axes' size in points, to know how much of it a label covers (before layout: close enough)
    box = ax.get_position()
    width_pt, height_pt = (box.width * ax.figure.get_figwidth() * 72, box.height * ax.figure.get_figheight() * 72)
    span_pt = [0.85 * width_pt, 0.85 * height_pt]  # data spread over ~85% of the axes after margins
    placed: list[tuple[float, float, float, float]] = []  # label boxes in points: x0, y0, x1, y1
    for place in sorted(places, key=lambda pl: -unit[pl[0]][1]):
        first = info.points[place[0]]
        lines = [info.points[i].label for i in place]
        w = 0.55 * LABEL_POINTS * max(len(line) for line in lines)
        h = 1.2 * LABEL_POINTS * len(lines)
        px, py = unit[place[0]][0] * span_pt[0], unit[place[0]][1] * span_pt[1]
        dy = 0.0
        while any(px + 4 < b[2] and b[0] < px + 4 + w and py + dy < b[3] and b[1] < py + dy + h for b in placed):
            dy -= LABEL_POINTS
        placed.append((px + 4, py + dy, px + 4 + w, py + dy + h))
        ax.annotate("\n".join(lines), (first.values[x], first.values[y]), xytext=(4, 3 + dy),
                    textcoords="offset points", fontsize=LABEL_POINTS, color="0.15", zorder=4, va="bottom",
                    annotation_clip=False,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5} if dy else None)


def _legend_handles(info: FrontInfo, size, shown_sizes, style):
    from matplotlib.lines import Line2D

    def dot(marker, colour, label, ms=8.0, edge="none"):
        return Line2D([], [], linestyle="", marker=marker, markersize=ms, markerfacecolor=colour,
                      markeredgecolor=edge, label=label)

    handles = [dot(style[g][0], style[g][1], g) for g in info.groups]
    handles += [dot(style[b][0], style[b][1], f"{b} (baseline)") for b in info.baselines]
    handles.append(dot("o", "white", "on the Pareto front (all objectives)", edge="black"))
    handles.append(Line2D([], [], color="black", linestyle="--", label="non-dominated frontier (this pair)"))
    for v in shown_sizes:
        handles.append(dot("o", "lightgrey", f"{v:,.0f} trainable params", ms=math.sqrt(size(v)), edge="grey"))
    return handles


def _plot_fronts(info: FrontInfo, folder: Path, stem: str) -> None:
    """One column wide (3.5 in): the first objective against each other one, panels stacked."""
    size, shown = _sizes(info)
    style = _style(info)
    by_number = {p.number: p for p in info.points}
    fig, axes = new_figure(len(info.panels), 1, figsize=(3.5, 2.6 * len(info.panels) + 1.4))
    for ax, panel in zip((row[0] for row in axes), info.panels, strict=True):
        if _log_scale([p.values[panel.x] for p in info.points]):
            ax.set_xscale("log")
        if _log_scale([p.values[0] for p in info.points]):
            ax.set_yscale("log")
        _scatter(ax, info, panel.x, 0, size, style)
        line = [by_number[n].values for n in panel.frontier]
        ax.plot([v[panel.x] for v in line], [v[0] for v in line], "k--", linewidth=1.0, zorder=2)
        ax.set_xlabel(f"{info.labels[panel.x]} ({_better(info.objectives[panel.x])})")
        ax.set_ylabel(f"{info.labels[0]}\n({_better(info.objectives[0])})")
        ax.grid(True, alpha=0.3)
    fig.legend(handles=_legend_handles(info, size, shown, style), loc="outside lower center", ncols=2,
               frameon=False)
    save_figure(fig, folder, stem)


def _better(metric: Metric) -> str:
    return "higher is better" if metric.higher_is_better else "lower is better"


def _plot_third(info: FrontInfo, folder: Path, stem: str) -> None:
    """Three objectives in one view: the two costs on the axes, the first objective as colour."""
    import matplotlib as mpl

    size, shown = _sizes(info)
    style = _style(info)
    first, x_metric, y_metric = info.objectives[0], info.objectives[1], info.objectives[2]
    fig, axes = new_figure(1, 1, figsize=(3.5, 4.4))
    ax = axes[0][0]
    colours = [p.values[0] for p in info.points]
    norm = mpl.colors.Normalize(min(colours), max(colours))
    cmap = mpl.colormaps["viridis_r" if not first.higher_is_better else "viridis"]
    if _log_scale([p.values[1] for p in info.points]):
        ax.set_xscale("log")
    if _log_scale([p.values[2] for p in info.points]):
        ax.set_yscale("log")
    for p in info.points:
        marker, _ = style[p.group]
        ax.scatter(p.values[1], p.values[2], s=size(p.trainable_params), marker=marker,
                   color=cmap(norm(p.values[0])), alpha=0.75,
                   edgecolor="black" if p.on_front else "none", linewidth=1.2, zorder=3)
    _label_points(ax, info, 1, 2)
    ax.set_xlabel(f"{info.labels[1]} ({_better(x_metric)})")
    ax.set_ylabel(f"{info.labels[2]}\n({_better(y_metric)})")
    ax.grid(True, alpha=0.3)
    bar = fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, location="top",
                       label=f"{info.labels[0]} (yellow = better)", shrink=0.9)
    bar.ax.xaxis.set_major_locator(MaxNLocator(4))  # tick labels that do not run into each other
    handles = [h for h in _legend_handles(info, size, shown, style) if h.get_linestyle() != "--"]
    for h in handles[: len(info.groups) + len(info.baselines)]:  # colour is the first objective here
        h.set_markerfacecolor("grey")
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
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
            for set_scale, axis, index in ((ax.set_xscale, ax.xaxis, j), (ax.set_yscale, ax.yaxis, i)):
                if _log_scale([p.values[index] for p in info.points]):
                    set_scale("log")
                else:
                    axis.set_major_locator(MaxNLocator(4))
            _scatter(ax, info, j, i, size, style, labels=False)
            ax.grid(True, alpha=0.3)
            ax.tick_params(labelsize=7)
            if i == n - 1:
                ax.set_xlabel(info.labels[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(info.labels[i], fontsize=9)
    handles = [h for h in _legend_handles(info, size, shown, style) if h.get_linestyle() != "--"]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, folder, stem)


def _plot_hypervolume(info: HypervolumeInfo, folder: Path, stem: str) -> None:
    fig, axes = new_figure(1, 1, figsize=(3.5, 2.6))
    ax = axes[0][0]
    steps = [step for step in range(1, len(info.numbers) + len(info.failed) + 1) if step not in info.failed]
    ax.step(steps, info.hypervolume, where="post", color="tab:blue", marker="o", markersize=3,
            label="this search (completed trial)")
    if info.random:
        ax.step(range(1, len(info.random) + 1), info.random, where="post", color="tab:grey", linestyle="--",
                label=f"random search ({info.random_name})")
    if info.failed:
        ax.scatter(info.failed, [0.0] * len(info.failed), marker="x", color="tab:red", zorder=3,
                   clip_on=False, label="failed trial")
    ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("search step (searched trials, baselines excluded)")
    ax.set_ylabel("hypervolume\n(normalised objectives)")
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
        "area grows with the trainable parameter count (for every mark, baselines included), and the "
        "dashed curve is the non-dominated frontier of each pair of objectives, as in the paper's Fig. 5. "
        "Each point is labelled with its trial number and the knobs that vary; points within 3% of one "
        "another share one label and are drawn translucent, so none hides another. Error bars: "
        + ("the std over seeds." if len(data.study.seeds) > 1 else
           "one seed, so only spreads a record keeps (a latency's interquartile range over its repeats)."))
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
    searched = sum(not p.baseline for p in info.points)
    if hv is not None and searched >= MIN_HYPERVOLUME_TRIALS:
        _plot_hypervolume(hv, figures, "hypervolume")
        bounds = "; ".join(f"{m.name} in [{_plain(lo, hi, m)}]"
                           for m, lo, hi in zip(info.objectives, hv.lower, hv.upper, strict=True))
        random = ("" if hv.random else f" No random-search reference: the storage has no study "
                  f"`{data.study.name}-random` (this study rerun with sampler = \"random\").")
        if data.study.sampler in ("random", "grid"):
            random += f" This search's sampler ({data.study.sampler}) visits configurations in random order."
        figs.append(FigureRef(
            "hypervolume",
            f"Hypervolume of the front as the search proceeds (final {hv.hypervolume[-1]:.4g}); baselines are "
            f"not search steps. Each objective is normalised to [0, 1] over the completed trials ({bounds}), "
            f"maximised ones negated; reference point {hv.reference} in every objective.{random}"))
    elif hv is not None:
        paragraphs.append(f"Hypervolume history: not drawn, {searched} searched trial(s) completed; fewer than "
                          f"{MIN_HYPERVOLUME_TRIALS} steps say nothing about how the search converges.")
    return Section("front", "Pareto front", paragraphs, figs)


def _plain(lower: float, upper: float, metric: Metric) -> str:
    """The normalisation bounds in the metric's own sign."""
    lo, hi = sorted((-lower, -upper) if metric.higher_is_better else (lower, upper))
    return f"{lo:.4g}, {hi:.4g}"
