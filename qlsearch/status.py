"""What a study holds right now: its trials, its Pareto front, what the sweeps cost."""

from __future__ import annotations

from pathlib import Path

import optuna

#: Where a sweep's overhead went (keys of each entry of the study's ``sweeps`` attribute):
#: opening and preparing the study, starting Ray, Tune's setup and the trial workers'
#: start (process, imports) until the first trial runs, and the rest (scheduling
#: between trials, shutdown). Sweeps recorded before this breakdown lack some keys.
OVERHEAD_PARTS = (("storage_seconds", "storage"), ("ray_start_seconds", "Ray start"),
                  ("workers_start_seconds", "trial workers' start"), ("scheduling_seconds", "scheduling"))


def overhead_breakdown(sweep: dict) -> str:
    """``storage 0.9s, Ray start 3.8s, ...`` for the parts this sweep recorded."""
    return ", ".join(f"{label} {sweep[key]:.1f}s" for key, label in OVERHEAD_PARTS if sweep.get(key) is not None)


def open_existing(study_or_name: str, root: str | Path = "runs"):
    """An existing Optuna study from a study file (its storage) or a name under ``root``.

    Messages name the storage without its password; nothing is created.
    """
    from qlsearch._paths import inside
    from qlsearch._storage import check_storage, hide_password, open_storage
    from qlsearch.study import load_study

    if study_or_name.endswith(".toml") or Path(study_or_name).is_file():
        study = load_study(study_or_name)
        name, url = study.name, study.storage_url(root)
        if study.storage:
            check_storage(url)
        elif not Path(url.removeprefix("sqlite:///")).is_file():  # the default SQLite file: never create it
            raise ValueError(f"STUDY: study {name!r} has not run under {root}/ (no {url.removeprefix('sqlite:///')}); "
                             "give the --root it ran under")
    else:
        name = study_or_name
        path = inside(root, name, what="STUDY") / "study.db"
        if not path.is_file():
            raise ValueError(f"STUDY: no study {name!r} under {root}/ (looked for {path}); "
                             "give its study file, or the --root it ran under")
        url = f"sqlite:///{path.resolve()}"
    try:
        return optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        raise ValueError(f"STUDY: {hide_password(url)} holds no study named {name!r}") from None


#: A trial's quiet latency measurement as status shows it (qlsearch/profiling/_latency.py):
#: ``unit`` says per batch of how many examples; ``quiet`` whether the node was quiet.
LATENCY_FIELDS = ("forward_ms", "forward_ms_spread", "forward_ratio", "forward_ratio_spread",
                  "frozen_ms", "reference_ms", "batch", "unit", "reference", "quiet", "cached")


def _latency(attrs: dict) -> dict | None:
    latency = attrs.get("latency")
    return {k: latency.get(k) for k in LATENCY_FIELDS} if latency else None


def _row(trial: optuna.trial.FrozenTrial, objectives: list[str], reported: list[str]) -> dict:
    attrs = trial.user_attrs
    complete = trial.state.name == "COMPLETE"
    latency = _latency(attrs)
    return {
        "number": trial.number,
        "state": trial.state.name,
        "method": attrs.get("method"),
        "baseline": attrs.get("baseline"),
        "knobs": attrs.get("knobs"),
        "values": dict(zip(objectives, trial.values, strict=True)) if complete and trial.values else None,
        "std": {m: attrs.get(f"{m}_std") for m in objectives + reported} if complete else None,
        "reported": {m: attrs.get(m) for m in reported} if complete else None,
        "seeds": attrs.get("seeds"),
        # every seed's value, in the order of "seeds" (the objective is their mean)
        "seed_values": {m: attrs.get(f"{m}_seeds") for m in objectives + reported} if complete else None,
        "failure": attrs.get("failure"),
        "version": attrs.get("file_version"),  # of the study file (qlsearch/_drivers.py)
        "seconds": attrs.get("trial_seconds"),
        # where it ran: the Ray node's id, host and IP (its last attempt, when Tune retried it)
        "node": attrs.get("node"),
        "attempts": attrs.get("attempts"),
        "forward_ratio": latency and latency["forward_ratio"],
        "latency": latency,
    }


