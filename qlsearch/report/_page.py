"""The page: a header (what, where, when, on what) and the sections, as ``index.html`` and
``report.md``.

The HTML is one self-contained file with relative links only, so the folder
opens from disk or any static host. Nothing on it depends on when it was
written: the only time shown is the study's own (its last trial's completion).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import NamedTuple

from qlsearch.report._coverage import coverage_rows
from qlsearch.report._data import Section, StudyData, Table, axis_label, fmt, machine_text
from qlsearch.status import OVERHEAD_PARTS, overhead_breakdown, version_lines

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1rem 2rem 3rem; color: #1d1d1f; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
nav a { margin-right: 0.9rem; } .muted { color: #666; }
dl.header { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; }
dl.header dt { font-weight: 600; } dl.header dd { margin: 0; overflow-wrap: anywhere; }
figure { margin: 1rem 0 1.6rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #444; }
.scroll { overflow-x: auto; margin: 0.5rem 0 1.2rem; }
table { border-collapse: collapse; font-size: 0.82rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f6; position: sticky; top: 0; }
tr.failed td { background: #fdecea; } td.failure { max-width: 28rem; overflow-wrap: anywhere; }
code { background: #f4f4f6; padding: 0 0.2rem; }
.controls { display: flex; flex-wrap: wrap; gap: 0.4rem 1.2rem; align-items: center; margin: 0.6rem 0;
            font-size: 0.9rem; } .controls .range { margin-right: 0.8rem; } .controls input[type=number] { width: 5rem; }
.plot { width: 100%; min-height: 460px; } #explore-table tbody tr { cursor: pointer; }
#explore-table tbody tr:hover td { background: #eef4fb; } th.sortable { cursor: pointer; user-select: none; }
#record { border: 1px solid #ccc; padding: 0 1rem; margin: 1rem 0; background: #fafafa; }
#explore-table td.knobs { min-width: 14rem; }
#record pre { max-height: 30rem; overflow: auto; font-size: 0.78rem; } .pc-line { cursor: pointer; }
"""


class Header(NamedTuple):
    title: str
    description: str
    rows: list[tuple[str, str]]  # (what, value), in order


def _storage(url: str) -> str:
    """The storage URL without its password (PostgreSQL URLs may carry one); a SQLite file
    under the current folder (the project root) as a relative path, so the page names no
    absolute path of the machine that wrote it."""
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///"):])
        try:
            return f"sqlite:///{path.resolve().relative_to(Path.cwd().resolve())}"
        except ValueError:
            return f"sqlite:///{path.name} (outside the project folder)"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a SQLAlchemy URL: show it as given)
        return url


