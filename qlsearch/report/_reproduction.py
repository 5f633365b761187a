"""The reproduction's numbers: every configuration × seed as CSV rows, and what the page says
about them (validation-selected results, ratios to LoRA beside the paper's, agreement in sign,
win counts, and a paired Wilcoxon signed-rank test per method against LoRA).

Data first, drawing elsewhere (``qlsearch.report.reproduction``): everything here reads the
CSV's rows (dicts of strings, as ``csv.DictReader`` gives them), so the page can be rebuilt
from the committed CSV without the run folders.

Decisions the paper leaves open, recorded here:

* **Which configuration a method is scored by.** Per function and method, the configuration
  (Optuna trial) whose mean validation MSE over the seeds is lowest among those that finished
  on every seed; its test MSE, read at each seed's validation-selected epoch, is the
  method's result. Test never chooses anything.
* **Ratios.** ``mean test MSE(method) / mean test MSE(LoRA)`` on the same function, ours and
  the paper's (Table 10 for the deep MLP, Table 2 for the transformer: both test MSE).
  "Beats LoRA" is a ratio below 0.99, "loses" above 1.01; within 1 % of LoRA is a tie, and
  a tie agrees with nothing. Table 10 prints most baselines within 0.1 % of LoRA (e.g.
  DoRA 13.220 against LoRA 13.227 on Ackley, every baseline 337.855 on Levy): plateaus, not
  wins, and a sign read from their last digit would be noise.
* **The paired test** pairs a method with LoRA by (function, seed), both at their selected
  configurations, on ``log(test MSE(method) / test MSE(LoRA))``: the functions' MSEs differ
  by orders of magnitude, and the log ratio puts every function on one scale before the
  signed-rank test ranks the differences. Two-sided, ``scipy.stats.wilcoxon`` (exact for
  small samples without ties, its default).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

#: The CSV's columns, in order.
COLUMNS = ["family", "function", "study", "trial", "method", "knobs", "lr", "seed", "status",
           "selected_epoch", "val_mse", "test_mse", "train_mse", "failure"]
#: The paper's test-MSE table each family is compared with (``qlsearch.baselines.paper_table``).
PAPER_TEST_TABLE = {"deep": 10, "table1": 2}
#: What each table is (``baselines/paper/README.md`` says how it was transcribed).
PAPER_SOURCE = {10: "Table 10 (§B.3: deep 32×32 MLP, best held-out test MSE, one value per cell)",
                2: "Table 2 (§4.1: 8×256 Transformer, test MSE, mean over 5 runs)"}
REFERENCE = "lora"


# ---- from the run folders to CSV rows ---------------------------------------------------


def collect_rows(study, root: str | Path, family: str) -> list[dict]:
    """One row per (configuration, seed) of ``study`` (a ``qlsearch.study.Study``) as run under
    ``root``. A configuration that failed part-way keeps its finished seeds and one row for the
    failing seed (status ``failed`` and the reason); one never started has no rows."""
    from qlsearch.report._data import load_study_data

    data = load_study_data(study, root)
    rows = []
    for t in data.trials:
        if t.method is None:
            continue
        knobs = dict(t.knobs)
        base = {"family": family, "function": study.task.name, "study": study.name, "trial": t.number,
                "method": t.method, "knobs": json.dumps(knobs, sort_keys=True)}
        for record in t.records:
            metrics = record.get("metrics", {})
            lr = record.get("config", {}).get("train", {}).get("lr")  # what the trial trained at
            rows.append({**base, "lr": lr, "seed": record.get("seed"), "status": record.get("status"),
                         "selected_epoch": metrics.get("selected_epoch"),
                         "val_mse": metrics.get("val_mse"), "test_mse": metrics.get("test_mse"),
                         "train_mse": metrics.get("train_mse"), "failure": record.get("failure")})
    return rows


def write_rows(path: Path, rows: Iterable[dict]) -> None:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})


def read_rows(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ---- validation selection ---------------------------------------------------------------


class Selected(NamedTuple):
    """A method's result on one function: its validation-selected configuration."""

    trial: int
    knobs: str
    val_mean: float
    test_by_seed: dict[int, float]  # seed -> test MSE at that seed's selected epoch

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.test_by_seed.values())

    @property
    def test_std(self) -> float:
        values = list(self.test_by_seed.values())
        return statistics.stdev(values) if len(values) > 1 else 0.0


