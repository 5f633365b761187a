"""Tasks: the synthetic source → target regressions (paper §4.1, §B.3) and the text tasks (§4.2)."""

from qlsearch.tasks.instructions import INSTRUCTIONS
from qlsearch.tasks.synthetic import (
    FUNCTIONS,
    FunctionSpec,
    SyntheticSplits,
    TargetShift,
    make_splits,
    sample,
    target_shift,
)
from qlsearch.tasks.text import (
    TEXT_TASKS,
    TextExample,
    encode_for_training,
    evaluate_generation,
    evaluate_multiple_choice,
    extract_final_answer,
    get_text_task,
    load_task,
)

__all__ = [
    "INSTRUCTIONS",
    "TEXT_TASKS",
    "TextExample",
    "encode_for_training",
    "evaluate_generation",
    "evaluate_multiple_choice",
    "extract_final_answer",
    "get_text_task",
    "load_task",
    "FUNCTIONS",
    "FunctionSpec",
    "SyntheticSplits",
    "TargetShift",
    "make_splits",
    "sample",
    "target_shift",
]
