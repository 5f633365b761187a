"""Which searched knobs matter: ``optuna.importance.get_param_importances`` per objective.

Importances are computed on the searched (not baseline) completed trials of
the most searched method, with the knobs themselves as parameters (``top_k``,
not Optuna's conditional names such as ``queryable.top_k|<=2``), each objective
in minimisation form since PED-ANOVA assumes lower is better; plus one row for
reaching the Pareto front (PED-ANOVA's multi-objective target). Too few trials,
or no knob that varies, and the section says so instead.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from qlsearch.report._data import (
    FigureRef,
    Section,
    StudyData,
    Table,
    TrialRow,
    new_figure,
    save_figure,
    varying_knobs,
    write_csv,
)

#: Fewer completed searched trials and no importance is computed: with a handful of trials
#: each knob value is seen once or twice, and PED-ANOVA credits knobs for effects they cannot
#: have (8 trials gave ``top_k`` importance for the parameter count, which does not depend on it).
MIN_TRIALS = 15
FRONT = "Pareto front"


class ImportanceInfo(NamedTuple):
    method: str | None
    knobs: list[str]
    n_trials: int
    importances: dict[str, dict[str, float]]  # target (objective name or FRONT) -> knob -> importance
    reason: str | None  # why nothing was computed


def _knob_study(trials: list[TrialRow], knobs: list[str], directions: list[str], target: int | None):
    """An in-memory Optuna study of ``trials`` with the knobs as categorical parameters."""
    import optuna

    choices = {k: sorted({json.dumps(t.knobs[k], sort_keys=True) for t in trials}) for k in knobs}
    distributions = {k: optuna.distributions.CategoricalDistribution(c) for k, c in choices.items()}
    if target is None:
        study = optuna.create_study(directions=directions)
        values = [list(t.values) for t in trials]
    else:
        study = optuna.create_study(direction="minimize")
        sign = 1.0 if directions[target] == "minimize" else -1.0
        values = [[sign * t.values[target]] for t in trials]
    study.add_trials([optuna.trial.create_trial(
        params={k: json.dumps(t.knobs[k], sort_keys=True) for k in knobs},
        distributions=distributions, values=v) for t, v in zip(trials, values, strict=True)])
    return study


def _get_importance_info(data: StudyData) -> ImportanceInfo:
    import optuna

    searched = [t for t in data.complete if not t.baseline and t.method]
    if not searched:
        return ImportanceInfo(None, [], 0, {}, "no searched trial has completed")
    method = Counter(t.method for t in searched).most_common(1)[0][0]
    trials = [t for t in searched if t.method == method]
    knobs = [k for k in varying_knobs(data, method) if all(k in t.knobs for t in trials)]
    knobs = [k for k in knobs if len({json.dumps(t.knobs[k], sort_keys=True) for t in trials}) > 1]
    if len(trials) < MIN_TRIALS:
        return ImportanceInfo(method, knobs, len(trials), {},
                              f"too few trials: {len(trials)} completed searched {method} trial(s), "
                              f"importances need at least {MIN_TRIALS}, or they credit knobs with effects that are chance")
    if not knobs:
        return ImportanceInfo(method, knobs, len(trials), {}, "no knob takes more than one value")
    directions = data.study.directions
    targets = [(m.name, i) for i, m in enumerate(data.study.objectives)]
    if len(directions) > 1:
        targets.append((FRONT, None))
    importances = {}
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name, target in targets:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental", "importances will be equal"
            try:
                found = optuna.importance.get_param_importances(_knob_study(trials, knobs, directions, target))
            except (ValueError, RuntimeError) as err:
                return ImportanceInfo(method, knobs, len(trials), {}, f"Optuna could not compute them: {err}")
        importances[name] = {k: float(found.get(k, 0.0)) for k in knobs}
    return ImportanceInfo(method, knobs, len(trials), importances, None)


def _plot(info: ImportanceInfo, labels: dict[str, str], folder: Path, stem: str) -> None:
    import numpy as np

    targets = list(info.importances)
    fig, axes = new_figure(1, 1, figsize=(3.5, 0.5 + 0.45 * len(targets) * max(1, len(info.knobs)) ** 0.5 + 1.6))
    ax = axes[0][0]
    height = 0.8 / len(info.knobs)
    y = np.arange(len(targets))
    for i, knob in enumerate(info.knobs):
        ax.barh(y + (i - (len(info.knobs) - 1) / 2) * height, [info.importances[t][knob] for t in targets],
                height=height, label=knob)
    ax.set_yticks(y, [labels.get(t, t) for t in targets])
    ax.invert_yaxis()
    ax.set_xlabel("importance (PED-ANOVA, normalised per target)")
    ax.set_xlim(0, 1)
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=3, frameon=False, title="knob")
    save_figure(fig, folder, stem)


def importance_section(data: StudyData, figures: Path, tables: Path) -> Section:
    info = _get_importance_info(data)
    title = "Knob importance"
    if info.reason:
        return Section("importance", title, [f"Not computed: {info.reason}."])
    labels = {m.name: m.label for m in data.study.objectives}
    _plot(info, labels, figures, "importance")
    rows = [[labels.get(t, t), *(f"{values[k]:.3f}" for k in info.knobs)] for t, values in info.importances.items()]
    write_csv(tables, "importance", ["target", *info.knobs],
              [[t, *(values[k] for k in info.knobs)] for t, values in info.importances.items()])
    return Section("importance", title, [
        f"PED-ANOVA importances (optuna.importance.get_param_importances) over the {info.n_trials} completed "
        f"searched {info.method} trials, for each objective and for reaching the Pareto front; with this "
        "few trials they are indicative only."],
        [FigureRef("importance", "Importance of each searched knob, per objective.")],
        [Table("importance", "Knob importance per target", ["target", *info.knobs], rows)])
