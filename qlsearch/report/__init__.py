"""Report pages for a study: Pareto fronts, tables, optimisation dynamics, routing, importances.

``write_report(study)`` reads the study's Optuna storage and its trial records
and writes ``reports/<study>/``: ``index.html`` (opens from disk), ``report.md``,
``figures/*.png|svg|pdf``, ``tables/*.csv``, ``trials/<n>.json`` (each trial's
records) and ``assets/`` (the page's JavaScript, plotly.js included). Regenerating an unchanged study
writes the same bytes.

>>> from qlsearch.study import load_study
>>> write_report(load_study("studies/quickstart.toml"))  # doctest: +SKIP
PosixPath('reports/quickstart/index.html')
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["write_report"]


def write_report(study, root: str | Path = "runs", out: str | Path = "reports") -> Path:
    """Write the report of ``study`` (a ``qlsearch.study.Study``) run under ``root``.

    Returns the path of ``<out>/<study.name>/index.html``. The ``figures/``,
    ``tables/`` and ``trials/`` folders there are rewritten from scratch, so
    nothing stale stays. Raises ``ValueError`` when the study was never run in its storage.
    """
    import matplotlib

    from qlsearch._paths import inside
    from qlsearch.report._data import load_study_data
    from qlsearch.report._page import write_page

    folder = inside(out, study.name, what="study.name")  # the only folder a report writes or clears
    data = load_study_data(study, root)
    figures, tables = folder / "figures", folder / "tables"
    for generated in (figures, tables):
        shutil.rmtree(generated, ignore_errors=True)
    with matplotlib.rc_context(PAPER_STYLE):
        sections = _sections(data, folder, figures, tables)
    return write_page(data, sections, folder)


#: Figures are drawn one paper column wide (3.5 in) with text this size, so they print as
#: they are: 8 pt labels, 7 pt ticks and legends.
PAPER_STYLE = {"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
               "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7}


def _sections(data, folder: Path, figures: Path, tables: Path) -> list:
    from qlsearch.report._curves import curves_section
    from qlsearch.report._dynamics import dynamics_section
    from qlsearch.report._explore import explore_section
    from qlsearch.report._front import front_section
    from qlsearch.report._importance import importance_section
    from qlsearch.report._routing import routing_section
    from qlsearch.report._tables import sweeps_section, table_sections

    return [
        explore_section(data, folder),
        front_section(data, figures),
        *table_sections(data, tables),
        curves_section(data, figures),
        dynamics_section(data, figures),
        routing_section(data, figures),
        importance_section(data, figures, tables),
        sweeps_section(data, tables),
    ]
