"""qlsearch: hyperparameter search and Pareto benchmarking for Queryable LoRA.

Importing the package is cheap: it starts no Ray session and loads no back-end;
the public names below are imported on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "attach": "qlsearch.adapters",
    "list_methods": "qlsearch.adapters",
    "QueryableConfig": "qlsearch.adapters.queryable",
    "QueryableModel": "qlsearch.adapters.queryable",
    "InstructionEncoder": "qlsearch.adapters.queryable",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'qlsearch' has no attribute {name!r}")