def _float(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def select(rows: list[dict], seeds: Iterable[int] | None = None) -> dict[tuple[str, str, str], Selected]:
    """``{(family, function, method): Selected}``: per function and method the configuration with
    the lowest mean validation MSE among those complete on every seed (``seeds``; default every
    seed any row of the family names). A method none of whose configurations finished is absent."""
    by_config: dict[tuple, list[dict]] = {}
    for row in rows:
        by_config.setdefault((row["family"], row["function"], row["method"], int(row["trial"])), []).append(row)
    family_seeds: dict[str, set[int]] = {}
    for row in rows:
        family_seeds.setdefault(row["family"], set()).add(int(row["seed"]))
    best: dict[tuple[str, str, str], Selected] = {}
    for (family, function, method, trial), config_rows in sorted(by_config.items()):
        wanted = set(seeds) if seeds is not None else family_seeds[family]
        done = {int(r["seed"]): r for r in config_rows if r["status"] == "completed"
                and _float(r["val_mse"]) is not None and _float(r["test_mse"]) is not None}
        if not wanted <= done.keys():
            continue
        val = statistics.fmean(_float(done[s]["val_mse"]) for s in wanted)
        key = (family, function, method)
        if key not in best or val < best[key].val_mean:
            best[key] = Selected(trial, config_rows[0]["knobs"], val,
                                 {s: _float(done[s]["test_mse"]) for s in sorted(wanted)})
    return best


# ---- against LoRA, ours and the paper's ------------------------------------------------


#: Ratios to LoRA within this fraction of 1 are ties (see the module docstring).
TIE_BAND = 0.01


def beats(ratio: float | None) -> bool | None:
    """True below ``1 - TIE_BAND``, False above ``1 + TIE_BAND``, None for a tie or no value."""
    if ratio is None or not math.isfinite(ratio) or abs(ratio - 1) <= TIE_BAND:
        return None
    return ratio < 1


class Comparison(NamedTuple):
    """One function × method row of the page."""

    family: str
    function: str
    method: str
    ours: Selected
    ratio: float | None  # ours / LoRA's mean test MSE
    paper: float | None  # the paper's test MSE (NaN-free; inf where it prints inf)
    paper_ratio: float | None

    @property
    def agrees(self) -> bool | None:
        """Does the method beat LoRA in both, or lose in both? None when either is a tie/missing."""
        ours, paper = beats(self.ratio), beats(self.paper_ratio)
        return None if ours is None or paper is None else ours == paper


def paper_values(family: str) -> dict[tuple[str, str], float]:
    """``{(function, method): mean}`` from the paper's test table for ``family``."""
    from qlsearch.baselines import paper_table

    table = paper_table(PAPER_TEST_TABLE[family])
    return {(r.function, r.method): float(r.mean) for r in table.itertuples()}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or not math.isfinite(b):
        return None
    return a / b


def compare(selected: dict[tuple[str, str, str], Selected],
            paper: dict[str, dict[tuple[str, str], float]]) -> list[Comparison]:
    """Every (family, function, method) that has a LoRA result beside it, in a stable order;
    ``paper`` maps a family to its ``paper_values``."""
    out = []
    for (family, function, method), sel in sorted(selected.items()):
        lora = selected.get((family, function, REFERENCE))
        if lora is None:
            continue
        printed = paper.get(family, {})
        p, p_lora = printed.get((function, method)), printed.get((function, REFERENCE))
        out.append(Comparison(family, function, method, sel, _ratio(sel.test_mean, lora.test_mean),
                              p, _ratio(p, p_lora)))
    return out


def _unique_best(values: dict[str, float]) -> str | None:
    """The method with the lowest value, or None when several share it (Table 10's Levy)."""
    low = min(values.values())
    winners = [m for m, v in values.items() if v == low]
    return winners[0] if len(winners) == 1 else None


class MethodSummary(NamedTuple):
    """One method's line of the agreement table, over a family's functions."""

    family: str
    method: str
    functions: int
    wins_ours: int  # functions where it beats LoRA, ours
    wins_paper: int  # ... and in the paper
    agree: int  # functions where both say the same (beats or loses)
    disagree: int
    best_ours: int  # functions where it has the lowest test MSE of all methods, ours
    best_paper: int  # ... the paper's, among the same methods


def summarise(comparisons: list[Comparison]) -> list[MethodSummary]:
    """Win and agreement counts per family and method (LoRA included: its best counts)."""
    best_ours: dict[tuple[str, str], str] = {}
    best_paper: dict[tuple[str, str], str] = {}
    groups: dict[tuple[str, str], list[Comparison]] = {}
    for c in comparisons:
        groups.setdefault((c.family, c.function), []).append(c)
    for key, cs in groups.items():
        best_ours[key] = _unique_best({c.method: c.ours.test_mean for c in cs})
        if all(c.paper is not None for c in cs):  # the paper's best among the same methods only
            best_paper[key] = _unique_best({c.method: c.paper for c in cs})
    out = []
    for family, method in sorted({(c.family, c.method) for c in comparisons}):
        cs = [c for c in comparisons if (c.family, c.method) == (family, method)]
        out.append(MethodSummary(
            family, method, len(cs),
            sum(beats(c.ratio) is True for c in cs), sum(beats(c.paper_ratio) is True for c in cs),
            sum(c.agrees is True for c in cs), sum(c.agrees is False for c in cs),
            sum(best_ours.get((family, c.function)) == method for c in cs),
            sum(best_paper.get((family, c.function)) == method for c in cs)))
    return out


class PairedTest(NamedTuple):
    """Wilcoxon signed-rank, a method against LoRA over (function, seed) pairs."""

    family: str
    method: str
    pairs: int
    lower: int  # pairs where the method's test MSE is below LoRA's
    median_ratio: float  # median over pairs of test MSE(method) / test MSE(LoRA)
    statistic: float
    p_value: float


def paired_tests(selected: dict[tuple[str, str, str], Selected]) -> list[PairedTest]:
    """Per family and method (not LoRA): the signed-rank test of log(method / LoRA) test MSE,
    paired by function and seed, over the functions where both have a result."""
    from scipy.stats import wilcoxon

    out = []
    for family, method in sorted({(f, m) for f, _, m in selected if m != REFERENCE}):
        logs = []
        for (fam, function, m), sel in sorted(selected.items()):
            lora = selected.get((fam, function, REFERENCE))
            if (fam, m) != (family, method) or lora is None:
                continue
            for seed, value in sel.test_by_seed.items():
                if seed in lora.test_by_seed and value > 0 and lora.test_by_seed[seed] > 0:
                    logs.append(math.log(value / lora.test_by_seed[seed]))
        if not logs:
            continue
        if all(d == 0 for d in logs):
            statistic, p = 0.0, 1.0
        else:
            result = wilcoxon(logs)
            statistic, p = float(result.statistic), float(result.pvalue)
        out.append(PairedTest(family, method, len(logs), sum(d < 0 for d in logs),
                              math.exp(statistics.median(logs)), statistic, p))
    return out
