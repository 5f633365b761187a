"""``qlsearch list``: what a study can name, from the registries themselves.

Each row is the name a study uses, where the entry comes from ("built-in",
"PEFT", "entry point (dist version)") and what it takes: a method's knobs with
their defaults, a function's domain and shifted coefficients, a task's kind and
dataset, a metric's direction. ``module:attribute`` references are not listed:
any importable one may be named.
"""

from __future__ import annotations


def _registry(kind: str):
    if kind == "methods":
        from qlsearch.adapters import METHODS

        return METHODS
    if kind == "tasks":
        from qlsearch.tasks.text import TEXT_TASK_REGISTRY

        return TEXT_TASK_REGISTRY
    if kind == "functions":
        from qlsearch.tasks.synthetic import FUNCTION_REGISTRY

        return FUNCTION_REGISTRY
    if kind == "multitasks":
        from qlsearch.tasks.multitask import MULTITASK_REGISTRY

        return MULTITASK_REGISTRY
    if kind == "metrics":
        from qlsearch.metrics import METRIC_REGISTRY

        return METRIC_REGISTRY
    raise ValueError(f"kind: got {kind!r}; allowed: methods, tasks, functions, multitasks, metrics")


def _details(kind: str, entry) -> dict:
    if kind == "methods":
        return {"summary": entry.summary, "knobs": dict(entry.knobs)}
    if kind == "tasks":
        return {"kind": entry.kind, "dataset": entry.hub_id}
    if kind == "functions":
        return {"domain": [list(d) for d in entry.domain], "shifted": dict(entry.coefficients)}
    if kind == "multitasks":
        return {"base": entry.base, "instructions": [m.instruction for m in entry.members]}
    return {"direction": entry.direction, "section": entry.section, "label": entry.label}


def listing(kind: str) -> list[dict]:
    """One row per name of the registry ``kind`` (methods, tasks, functions, multitasks, metrics)."""
    return [{"name": item.name, "origin": item.origin, **_details(kind, item.entry)}
            for item in _registry(kind).listed()]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def format_listing(rows: list[dict]) -> str:
    """A plain-text table: name, origin, then the rest as ``key=value`` pairs."""
    width = max((len(r["name"]) for r in rows), default=4) + 2
    origin_width = max((len(r["origin"]) for r in rows), default=6) + 2
    lines = []
    for row in rows:
        rest = {k: v for k, v in row.items() if k not in ("name", "origin")}
        parts = []
        for key, value in rest.items():
            if isinstance(value, dict) and key in ("knobs", "shifted"):
                parts.append(f"{key}: " + ", ".join(f"{k}={_short(v)}" for k, v in value.items()))
            else:
                parts.append(f"{key}: {value}")
        lines.append(f"{row['name']:<{width}}{row['origin']:<{origin_width}}{'; '.join(parts)}")
    return "\n".join(lines)
