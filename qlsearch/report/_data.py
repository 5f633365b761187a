"""What every report section reads: the Optuna study's trials joined with their seed records.

Loaded once per report (``load_study_data``); the figure modules only read
it. Also the two things every figure shares: how a trial is named on a plot,
and how a figure is saved so that regenerating gives the same bytes.
"""

from __future__ import annotations

import json
import math
import statistics
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

from qlsearch.study import Study

#: The paper's symbols for the knobs it names (r, M, k, B, tau_lang, lambda_ctx).
KNOB_SYMBOLS = {"num_atoms": "M", "top_k": "k", "num_blocks": "B", "tau_lang": "τ", "lambda_ctx": "λ"}
#: Trials shown one by one in the dynamics and routing figures (more would be unreadable).
MAX_FEATURED = 8


class TrialRow(NamedTuple):
    """One Optuna trial (one configuration on every seed) and its seed records."""

    number: int
    state: str  # COMPLETE | FAIL | RUNNING | WAITING | PRUNED
    method: str | None
    baseline: str | None
    knobs: dict
    values: tuple[float, ...] | None  # the objectives, means over seeds (COMPLETE only)
    stds: tuple[float | None, ...]  # their standard deviations over seeds
    failure: str | None
    trial_seconds: float | None
    started: datetime | None
    completed: datetime | None
    records: tuple[dict, ...]  # one per seed, in seed order
    version: int | None = None  # of the study file it ran under (qlsearch/_drivers.py)

    @property
    def complete(self) -> bool:
        return self.state == "COMPLETE" and self.values is not None


class StudyData(NamedTuple):
    study: Study
    storage_url: str
    trials: tuple[TrialRow, ...]
    user_attrs: dict

    @property
    def complete(self) -> list[TrialRow]:
        return [t for t in self.trials if t.complete]

    def by_number(self, number: int) -> TrialRow:
        return next(t for t in self.trials if t.number == number)


def _records(record_dir: str | None, fallback: Path) -> tuple[dict, ...]:
    """The ``seed<N>.json`` records of a trial, in seed order; ``fallback`` is where they
    are if the run folder moved since the sweep (``<root>/<study>/trials/<tune id>``)."""
    folders = [Path(record_dir)] if record_dir else []
    folders.append(fallback)
    for folder in folders:
        files = sorted(folder.glob("seed*.json"), key=lambda p: int(p.stem[4:]) if p.stem[4:].isdigit() else -1)
        if files:
            return tuple(json.loads(p.read_text()) for p in files)
    return ()


def load_study_data(study: Study, root: str | Path = "runs") -> StudyData:
    """The stored study ``study.name`` (``study.storage_url(root)``) with its trial records.

    Raises ``ValueError`` naming the storage when no such study was run there.
    """
    import optuna

    from qlsearch._storage import check_storage, hide_password, open_storage

    url = study.storage_url(root)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    not_found = f"study {study.name!r}: not found in {hide_password(url)}; run `qlsearch sweep` first"
    if study.storage:
        check_storage(url)
    elif not Path(url.removeprefix("sqlite:///")).is_file():  # the default SQLite file: never create it
        raise ValueError(not_found)
    try:
        ot_study = optuna.load_study(study_name=study.name, storage=open_storage(url))
    except KeyError:
        raise ValueError(not_found) from None
    names = [m.name for m in study.objectives]
    rows = []
    for t in ot_study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        tune_id = attrs.get("tune_trial_id") or ""
        values = tuple(float(v) for v in t.values) if t.values is not None else None
        rows.append(TrialRow(
            number=t.number,
            state=t.state.name,
            method=attrs.get("method"),
            baseline=attrs.get("baseline"),
            knobs=dict(attrs.get("knobs") or {}),
            values=values if t.state.name == "COMPLETE" else None,
            stds=tuple(attrs.get(f"{n}_std") for n in names),
            failure=attrs.get("failure"),
            trial_seconds=attrs.get("trial_seconds"),
            started=t.datetime_start,
            completed=t.datetime_complete,
            records=_records(attrs.get("record_dir"), study.run_dir(root) / "trials" / tune_id) if tune_id
            or attrs.get("record_dir") else (),
            version=attrs.get("file_version"),
        ))
    return StudyData(study, url, tuple(sorted(rows, key=lambda r: r.number)), dict(ot_study.user_attrs))


# ---- naming and choosing trials -----------------------------------------------------


def _fmt_knob(value) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.3g}"
    return str(value)


def varying_knobs(data: StudyData, method: str | None) -> list[str]:
    """The knobs of ``method`` that take more than one value among its searched trials."""
    seen: dict[str, set] = {}
    for t in data.trials:
        if t.method == method and not t.baseline:
            for k, v in t.knobs.items():
                seen.setdefault(k, set()).add(json.dumps(v, sort_keys=True, default=str))
    return sorted(k for k, v in seen.items() if len(v) > 1)


