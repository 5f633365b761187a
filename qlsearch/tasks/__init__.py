"""Tasks: the synthetic source → target regressions of the paper (§4.1, §B.3)."""

from qlsearch.tasks.synthetic import (
    FUNCTIONS,
    FunctionSpec,
    SyntheticSplits,
    TargetShift,
    make_splits,
    sample,
    target_shift,
)

__all__ = [
    "FUNCTIONS",
    "FunctionSpec",
    "SyntheticSplits",
    "TargetShift",
    "make_splits",
    "sample",
    "target_shift",
]
