"""Text tasks from the Hugging Face hub (paper §4.2, §D.4): loading, training encoding, scoring.

Every task turns its dataset's rows (real field names) into one common record,
:class:`TextExample`; training and evaluation only ever see that record.

>>> train = load_task("arc_challenge", "train", limit=1000)
>>> batch = encode_for_training(tokenizer, train[:8], max_length=512)
>>> evaluate_multiple_choice(model, tokenizer, load_task("arc_challenge", "test"), batch_size=16)
{'accuracy': ..., 'accuracy_norm': ..., 'n': 1172}

Offline, or to use a copy on disk, point ``data_files`` at local JSON lines,
Parquet or CSV files in the hub's schema (or at a folder holding a snapshot of
the dataset repository)::

    load_task("gsm8k", "test", data_files="gsm8k/test.jsonl")
    load_task("gsm8k", "test", data_files={"test": "gsm8k/test.parquet"})
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Literal

from qlsearch._registry import Registry
from qlsearch.tasks import _text_formats as fmt
from qlsearch.tasks._text_answers import (
    answers_match,
    extract_final_answer,
    last_boxed,
    normalize_answer,
)
from qlsearch.tasks._text_scoring import (
    encode_for_training,
    evaluate_generation,
    evaluate_multiple_choice,
)
from qlsearch.tasks.instructions import INSTRUCTIONS

__all__ = [
    "TEXT_TASKS",
    "TextExample",
    "TextTask",
    "answers_match",
    "encode_for_training",
    "evaluate_generation",
    "evaluate_multiple_choice",
    "extract_final_answer",
    "get_text_task",
    "last_boxed",
    "load_task",
    "normalize_answer",
]

Kind = Literal["multiple_choice", "generation"]
DataFiles = str | PathLike | Sequence[str | PathLike] | Mapping[str, str | PathLike | Sequence[str | PathLike]]


@dataclass
class TextExample:
    """One example. ``answer`` is the training target: the correct choice's text for
    multiple choice, the full worked solution for generation (its final answer is
    read back with :func:`extract_final_answer`). ``instruction`` is the task's ``c``."""

    prompt: str
    answer: str
    choices: list[str] | None
    label: int | None
    instruction: str


@dataclass(frozen=True)
class TextTask:
    """A registry entry: where the rows come from and how one becomes a :class:`TextExample`.

    ``splits`` maps our split names to the hub's where they differ: ``"test"`` is
    the labelled ``validation`` split where the hub hides test labels. Where the hub
    has only a train split, ``holdout`` is the fraction of it (its last rows,
    rounded up) that ``"test"`` reads; ``"train"`` is the rest.

    ``"validation"`` selects epochs and must never be the test set: it is the hub's
    ``validation`` split where that split is not already our test (``validation``
    names it), otherwise a seeded random ``val_holdout`` of the train rows (rounded
    up, at least one), which ``"train"`` then leaves out. Other names (and
    ``datasets`` slicing such as ``"train[:100]"``) pass through to the hub unchanged.
    """

    name: str
    kind: Kind
    hub_id: str
    configs: tuple[str | None, ...]  # loaded one by one and concatenated
    fields: tuple[str, ...]  # the columns the formatter reads
    format: Callable[[dict, int], fmt.Parts] = field(repr=False)
    splits: dict[str, str] = field(default_factory=dict)
    holdout: float = 0.0
    validation: str | None = None  # the hub split "validation" reads; None: a seeded slice of train
    val_holdout: float = 0.1

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.name]

    def hub_split(self, split: str) -> str:
        return self.splits.get(split, split)


_MC: Kind = "multiple_choice"
_GEN: Kind = "generation"
_HIDDEN_TEST = {"test": "validation"}
_ARC = ("question", "choices", "answerKey")
_MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                  "number_theory", "prealgebra", "precalculus")


def _superglue(name: str, fields: tuple[str, ...], formatter, config: str | None = None) -> TextTask:
    return TextTask(f"superglue_{name}", _MC, "aps/super_glue", (config or name,), fields + ("label",),
                    formatter, _HIDDEN_TEST)


TEXT_TASKS: dict[str, TextTask] = {t.name: t for t in (
    # validation: the hub's own split where it has one besides a labelled test; every
    # other task validates on a seeded 10 % of its train rows
    TextTask("arc_challenge", _MC, "allenai/ai2_arc", ("ARC-Challenge",), _ARC, fmt.ai2_arc,
             validation="validation"),
    TextTask("arc_easy", _MC, "allenai/ai2_arc", ("ARC-Easy",), _ARC, fmt.ai2_arc, validation="validation"),
    TextTask("openbookqa", _MC, "allenai/openbookqa", ("main",),
             ("question_stem", "choices", "answerKey"), fmt.openbookqa, validation="validation"),
    TextTask("hellaswag", _MC, "Rowan/hellaswag", (None,),
             ("activity_label", "ctx_a", "ctx_b", "endings", "label"), fmt.hellaswag, _HIDDEN_TEST),
    TextTask("boolq", _MC, "google/boolq", (None,), ("question", "passage", "answer"), fmt.boolq,
             _HIDDEN_TEST),
    TextTask("race", _MC, "ehovy/race", ("all",), ("article", "question", "options", "answer"),
             fmt.race, validation="validation"),
    _superglue("boolq", ("question", "passage"), fmt.superglue_boolq),
    _superglue("cb", ("premise", "hypothesis"), fmt.superglue_cb),
    _superglue("copa", ("premise", "choice1", "choice2", "question"), fmt.superglue_copa),
    _superglue("rte", ("premise", "hypothesis"), fmt.superglue_rte),
    _superglue("wic", ("word", "sentence1", "sentence2"), fmt.superglue_wic),
    # wsc.fixed: the span indices corrected (the config lm-eval reads)
    _superglue("wsc", ("text", "span1_text", "span2_text"), fmt.superglue_wsc, "wsc.fixed"),
    TextTask("gpqa_diamond", _MC, "Idavidrein/gpqa", ("gpqa_diamond",),
             ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
              "Incorrect Answer 3"), fmt.gpqa, holdout=0.2),  # 198 rows: 158 / 40
    TextTask("gsm8k", _GEN, "openai/gsm8k", ("main",), ("question", "answer"), fmt.gsm8k),
    TextTask("math", _GEN, "EleutherAI/hendrycks_math", _MATH_SUBJECTS, ("problem", "solution"),
             fmt.problem_solution),
    TextTask("orca_math", _GEN, "microsoft/orca-math-word-problems-200k", (None,),
             ("question", "answer"), fmt.orca_math, holdout=0.01),  # ~200k rows
    TextTask("numina_math", _GEN, "AI-MO/NuminaMath-CoT", (None,), ("problem", "solution"),
             fmt.problem_solution),
)}