def trial_label(data: StudyData, t: TrialRow) -> str:
    """How a trial is named on plots: a baseline by its label, a searched trial by number,
    method and the knobs that vary in the search (``#3 queryable r=4 M=4 k=1``)."""
    if t.baseline:
        return t.baseline
    knobs = " ".join(f"{KNOB_SYMBOLS.get(k, k)}={_fmt_knob(t.knobs[k])}"
                     for k in _ordered(varying_knobs(data, t.method)) if k in t.knobs)
    return f"#{t.number} {t.method or '?'}" + (f" {knobs}" if knobs else "")


def _ordered(knobs: list[str]) -> list[str]:
    """The paper's order (r, M, k, B, tau, lambda), then the rest alphabetically."""
    first = ["r", "num_atoms", "top_k", "num_blocks", "tau_lang", "lambda_ctx"]
    return [k for k in first if k in knobs] + sorted(k for k in knobs if k not in first)


def front_numbers(data: StudyData) -> list[int]:
    """Trial numbers of the non-dominated completed trials (every objective, with its direction)."""
    complete = data.complete
    keep = non_dominated([t.values for t in complete], data.study.directions)
    return sorted(complete[i].number for i in keep)


def dominates(a, b, directions: list[str]) -> bool:
    """``a`` is at least as good as ``b`` in every objective and better in one."""
    sign = [1.0 if d == "minimize" else -1.0 for d in directions]
    not_worse = all(s * x <= s * y for s, x, y in zip(sign, a, b, strict=True))
    return not_worse and any(s * x < s * y for s, x, y in zip(sign, a, b, strict=True))


def non_dominated(points, directions: list[str]) -> list[int]:
    """Indices of the points no other point dominates (duplicates are all kept, as Optuna does)."""
    return [i for i, p in enumerate(points)
            if not any(dominates(q, p, directions) for j, q in enumerate(points) if j != i)]


def featured(data: StudyData) -> list[TrialRow]:
    """Trials drawn one by one (Fig. 3/4/6/8): the completed baselines, then the front's
    trials best-first on the first objective, at most ``MAX_FEATURED``."""
    sign = 1.0 if data.study.directions[0] == "minimize" else -1.0
    front = set(front_numbers(data))
    baselines = [t for t in data.complete if t.baseline]
    searched = sorted((t for t in data.complete if t.number in front and not t.baseline),
                      key=lambda t: (sign * t.values[0], t.number))
    return (baselines + searched)[:MAX_FEATURED]


# ---- numbers over seeds --------------------------------------------------------------


def seed_values(t: TrialRow, section: str, name: str) -> list:
    """``record[section][name]`` of every seed record of ``t`` that has it."""
    return [r.get(section, {}).get(name) for r in t.records if r.get(section, {}).get(name) is not None]


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


#: The record sections whose numeric fields are metrics.
SECTIONS = ("metrics", "profile")


def _spread(t: TrialRow, name: str, mean: float, seeds: list[float]) -> tuple[list[float], str] | None:
    """``([minus, plus], what)`` for the error bar of ``name``, or None where nothing is measured."""
    if len(set(seeds)) > 1:  # seeds that all gave one value have no spread over seeds
        std = statistics.stdev(seeds)
        return [std, std], f"std over {len(seeds)} seeds"
    for r in t.records:
        for section in SECTIONS:
            fields = r.get(section) or {}
            if finite(fields.get(f"{name}_std")):
                return [fields[f"{name}_std"]] * 2, "recorded std"
            spread = fields.get(f"{name}_spread")
            if isinstance(spread, dict) and finite(spread.get("q25")) and finite(spread.get("q75")):
                return [max(0.0, mean - spread["q25"]), max(0.0, spread["q75"] - mean)], "IQR of repeats"
    return None


def trial_values(data: StudyData, t: TrialRow) -> tuple[dict, dict, dict]:
    """Means over seeds of every numeric field of ``t``'s records (``metrics`` and ``profile``),
    the objectives as Optuna stored them, and each one's error bar ``[minus, plus]`` with what
    it is: the std over seeds where there are several that differ, else the record's own ``<name>_std``,
    else the interquartile range of its ``<name>_spread`` (a timing's repeats), else none."""
    per_seed: dict[str, list[float]] = {}
    for r in t.records:
        if r.get("status") != "completed":
            continue
        for section in SECTIONS:
            for name, v in (r.get(section) or {}).items():
                if finite(v) and not name.endswith("_std"):
                    per_seed.setdefault(name, []).append(float(v))
    values, err, kind = {}, {}, {}
    for name, seeds in per_seed.items():
        values[name] = statistics.fmean(seeds)
    if t.complete:  # the objectives as Optuna stored them (means over seeds)
        for i, m in enumerate(data.study.objectives):
            values[m.name] = t.values[i]
            # seeds that all gave one value (a parameter count, a latency measured once per
            # configuration) have no spread over seeds: the record's own spread is used instead
            if t.stds[i] is not None and len(set(per_seed.get(m.name, []))) > 1:
                err[m.name], kind[m.name] = [t.stds[i]] * 2, f"std over {len(t.records)} seeds"
    for name, mean in values.items():
        if name not in err and (found := _spread(t, name, mean, per_seed.get(name, []))):
            err[name], kind[name] = found
    return values, err, kind


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [float(v) for v in values]
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def elementwise_mean(rows: list[list[float]]) -> list[float] | None:
    """The mean of equally long lists (seeds); None when they are absent or ragged."""
    if not rows or len({len(r) for r in rows}) != 1:
        return None
    return [statistics.fmean(float(x) for x in col) for col in zip(*rows, strict=True)]


