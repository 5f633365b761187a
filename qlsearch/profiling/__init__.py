"""Latency, decode throughput, training-step time, parameters and memory of adapter methods.

One frozen model built from a config (random weights, nothing downloaded), one
adapted copy per method, every method timed in the same process beside the
frozen model and PEFT LoRA (DESIGN.md, "Profiling"). Names are imported on
first use, so the CLI can read the settings' choices without loading torch.

>>> from qlsearch.profiling import ProfileSettings, profile_methods, format_table
>>> result = profile_methods(ProfileSettings("benchmarks/configs/launch-bound", seq=1))
>>> print(format_table(result))
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ProfileSettings": "_settings",
    "PAPER_TARGETS": "_settings",
    "DTYPES": "_settings",
    "SKIPPABLE": "_settings",
    "FROZEN": "_settings",
    "REFERENCE": "_settings",
    "MethodProfile": "_benchmark",
    "ProfileResult": "_benchmark",
    "profile_methods": "_benchmark",
    "machine_info": "_machine",
    "machine_tag": "_machine",
    "format_table": "_report",
    "format_markdown": "_report",
    "write_results": "_report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qlsearch.profiling.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qlsearch.profiling' has no attribute {name!r}")
