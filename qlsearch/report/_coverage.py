"""How much of the search the study did: grid coverage, trials and budget per method, seeds.

A front from 6 of 12 grid points on one seed reads differently from a full grid
on five seeds; the page header says which it is. A method's budget is counted as
what its trials ran (trials × seeds × epochs) and the seconds they took, so an
unequal comparison shows as one.
"""

from __future__ import annotations

import json

from qlsearch.report._data import StudyData, fmt


def _grid_coverage(data: StudyData) -> str:
    study, parts = data.study, []
    for space in study.spaces:
        run = {json.dumps(t.knobs, sort_keys=True, default=str) for t in data.trials
               if t.method == space.method and not t.baseline}
        if space.params and all(p.choices for p in space.params):
            total = sum(method == space.method for method, _ in study.grid())
            parts.append(f"{space.method}: {len(run)} of the space's {total} grid points run")
        else:
            parts.append(f"{space.method}: {len(run)} distinct configurations of a space with ranges "
                         "(no finite grid)")
    return "; ".join(parts) or "nothing searched (baselines only)"


def _budget(data: StudyData) -> str:
    epochs, parts = data.study.train.epochs, []
    methods = dict.fromkeys(t.method or "?" for t in data.trials)
    for method in methods:
        mine = [t for t in data.trials if (t.method or "?") == method]
        searched = sum(not t.baseline for t in mine)
        runs = sum(len(t.records) for t in mine)
        seconds = sum(t.trial_seconds or 0.0 for t in mine)
        what = ", ".join(x for x in (f"{searched} searched" if searched else "",
                                     f"{len(mine) - searched} baseline" if len(mine) > searched else "") if x)
        parts.append(f"{method}: {len(mine)} trial(s) ({what}), {runs} seed run(s) × {epochs} epochs = "
                     f"{runs * epochs} epochs, {fmt(seconds)} s")
    return "; ".join(parts) or "no trials"


def _implementation(data: StudyData) -> str:
    """Where the study times latency, what a method's implementation does that its rivals'
    do not (``Method.advantage``): a latency comparison must say so."""
    from qlsearch.adapters import advantages

    methods = {t.method for t in data.trials if t.method}
    if not data.study.profile or len(methods) < 2:  # no latency, or none to compare it with
        return ""
    return "; ".join(f"{name}: {text}" for name, text in advantages(sorted(methods)).items())


def coverage_rows(data: StudyData) -> list[tuple[str, str]]:
    """Header rows: ``coverage``, ``budget per method``, ``seeds``; ``budget cap`` and
    ``resources`` when the budget was capped or the trials fell back to CPU, and
    ``implementation`` when a method timed beside others has an advantage to state."""
    seeds = data.study.seeds
    seed_note = ("one seed: no spread over seeds is known, so the only error bars are spreads a record "
                 "keeps itself (a latency's timing repeats)" if len(seeds) == 1 else
                 "error bars and ± are the standard deviation over these seeds")
    rows = [
        ("coverage", _grid_coverage(data)),
        ("budget per method", _budget(data)),
        ("seeds", f"{len(seeds)} ({', '.join(map(str, seeds))}); {seed_note}"),
    ]
    cap = data.study.budget().note  # "budget 10**12 capped at 12 distinct configurations ..."
    fallback = data.user_attrs.get("cpu_fallback")  # GPUs asked, Ray saw none, ran on CPU
    return rows + [(what, text) for what, text in (("budget cap", cap), ("resources", fallback),
                                                    ("implementation", _implementation(data))) if text]
