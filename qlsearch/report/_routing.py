"""Routing: which shared atoms each block reads (paper Fig. 6) and how spread that use is (Fig. 8).

From the trial records: ``metrics.atom_usage`` (blocks × atoms, the mean
routing weight ``alpha`` of each atom over the test inputs' last forward) and
``metrics.atom_usage_entropy`` (per block, the entropy of that mean, in nats).
The paper's Fig. 8 measures each atom's entropy across evaluation tasks; the
analogue here is across blocks: 1 = an atom used alike by every block (shared),
0 = used by one block only (specialised).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from qlsearch.report._data import (
    FigureRef,
    Section,
    StudyData,
    featured,
    new_figure,
    save_figure,
    trial_label,
)

MAX_HEATMAPS = 4


class AtomUsage(NamedTuple):
    number: int
    label: str
    usage: list[list[float]]  # blocks x atoms, mean over seeds
    block_entropy: list[float]  # per block (nats), mean over seeds
    atom_entropy: list[float]  # per atom, across blocks, normalised to [0, 1]; NaN: never used


class RoutingInfo(NamedTuple):
    trials: list[AtomUsage]


def _atom_entropy(usage: np.ndarray) -> list[float]:
    blocks = usage.shape[0]
    out = []
    for column in usage.T:
        total = column.sum()
        if total <= 0 or blocks < 2:
            out.append(float("nan"))
            continue
        p = column / total
        out.append(float(-(p[p > 0] * np.log(p[p > 0])).sum() / math.log(blocks)))
    return out


def _usage(t) -> AtomUsage | None:
    usages = [np.asarray(r["metrics"]["atom_usage"], dtype=float) for r in t.records
              if r.get("metrics", {}).get("atom_usage")]
    if not usages or len({u.shape for u in usages}) != 1:
        return None
    usage = np.mean(usages, axis=0)
    entropies = [r["metrics"].get("atom_usage_entropy") for r in t.records if r.get("metrics", {}).get("atom_usage")]
    entropies = [e for e in entropies if e and len(e) == usage.shape[0]]
    block_entropy = np.mean(entropies, axis=0).tolist() if entropies else []
    return usage, [abs(e) for e in block_entropy], _atom_entropy(usage)  # abs: -0.0 prints as 0


def _get_routing_info(data: StudyData) -> RoutingInfo:
    """Up to ``MAX_HEATMAPS`` routed trials: the featured ones first, then the best others."""
    sign = 1.0 if data.study.directions[0] == "minimize" else -1.0
    first = featured(data)
    shown = {t.number for t in first}
    rest = sorted((t for t in data.complete if t.number not in shown), key=lambda t: (sign * t.values[0], t.number))
    found = []
    for t in first + rest:
        got = _usage(t)
        if got is not None:
            usage, block_entropy, atom_entropy = got
            found.append(AtomUsage(t.number, trial_label(data, t), usage.tolist(), block_entropy, atom_entropy))
        if len(found) == MAX_HEATMAPS:
            break
    return RoutingInfo(found)


#: Atoms per heatmap row: wider maps are split into rows so cell labels stay readable.
ATOMS_PER_ROW = 12


def _plot_heatmap(t: AtomUsage, folder: Path, stem: str) -> None:
    """One trial's blocks × atoms map, one column wide; more than ``ATOMS_PER_ROW`` atoms are
    split over several rows (atoms 1-12, 13-24, ...), so every cell keeps a readable label."""
    usage = np.asarray(t.usage)
    blocks, atoms = usage.shape
    chunks = [range(start, min(start + ATOMS_PER_ROW, atoms)) for start in range(0, atoms, ATOMS_PER_ROW)]
    cell = 3.0 / max(len(c) for c in chunks)  # inches per cell, so a row spans the column
    fig, axes = new_figure(len(chunks), 1, figsize=(3.5, len(chunks) * (min(cell, 0.4) * blocks + 0.7) + 0.6))
    image = None
    for ax, chunk in zip((row[0] for row in axes), chunks, strict=True):
        part = usage[:, chunk.start:chunk.stop]
        image = ax.imshow(part, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (b, m), v in np.ndenumerate(part):
            ax.text(m, b, f"{v:.2f}", ha="center", va="center", fontsize=6,
                    color="white" if v < 0.6 else "black")
        ax.set_xticks(range(len(chunk)), [str(m + 1) for m in chunk])
        ax.set_yticks(range(blocks), [str(b + 1) for b in range(blocks)])
        ax.set_xlabel("atom m")
        ax.set_ylabel("block b")
    axes[0][0].set_title(t.label)
    fig.colorbar(image, ax=[row[0] for row in axes], label="mean routing weight α", shrink=0.9)
    save_figure(fig, folder, stem)


def _grouped_bars(ax, series: list[tuple[str, list[float]]], xlabel: str, ylabel: str) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series):
        x = np.arange(1, len(values) + 1) + (i - (len(series) - 1) / 2) * width
        bars = ax.bar(x, np.nan_to_num(values, nan=0.0), width=width, label=label)
        # a dot on each bar's top, so a zero (an atom one block owns) is still seen
        ax.scatter(x, values, s=12, color=bars.patches[0].get_facecolor(), zorder=3, clip_on=False)
    longest = max(len(v) for _, v in series)
    ax.set_xticks(range(1, longest + 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)


def _plot_entropy(info: RoutingInfo, folder: Path, stem: str) -> None:
    with_blocks = [(t.label, t.block_entropy) for t in info.trials if t.block_entropy]
    panels = 2 if with_blocks else 1
    fig, axes = new_figure(panels, 1, figsize=(3.5, 2.6 * panels + 1.2))
    _grouped_bars(axes[0][0], [(t.label, t.atom_entropy) for t in info.trials], "atom m",
                  "usage entropy across blocks\n(normalised; 1 = shared, 0 = one block)")
    axes[0][0].set_ylim(-0.02, 1.05)
    axes[0][0].set_title("per atom (cf. paper Fig. 8)")
    if with_blocks:
        _grouped_bars(axes[1][0], with_blocks, "block b", "route entropy\nover atoms (nats)")
        axes[1][0].set_title("per block (0 = one atom)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=1, frameon=False)
    save_figure(fig, folder, stem)


def routing_section(data: StudyData, figures: Path) -> Section:
    info = _get_routing_info(data)
    if not info.trials:
        return Section("routing", "Routing: atom usage", [
            "Atom usage (Fig. 6) and usage entropy (Fig. 8): not recorded — no completed trial's "
            "records have `metrics.atom_usage` (only routed methods such as `queryable` record it)."])
    for t in info.trials:
        _plot_heatmap(t, figures, f"atom_usage_{t.number}")
    _plot_entropy(info, figures, "atom_entropy")
    never = {t.label: [m + 1 for m, e in enumerate(t.atom_entropy) if math.isnan(e)] for t in info.trials}
    paragraphs = [f"{len(info.trials)} routed trial(s), the featured ones first; usage averaged over seeds."]
    unused = "; ".join(f"{label}: atoms {', '.join(map(str, ms))}" for label, ms in never.items() if ms)
    if unused:
        paragraphs.append(f"Atoms no block used (no bar in the entropy figure): {unused}.")
    return Section("routing", "Routing: atom usage", paragraphs, [
        *(FigureRef(f"atom_usage_{t.number}", f"{t.label}: mean routing weight of each shared atom per "
                    "block (cf. paper Fig. 6: rows there are tasks, here blocks).") for t in info.trials),
        FigureRef("atom_entropy", "Left: each atom's usage entropy across blocks, normalised by log B "
                                  "(cf. paper Fig. 8, across tasks there). Right: entropy of each "
                                  "block's route over the atoms."),
    ])