def fmt(value, std=None) -> str:
    """A number as tables print it: 4 significant digits, ``± std`` when given."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = _fmt_number(value)
    return f"{text} ± {_fmt_number(std)}" if std is not None else text


def fmt_spread(value, err: list[float] | None, kind: str | None) -> str:
    """A mean as tables print it with the spread that was measured, never a made-up ``± 0``:
    ``± std`` over seeds, ``± std (recorded)``, or a timing's ``(IQR low–high)``."""
    if value is None:
        return ""
    if not err or not kind:
        return fmt(value)
    if kind.startswith("IQR"):
        return f"{fmt(value)} (IQR {_fmt_number(value - err[0])}–{_fmt_number(value + err[1])})"
    return fmt(value, err[0]) + (" (recorded)" if kind == "recorded std" else "")


def _fmt_number(value) -> str:
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == int(value) and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.4g}"


# ---- what an axis and a machine are called ----------------------------------------------------


def axis_label(data: StudyData, name: str) -> str:
    """A metric's label with its unit; latency also says the batch and threads it was timed
    at, from the records (``forward latency (ms, batch 64, 1 thread)``): without them a
    latency means little."""
    from qlsearch.metrics import METRICS

    label = METRICS[name].label if name in METRICS else name
    if name != "forward_ms":
        return label
    profiles = [r.get("profile") or {} for t in data.trials for r in t.records]
    batches = {p["batch"] for p in profiles if p.get("batch") is not None}
    threads = {p["threads"] for p in profiles if p.get("threads") is not None}
    where = [f"batch {next(iter(batches))}" if len(batches) == 1 else
             "batch varies by trial" if batches else "batch not recorded"]
    if len(threads) == 1:
        n = next(iter(threads))
        where.append(f"{n} thread{'s' if n != 1 else ''}")
    return label.replace("(ms)", f"(ms, {', '.join(where)})")


def machine_text(record: dict) -> str:
    """Where a trial record says it ran: CPU or GPU, threads (``machine`` of the record)."""
    m = record.get("machine")
    if not m:
        return "not recorded"
    if m.get("gpu"):
        return f"{m['gpu'].get('name')} (CUDA {m['gpu'].get('cuda')})"
    threads = m.get("torch_threads")
    return f"{m.get('cpu')}, {threads} thread{'s' if threads != 1 else ''}"


# ---- saving figures ------------------------------------------------------------------


def save_figure(fig, folder: Path, stem: str) -> None:
    """``<stem>.png``, ``.svg`` and ``.pdf``, byte-identical for the same figure: no dates or
    versions in the metadata, fixed SVG ids. PNG at 200 dpi: sharp when printed at the
    one-column width (3.5 in) the paper figures are drawn at."""
    import matplotlib

    folder.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "qlsearch"}):
        fig.savefig(folder / f"{stem}.png", dpi=200, bbox_inches="tight", metadata={"Software": None})
        fig.savefig(folder / f"{stem}.svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
        fig.savefig(folder / f"{stem}.pdf", bbox_inches="tight",
                    metadata={"CreationDate": None, "Creator": None, "Producer": None})


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure and its axes, like ``plt.subplots`` but without pyplot: no global state and
    no GUI back-end, so a report can be written from anywhere (the Agg canvas draws it)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None), layout=kwargs.pop("layout", "constrained"))
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


# ---- what a section hands the page ------------------------------------------------------


class FigureRef(NamedTuple):
    """``figures/<stem>.png`` (shown), ``.svg`` and ``.pdf`` (linked)."""

    stem: str
    caption: str


class Table(NamedTuple):
    """Rows as printed; the full-precision rows are in ``tables/<stem>.csv``."""

    stem: str
    title: str
    columns: list[str]
    rows: list[list[str]]


class Section(NamedTuple):
    key: str  # the HTML anchor
    title: str
    paragraphs: list[str]
    figures: list[FigureRef] = []
    tables: list[Table] = []
    html: str = ""  # interactive markup, after the paragraphs (the Markdown has none)


def write_csv(folder: Path, stem: str, columns: list[str], rows: list[list]) -> None:
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{stem}.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows(["" if v is None else v for v in row] for row in rows)