#: The built-ins, a ``TextTask`` named ``module:attribute``, or an entry point of ``qlsearch.tasks``.
TEXT_TASK_REGISTRY: Registry[TextTask] = Registry("text task", "task", "qlsearch.tasks", TextTask, TEXT_TASKS)


def get_text_task(name: str) -> TextTask:
    return TEXT_TASK_REGISTRY.get(name)


def load_task(name: str, split: str, limit: int | None = None, data_files: DataFiles | None = None,
              seed: int = 0) -> list[TextExample]:
    """The examples of task ``name`` on ``split`` (``"train"``, ``"validation"``, ``"test"``, or a hub split).

    ``limit`` keeps a random subset of that size, fixed by ``seed`` (``seed`` also
    fixes GPQA's choice order). ``data_files`` replaces the hub: one file or a list
    (then they hold ``split``), a ``{hub split: files}`` mapping, or a folder with a
    snapshot of the dataset repository; JSON lines, Parquet or CSV in the hub's schema.
    """
    task = get_text_task(name)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit: got {limit!r}; allowed: None or an integer >= 0")
    rows = _load_rows(task, split, data_files, seed)
    missing = [f for f in task.fields if f not in rows.column_names]
    if missing:
        raise ValueError(
            f"{name}: the data lacks field(s) {missing}; {task.hub_id} rows have {list(task.fields)} "
            f"(found: {rows.column_names})"
        )
    if limit is not None and limit < len(rows):
        rows = rows.shuffle(seed=seed).select(range(limit))
    examples = []
    for row in rows:
        parts = task.format(row, seed)
        if task.kind == _MC and parts.label is None:
            raise ValueError(
                f"{name}: split {split!r} has rows without a label (the hub hides test labels); "
                f"use 'test' (= {task.hub_split('test')!r})"
            )
        examples.append(TextExample(parts.prompt, parts.answer, parts.choices, parts.label,
                                    task.instruction))
    return examples


_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
             ".arrow": "arrow"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst", ".zip"}


def _load_rows(task: TextTask, split: str, data_files: DataFiles | None, seed: int):
    if split == "validation" and task.validation:
        return _load_hub_split(task, task.validation, data_files)
    if split not in ("train", "validation", "test") or (split == "test" and not task.holdout):
        return _load_hub_split(task, task.hub_split(split), data_files)
    # train (and validation or test where the hub has no split for them): the hub's train rows,
    # less the last `holdout` that test reads, less the seeded `val_holdout` validation reads
    rows = _load_hub_split(task, "train", data_files)
    cut = len(rows) - math.ceil(task.holdout * len(rows))
    if split == "test":
        return rows.select(range(cut, len(rows)))
    rows = rows.select(range(cut))
    if task.validation:
        return rows
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(rows))
    n_val = max(1, math.ceil(task.val_holdout * len(rows)))
    return rows.select(sorted(order[:n_val] if split == "validation" else order[n_val:]))


def _load_hub_split(task: TextTask, hub_split: str, data_files: DataFiles | None):
    import datasets  # imported on use: importing qlsearch stays light

    if data_files is None:
        try:
            parts = [datasets.load_dataset(task.hub_id, config, split=hub_split) for config in task.configs]
        except Exception as err:  # noqa: BLE001  (offline, gated, renamed: one clear message)
            raise RuntimeError(
                f"{task.name}: could not load {task.hub_id} {list(task.configs)} split {hub_split!r} "
                f"({type(err).__name__}: {err}). Offline or gated? Pass data_files= local "
                "JSON lines/Parquet/CSV files in the same schema"
            ) from err
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if isinstance(data_files, (str, PathLike)) and Path(data_files).is_dir():
        return datasets.load_dataset(str(data_files), split=hub_split)
    base = hub_split.split("[", 1)[0]
    if not isinstance(data_files, Mapping):
        data_files = {base: data_files}
    if base not in data_files:
        raise ValueError(
            f"data_files: no files for split {base!r} (what {task.name}'s split reads); "
            f"given: {sorted(data_files)}"
        )
    files = {k: [str(p) for p in ([v] if isinstance(v, (str, PathLike)) else v)]
             for k, v in data_files.items()}
    return datasets.load_dataset(_builder(files[base]), data_files=files, split=hub_split)


def _builder(files: list[str]) -> str:
    suffixes = {tuple(s for s in Path(f).suffixes if s not in _COMPRESSION)[-1:] for f in files}
    kinds = {_BUILDERS.get(s[0].lower()) if s else None for s in suffixes}
    if len(kinds) != 1 or None in kinds:
        raise ValueError(
            f"data_files: cannot tell the format of {files}; allowed: one of "
            f"{sorted(_BUILDERS)} (optionally compressed), not mixed"
        )
    return kinds.pop()