def method_budget(trials: list[dict]) -> dict[str, dict]:
    """Per method (a baseline under its label): configurations run or queued, completed, seeds.

    ``trials``: dicts with ``baseline``, ``method``, ``state``, ``failure`` and ``seeds`` (a list).
    """
    budget: dict[str, dict] = {}
    for t in trials:
        if (t["failure"] or "").startswith(("interrupted:", "repeat:")):  # queued again (search.INTERRUPTED,
            continue  # search.REPEAT): counted there
        entry = budget.setdefault(t["baseline"] or t["method"] or "?",
                                  {"searched": not t["baseline"], "configurations": 0, "completed": 0, "seeds": 0})
        entry["configurations"] += 1
        if t["state"] == "COMPLETE":
            entry["completed"] += 1
            entry["seeds"] = max(entry["seeds"], len(t["seeds"] or []))
    return budget


def study_status(ot_study) -> dict:
    """Trials, the front (Optuna's ``best_trials``), each method's budget and the sweeps' timing,
    as one JSON-able dict.

    One snapshot, safe while a sweep writes: the front is computed from the same list of
    trials (``best_trials`` would read them again), and values count only on COMPLETE trials.
    """
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    from qlsearch.metrics import reported_beside

    objectives = ot_study.user_attrs.get("objectives") or [f"objective_{i}" for i in range(len(ot_study.directions))]
    reported = reported_beside(objectives)
    trials = ot_study.get_trials(deepcopy=False)
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    front = _get_pareto_front_trials_by_trials(trials, ot_study.directions)
    rows = [_row(t, objectives, reported) for t in trials]
    return {
        "study": ot_study.study_name,
        "objectives": [{"metric": m, "direction": d.name.lower()}
                       for m, d in zip(objectives, ot_study.directions, strict=True)],
        "reported": reported,
        "counts": counts,
        "budget": method_budget(rows),
        "trials": rows,
        "front": [t.number for t in front],
        "sweeps": ot_study.user_attrs.get("sweeps", []),
        # "budget 10**12 capped at 12 distinct configurations ..." (qlsearch.study.Study.budget)
        "budget_note": ot_study.user_attrs.get("budget_note"),
        # why trials ran on CPU although the study asks for GPUs (resources.cpu_fallback)
        "cpu_fallback": ot_study.user_attrs.get("cpu_fallback"),
        "file_versions": [{k: v for k, v in version.items() if k != "sections"}
                          for version in ot_study.user_attrs.get("file_versions") or []],
    }


def version_lines(trials: list[dict], versions: list[dict]) -> list[str]:
    """``file version 2 (2026-...): trials 8-11; space.queryable.r: stored [2, 4], file [2, 4, 8]``,
    one line per version of the study file, when there is more than one.

    ``trials``: dicts with ``number`` and ``version``; ``versions``: the study's ``file_versions``.
    """
    if len(versions) < 2:
        return []
    lines = []
    for version in versions:
        numbers = [t["number"] for t in trials  # trials run before versions were kept: version 1
                   if (t.get("version") or (1 if t["state"] in ("COMPLETE", "FAIL") else None)) == version["version"]]
        changes = "; ".join(version.get("changes") or [])
        lines.append(f"file version {version['version']} ({version.get('created', '?')}): "
                     f"trials {_ranges(numbers) or 'none'}" + (f"; {changes}" if changes else ""))
    return lines


def _ranges(numbers: list[int]) -> str:
    """``0-5, 8, 10-11``."""
    spans: list[list[int]] = []
    for n in sorted(numbers):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def format_value(value) -> str:
    """Large whole numbers with thousands separators, other floats to 4 significant digits."""
    if isinstance(value, float):
        return f"{int(value):,}" if value.is_integer() and abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _fmt(value) -> str:
    return "-" if value is None else format_value(value)