def _spans(numbers: list[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    out, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(f"#{start}" if start == n else f"#{start}-{n}")
            start = None
    return ", ".join(out)


def _per_trial(data: StudyData, describe) -> str:
    """What ``describe(record)`` says of each trial's records, grouped: ``A (#0-5); B (#6)``.
    Trials that never ran (a sampled repeat, PRUNED; one still waiting) have nothing to say."""
    seen: dict[str, list[int]] = {}
    for t in data.trials:
        if t.state in ("PRUNED", "WAITING"):
            continue
        for text in dict.fromkeys(describe(r) for r in t.records) or ["no record"]:
            seen.setdefault(text, []).append(t.number)
    if len(seen) == 1:
        return f"{next(iter(seen))} (every trial)"
    return "; ".join(f"{text} ({_spans(numbers)})" for text, numbers in seen.items())


def _versions(record: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items() if v)
    return f"{versions or 'versions not recorded'}; git {record.get('git') or 'not recorded'}"


def _get_header(data: StudyData) -> Header:
    study, trials = data.study, data.trials
    counts = {s: sum(t.state == s for t in trials) for s in ("COMPLETE", "FAIL", "RUNNING", "WAITING")}
    started = [t.started for t in trials if t.started]
    completed = [t.completed for t in trials if t.completed]
    rows = [
        ("study file", study.path or "(none: the study was built in code)"),
        ("storage", _storage(data.storage_url)),
        ("trials", f"{counts['COMPLETE']} finished, {counts['FAIL']} failed, {counts['RUNNING']} running"
                   + (f", {counts['WAITING']} waiting" if counts["WAITING"] else "")
                   + f" (of {len(trials)}; the study asks for {study.num_trials} searched"
                   + (f" + {data.user_attrs['more_trials']} added with --more" if data.user_attrs.get("more_trials") else "")
                   + f" + {len(study.baselines)} baseline(s))"),
        ("dates", f"first trial started {min(started):%Y-%m-%d %H:%M:%S}, last completed "
                  f"{max(completed):%Y-%m-%d %H:%M:%S}" if started and completed else "no trial has finished"),
        ("task", f"{study.task.kind} {study.task.name!r} on backbone {study.task.backbone!r}; "
                 f"{study.train.epochs} epochs at lr {study.train.lr:g}, batch {study.train.batch_size}; "
                 f"seeds {', '.join(map(str, study.seeds))}"),
        ("objectives", "; ".join(f"{axis_label(data, m.name)} ({'max' if m.higher_is_better else 'min'}imise)"
                                 for m in study.objectives)),
        ("selection", "ON THE TEST SET (allow_test_selection = true): test numbers here are not held-out "
                      "estimates" if study.allow_test_selection else "epochs and settings chosen on "
                      "validation; test metrics read at the selected epoch, never searched on"),
        ("searched", "; ".join(f"{s.method}: " + ", ".join(
            [f"{p.name} ∈ {{{', '.join(map(str, p.choices))}}}" if p.choices
             else f"{p.name} ∈ [{p.low}, {p.high}] (a range)" for p in s.params]
            + [f"{k} = {v}" for k, v in s.fixed.items()]) for s in study.spaces) or "nothing (baselines only)"),
    ]
    rows += coverage_rows(data)
    versions = version_lines([{"number": t.number, "state": t.state, "version": t.version} for t in trials],
                             data.user_attrs.get("file_versions") or [])
    if versions:
        rows.append(("file versions", " | ".join(versions)))
    rows.append(("environment", _per_trial(data, _versions) + ", from the trial records"))
    rows.append(("hardware", _per_trial(data, machine_text) + ", from the trial records"))
    sweeps = data.user_attrs.get("sweeps") or []
    if sweeps:
        wall = sum(s.get("wall_seconds") or 0.0 for s in sweeps)
        busy = sum(s.get("trial_seconds") or 0.0 for s in sweeps)
        parts = {key: sum(sw.get(key) or 0.0 for sw in sweeps) for key, _ in OVERHEAD_PARTS
                 if any(sw.get(key) is not None for sw in sweeps)}
        where = f" ({overhead_breakdown(parts)})" if parts else ""
        rows.append(("sweep overhead", f"{len(sweeps)} sweep(s), {fmt(wall)} s wall, {fmt(busy)} s in trials: "
                     f"{fmt(wall - busy)} s ({100 * (wall - busy) / wall:.1f}%) outside them{where}" if wall else
                     f"{len(sweeps)} sweep(s), nothing run"))
    else:
        rows.append(("sweep overhead", "not recorded (no `sweeps` attribute on the study)"))
    return Header(f"Study {study.name}", study.description, rows)


# ---- HTML ------------------------------------------------------------------------------------


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in table.columns)
    state = table.columns.index("state") if "state" in table.columns else None
    failure = table.columns.index("failure") if "failure" in table.columns else None
    body = []
    for row in table.rows:
        failed = state is not None and row[state].lower() == "failed"
        cells = "".join(f'<td class="failure">{_e(c)}</td>' if i == failure else f"<td>{_e(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f'<tr class="failed">{cells}</tr>' if failed else f"<tr>{cells}</tr>")
    return (f"<h3>{_e(table.title)}</h3>"
            f'<p class="muted">Full precision: <a href="tables/{_e(table.stem)}.csv">tables/{_e(table.stem)}.csv</a></p>'
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def _png_width(path: Path) -> int | None:
    """The pixel width in a PNG's header (its IHDR chunk), or None when unreadable."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(24)
    except OSError:
        return None
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else None


def _html_section(section: Section, folder: Path) -> str:
    parts = [f'<section id="{_e(section.key)}"><h2>{_e(section.title)}</h2>']
    parts += [f"<p>{_inline(p)}</p>" for p in section.paragraphs]
    if section.html:
        parts.append(section.html)
    for f in section.figures:
        # drawn at 200 dpi: shown at 100 px per inch, the size it prints at
        width = _png_width(folder / "figures" / f"{f.stem}.png")
        size = f' width="{width // 2}"' if width else ""
        parts.append(f'<figure><img src="figures/{_e(f.stem)}.png"{size} alt="{_e(f.caption)}">'
                     f'<figcaption>{_inline(f.caption)} <a href="figures/{_e(f.stem)}.svg">SVG</a> '
                     f'<a href="figures/{_e(f.stem)}.pdf">PDF</a></figcaption></figure>')
    parts += [_html_table(t) for t in section.tables]
    parts.append("</section>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then turn Markdown's `code` into <code>."""
    pieces = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(pieces))


def _html(header: Header, sections: list[Section], folder: Path, markdown_name: str = "report.md") -> str:
    nav = " ".join(f'<a href="#{_e(s.key)}">{_e(s.title)}</a>' for s in sections)
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_inline(v)}</dd>" for k, v in header.rows)
    description = _inline(header.description) or '<span class="muted">(no description)</span>'
    title = _e(header.title)
    head = ['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{title}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
            f"<h1>{title}</h1>", f"<p>{description}</p>",
            f'<nav>{nav} <a href="{_e(markdown_name)}">{_e(markdown_name)}</a></nav>',
            f'<section id="header"><dl class="header">{rows}</dl></section>']
    return "\n".join([*head, *(_html_section(s, folder) for s in sections), "</body>", "</html>"]) + "\n"


# ---- Markdown ----------------------------------------------------------------------------------


def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> str:
    lines = [f"**{table.title}** ([CSV](tables/{table.stem}.csv))", "",
             "| " + " | ".join(_md_cell(c) for c in table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def _markdown(header: Header, sections: list[Section]) -> str:
    out = [f"# {header.title}", "", header.description or "_(no description)_", ""]
    out += [f"- **{k}**: {v}" for k, v in header.rows]
    for s in sections:
        out += ["", f"## {s.title}", ""]
        for p in s.paragraphs:
            out += [p, ""]
        for f in s.figures:
            out += [f"![{_md_cell(f.caption)}](figures/{f.stem}.png)", "",
                    f"_{f.caption}_ ([SVG](figures/{f.stem}.svg), [PDF](figures/{f.stem}.pdf))", ""]
        for t in s.tables:
            out += [_md_table(t), ""]
    return "\n".join(out).rstrip() + "\n"


def write_page(data: StudyData, sections: list[Section], folder: Path) -> Path:
    """``index.html`` and ``report.md`` in ``folder``; returns the path of ``index.html``."""
    return write_pages(_get_header(data), sections, sections, folder)


def write_pages(header: Header, md_sections: list[Section], html_sections: list[Section], folder: Path,
                markdown_name: str = "report.md") -> Path:
    """``index.html`` from ``html_sections`` and ``<markdown_name>`` from ``md_sections`` (the
    same sections, except where one holds markup the other cannot show)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / markdown_name).write_text(_markdown(header, md_sections))
    page = folder / "index.html"
    page.write_text(_html(header, html_sections, folder, markdown_name))
    return page
