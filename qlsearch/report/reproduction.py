"""The reproduction page: the paper's synthetic Tables 2 and 10 against our CPU-scale runs.

``python -m qlsearch.report.reproduction`` collects every configuration × seed of the
reproduction studies (``studies/reproduction-deep/``, ``studies/reproduction-table1/``) that
were run under ``--root`` into ``reports/reproduction/configurations.csv`` (families with no
run there keep their rows from the committed CSV), then writes the page from that CSV alone:
``index.html``, ``index.md``, ``figures/`` and ``tables/``. ``make reproduction`` runs the
sweeps with ``--resume`` first. The protocol is ``reports/reproduction/protocol.md``; a
hand-written reading of the results, ``discussion.md``, and every ``sections/*.md`` (the
instruction study, the continual-routing analysis) are included verbatim, in a fixed order.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from qlsearch.report._data import FigureRef, Section, Table, fmt, new_figure, save_figure, write_csv
from qlsearch.report._reproduction import (
    PAPER_SOURCE,
    PAPER_TEST_TABLE,
    REFERENCE,
    Comparison,
    MethodSummary,
    PairedTest,
    collect_rows,
    compare,
    paired_tests,
    paper_values,
    read_rows,
    select,
    summarise,
    write_rows,
)

#: family -> (study folder, what it is), in page order.
FAMILIES = {"deep": ("studies/reproduction-deep", "deep-narrow MLP (32 layers × 32), the paper's Tables 9/10"),
            "table1": ("studies/reproduction-table1", "Transformer regressor (8 × 256), the paper's Tables 1/2")}
#: Included verbatim after our sections, in this order, when present.
INCLUDED = [("discussion.md", "What held and what did not"),
            ("sections/instructions.md", "Instructions that carry information"),
            ("sections/continual.md", "Continual routing on synthetic shifts")]
CSV_NAME = "configurations.csv"
METHOD_ORDER = ["lora", "dora", "hyra", "replora", "doran", "queryable"]


def _rebased(markdown: str, folder: Path) -> str:
    """A section's relative links and images (written beside it, e.g. in ``sections/``), made
    relative to the page that includes it; URLs, absolute paths and anchors stay as they are."""
    import re

    if folder == Path("."):
        return markdown
    return re.sub(r"\]\((?![a-z]+:|/|#)([^)\s]+)\)", lambda m: f"]({(folder / m.group(1)).as_posix()})", markdown)


def _order(method: str) -> tuple:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), method)


# ---- collecting ---------------------------------------------------------------------------


def collect(root: str | Path, out: Path) -> list[str]:
    """Rewrite ``out/configurations.csv`` from the runs under ``root``; returns the studies
    collected. A study with no run under ``root`` keeps its rows from the old CSV."""
    from qlsearch.study import load_study, study_files

    csv_path = out / CSV_NAME
    old = read_rows(csv_path) if csv_path.exists() else []
    rows, collected = [], []
    for family, (folder, _) in FAMILIES.items():
        if not Path(folder).is_dir():
            continue
        for path in study_files(folder):
            study = load_study(path)
            if not (Path(root) / study.name).is_dir():
                continue
            try:
                found = collect_rows(study, root, family)
            except ValueError:
                continue  # not run in this storage
            if found:
                rows += found
                collected.append(study.name)
    rows += [r for r in old if r["study"] not in collected]
    if collected:
        write_rows(csv_path, rows)
    return collected


# ---- the page's sections ----------------------------------------------------------------


def _ratio_text(ratio: float | None) -> str:
    return "—" if ratio is None else f"{ratio:.3g}"


def _agree_text(c: Comparison) -> str:
    if c.method == REFERENCE:
        return "(reference)"
    return {True: "yes", False: "NO", None: "tie/—"}[c.agrees]


def _comparison_table(family: str, comparisons: list[Comparison], tables: Path) -> Table:
    columns = ["function", "method", "configuration (val-selected)", "test MSE (ours, mean ± std)",
               "ratio to LoRA (ours)", "paper test MSE", "ratio to LoRA (paper)", "agree in sign"]
    rows, full = [], []
    for c in sorted(comparisons, key=lambda c: (c.function, _order(c.method))):
        rows.append([c.function, c.method, c.ours.knobs, fmt(c.ours.test_mean, c.ours.test_std),
                     _ratio_text(c.ratio), "—" if c.paper is None else f"{c.paper:g}",
                     _ratio_text(c.paper_ratio), _agree_text(c)])
        full.append([c.function, c.method, c.ours.trial, c.ours.knobs, c.ours.val_mean, c.ours.test_mean,
                     c.ours.test_std, c.ratio, c.paper, c.paper_ratio, c.agrees])
    stem = f"{family}-comparison"
    write_csv(tables, stem, ["function", "method", "trial", "knobs", "val_mse_mean", "test_mse_mean",
                             "test_mse_std", "ratio_to_lora", "paper_test_mse", "paper_ratio_to_lora",
                             "agrees"], full)
    return Table(stem, "Test MSE at the validation-selected epoch, ours beside the paper's", columns, rows)


def _summary_table(family: str, summaries: list[MethodSummary], tables: Path) -> Table:
    columns = ["method", "functions", "beats LoRA (ours)", "beats LoRA (paper)", "agree", "disagree",
               "best of all (ours)", "best of all (paper)"]
    rows = [[s.method, s.functions, s.wins_ours, s.wins_paper, s.agree, s.disagree, s.best_ours, s.best_paper]
            for s in sorted(summaries, key=lambda s: _order(s.method))]
    write_csv(tables, f"{family}-agreement", columns, rows)
    return Table(f"{family}-agreement", "Win counts over functions and agreement in sign with the paper",
                 columns, [[str(v) for v in r] for r in rows])


def _paired_table(family: str, tests: list[PairedTest], tables: Path) -> Table:
    columns = ["method", "pairs (function × seed)", "method below LoRA", "median ratio to LoRA",
               "Wilcoxon statistic", "p-value (two-sided)"]
    rows = [[t.method, t.pairs, t.lower, t.median_ratio, t.statistic, t.p_value]
            for t in sorted(tests, key=lambda t: _order(t.method))]
    write_csv(tables, f"{family}-paired-test", columns, rows)
    return Table(f"{family}-paired-test", "Paired Wilcoxon signed-rank test against LoRA", columns,
                 [[r[0], str(r[1]), str(r[2]), f"{r[3]:.3g}", f"{r[4]:g}", f"{r[5]:.3g}"] for r in rows])


def _heatmap(family: str, comparisons: list[Comparison], figures: Path) -> FigureRef | None:
    """log10(ratio to LoRA) per function and method, ours beside the paper's."""
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    methods = sorted({c.method for c in comparisons if c.method != REFERENCE}, key=_order)
    functions = sorted({c.function for c in comparisons})
    if not methods or not functions:
        return None
    cell = {(c.function, c.method): c for c in comparisons}
    fig, axes = new_figure(1, 2, figsize=(7.0, 0.3 * len(functions) + 1.4), sharey=True)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-2.0, vmax=2.0)
    for ax, (title, attr) in zip(axes[0], (("ours (CPU scale)", "ratio"), ("paper", "paper_ratio")), strict=True):
        grid = np.full((len(functions), len(methods)), np.nan)
        for i, f in enumerate(functions):
            for j, m in enumerate(methods):
                value = getattr(cell[(f, m)], attr) if (f, m) in cell else None
                if value is not None and value > 0 and math.isfinite(value):
                    grid[i, j] = math.log10(value)
                    ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6)
        image = ax.imshow(np.clip(grid, -2, 2), cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_yticks(range(len(functions)), functions)
        ax.set_title(title)
    fig.colorbar(image, ax=axes[0].tolist(), label="log10(test MSE / LoRA's)", shrink=0.8)
    stem = f"{family}-ratio-to-lora"
    save_figure(fig, figures, stem)
    return FigureRef(stem, "Test MSE over LoRA's on the same function (cell text: the ratio; blue: below "
                           "LoRA, red: above; colours clipped at 100× either way), ours beside the paper's.")


def _headline(summaries: list[MethodSummary], tests: list[PairedTest], n_rows: int) -> list[str]:
    """Sentences written from the numbers alone (the discussion is hand-written)."""
    out = []
    by_method = {t.method: t for t in tests}
    for s in sorted(summaries, key=lambda s: _order(s.method)):
        if s.method == REFERENCE:
            continue
        t = by_method.get(s.method)
        test = (f"; over {t.pairs} function × seed pairs it is below LoRA in {t.lower}, median ratio "
                f"{t.median_ratio:.3g}, Wilcoxon p = {t.p_value:.3g}") if t else ""
        out.append(f"{s.method}: beats LoRA on {s.wins_ours} of {s.functions} functions here, "
                   f"{s.wins_paper} in the paper; the sign agrees on {s.agree}, disagrees on {s.disagree}"
                   f"{test}.")
    return [f"From {n_rows} configuration × seed rows of `{CSV_NAME}`. " + " ".join(out)]


def family_sections(family: str, rows: list[dict], figures: Path, tables: Path) -> list[Section]:
    rows = [r for r in rows if r["family"] == family]
    if not rows:
        return []
    selected = select(rows)
    comparisons = compare(selected, {family: paper_values(family)})
    summaries, tests = summarise(comparisons), paired_tests(selected)
    folder, what = FAMILIES[family]
    functions = sorted({r["function"] for r in rows})
    failed = sum(r["status"] != "completed" for r in rows)
    intro = (f"The {what}, at CPU scale (`{folder}/`; settings and scale factors in "
             f"`protocol.md`): {len(functions)} functions, "
             f"{len({r['method'] for r in rows})} methods, seeds "
             f"{', '.join(sorted({r['seed'] for r in rows}, key=int))}; {len(rows)} configuration × seed rows, "
             f"{failed} failed. Per function and method the configuration with the lowest mean validation "
             f"MSE is scored by its test MSE at each seed's validation-selected epoch. The paper's numbers "
             f"are its {PAPER_SOURCE[PAPER_TEST_TABLE[family]]}, from `baselines/paper/`; its MSEs are "
             f"on raw targets and ours on standardised ones, so ratios to LoRA are compared, not values.")
    figure = _heatmap(family, comparisons, figures)
    return [
        Section(f"{family}-headline", f"{family}: headline", [intro, *_headline(summaries, tests, len(rows))],
                [figure] if figure else []),
        Section(f"{family}-agreement", f"{family}: agreement and wins",
                ["Beats LoRA: mean test MSE more than 1 % below LoRA's on that function; within 1 % "
                 "is a tie (Table 10 prints most baselines within 0.1 % of LoRA, e.g. every baseline "
                 "at 337.855 on Levy). Agree: both beat LoRA or both lose to it; a tie on either side "
                 "agrees with nothing. Best of all: lowest test MSE among these methods (the paper's "
                 "SOAP full fine-tuning column is left out)."],
                tables=[_summary_table(family, summaries, tables)]),
        Section(f"{family}-paired", f"{family}: paired test",
                ["Wilcoxon signed-rank on log(test MSE(method) / test MSE(LoRA)), paired by function and "
                 "seed (both at their validation-selected configurations), two-sided, "
                 "`scipy.stats.wilcoxon`. A small p-value with a median ratio below 1 says the method "
                 "beats LoRA across functions and seeds; above 1, that it loses."],
                tables=[_paired_table(family, tests, tables)]),
        Section(f"{family}-table", f"{family}: per function and method", [],
                tables=[_comparison_table(family, comparisons, tables)]),
    ]


# ---- writing --------------------------------------------------------------------------------


def build_page(out: Path) -> Path:
    """Write the page in ``out`` from ``out/configurations.csv``; returns ``index.html``."""
    import matplotlib
    from markdown_it import MarkdownIt

    from qlsearch.report import PAPER_STYLE
    from qlsearch.report._page import Header, write_pages

    csv_path = out / CSV_NAME
    if not csv_path.exists():
        raise ValueError(f"{csv_path}: not found; run the reproduction sweeps first (`make reproduction`)")
    rows = read_rows(csv_path)
    figures, tables = out / "figures", out / "tables"
    for generated in (figures, tables):
        shutil.rmtree(generated, ignore_errors=True)
    with matplotlib.rc_context(PAPER_STYLE):
        ours = [s for family in FAMILIES for s in family_sections(family, rows, figures, tables)]
    md_sections, html_sections = list(ours), list(ours)
    renderer = MarkdownIt("commonmark").enable("table")
    for name, title in INCLUDED:
        path = out / name
        if path.exists():
            text = _rebased(path.read_text(), Path(name).parent)
            first, _, rest = text.partition("\n")
            if first.startswith("## "):  # the file's own title (it also reads alone) heads its section
                title, text = first.removeprefix("## ").strip(), rest
            key = Path(name).stem
            md_sections.append(Section(key, title, [text.strip()]))
            html_sections.append(Section(key, title, [], html=renderer.render(text)))
    missing = [f for f in FAMILIES if not any(r["family"] == f for r in rows)]
    header = Header(
        "Reproducing the paper's synthetic tables at CPU scale",
        "The paper's Tables 2 and 10 (test MSE, nine 2-D functions, every method against LoRA), rerun "
        "with the suite at a scale a 2-core CPU runs, and how far the two agree.",
        [("protocol", "`protocol.md`: every setting beside the paper's, with the scale factor"),
         ("data", f"`{CSV_NAME}`: every configuration × seed (function, method, knobs, seed, "
                  "validation-selected epoch, validation, test and train MSE, trial, status)"),
         ("regenerate", "`make reproduction` (runs the sweeps with --resume, then "
                        "`python -m qlsearch.report.reproduction`)"),
         ("families", ", ".join(f"{f}: {FAMILIES[f][1]}" for f in FAMILIES if f not in missing)
          + (f"; not run: {', '.join(missing)}" if missing else ""))])
    return write_pages(header, md_sections, html_sections, out, markdown_name="index.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlsearch.report.reproduction", description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="runs", help="run folder the reproduction sweeps used")
    parser.add_argument("--out", default="reports/reproduction", help="the page's folder (holds the CSV)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    collected = collect(args.root, out)
    print(f"collected: {', '.join(collected) or 'nothing new (page from the committed CSV)'}")
    print(build_page(out))


if __name__ == "__main__":
    main()