def _mean_std(mean, std) -> str:
    """``0.0123 ± 0.0004`` (the std over seeds), ``-`` when there is no value."""
    return _fmt(mean) + (f" ± {format_value(float(std))}" if mean is not None and std is not None else "")


def format_budget(budget: dict[str, dict]) -> str:
    """``queryable 6 searched, lora 1 fixed, dora 1 fixed; 2 seeds each``."""
    parts = [f"{who} {b['configurations']} {'searched' if b['searched'] else 'fixed'}" for who, b in budget.items()]
    seeds = sorted({b["seeds"] for b in budget.values() if b["completed"]})
    each = f"; {'/'.join(map(str, seeds))} seeds each" if seeds else ""
    return ", ".join(parts) + each


def node_summary(trials: list[dict]) -> list[str]:
    """``4c7a2b2c on vm: 3 trials`` per Ray node that ran (the last attempt of) a trial."""
    counts: dict[tuple, int] = {}
    for t in trials:
        node = t.get("node") or {}
        if node.get("node_id"):
            key = (node["node_id"][:8], node.get("host"))
            counts[key] = counts.get(key, 0) + 1
    return [f"{node_id} on {host}: {n} trial{'s' * (n != 1)}" for (node_id, host), n in sorted(counts.items())]


def format_status(status: dict) -> str:
    objectives = [o["metric"] for o in status["objectives"]]
    reported = status.get("reported", [])
    front = set(status["front"])
    lines = [f"study {status['study']}: " + ", ".join(f"{n} {s.lower()}" for s, n in sorted(status["counts"].items())),
             "objectives: " + ", ".join(f"{o['metric']} ({o['direction']})" for o in status["objectives"])
             + (f"; reported beside them: {', '.join(reported)}" if reported else ""),
             f"budget (configurations per method): {format_budget(status.get('budget', {}))}",
             *[f"{what}: {status[key]}" for key, what in (("budget_note", "note"), ("cpu_fallback", "resources"))
               if status.get(key)],
             "values: mean ± std over the seeds (n)",
             ""]
    header = ["#", "state", "method", "n", *objectives, *reported, "xLoRA", "knobs / failure"]
    rows = []
    for t in status["trials"]:
        who = t["baseline"] or t["method"] or "?"
        std = t.get("std") or {}
        values = [_mean_std((t["values"] or {}).get(m), std.get(m)) for m in objectives]
        values += [_mean_std((t.get("reported") or {}).get(m), std.get(m)) for m in reported]
        detail = t["failure"] or " ".join(f"{k}={_fmt(v)}" for k, v in sorted((t["knobs"] or {}).items()))
        rows.append([f"{t['number']}{'*' if t['number'] in front else ''}", t["state"].lower(), who,
                     str(len(t.get("seeds") or [])) if t["values"] else "-", *values,
                     _fmt(t.get("forward_ratio")), detail])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(row[:-1], widths[:-1], strict=True)) + "  " + row[-1])
    lines += ["", f"Pareto front (*): trials {', '.join(map(str, sorted(front))) or 'none yet'}"]
    lines += version_lines(status["trials"], status.get("file_versions", []))
    nodes = node_summary(status["trials"])
    if len(nodes) > 1:  # a cluster: which node ran how many trials
        lines.append("nodes: " + ", ".join(nodes))
    measured = [t["latency"] for t in status["trials"] if t.get("latency")]
    if measured:
        units = sorted({m["unit"] for m in measured})
        lines.append(f"latency: forward_ms in {' / '.join(units)}, measured once per configuration with the "
                     f"node quiet; xLoRA = forward_ms / {measured[0]['reference']}, same process and inputs")
    for sweep in status["sweeps"]:
        if "overhead_fraction" in sweep:
            lines.append(f"sweep: {sweep['wall_seconds']:.1f}s wall, {sweep['trial_seconds']:.1f}s with trials "
                         f"running, overhead {sweep['overhead_seconds']:.1f}s "
                         f"({100 * sweep['overhead_fraction']:.1f}%: {overhead_breakdown(sweep)})")
    return "\n".join(lines)
