"""One dataset row (its real hub field names) -> prompt, answer, choices, label.

Multiple-choice prompts are cloze style, as lm-evaluation-harness writes them:
the prompt ends where the answer begins, and each choice is scored as the
continuation ``" " + choice``. The correct choice's text is also the training
target, so training and scoring read the same tokens.
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple


class Parts(NamedTuple):
    prompt: str
    answer: str
    choices: list[str] | None
    label: int | None


def _choice(prompt: str, choices: list[str], label: int | None) -> Parts:
    if label is not None and not 0 <= label < len(choices):
        raise ValueError(f"label: got {label}; allowed: 0 to {len(choices) - 1} ({len(choices)} choices)")
    return Parts(prompt, "" if label is None else choices[label], choices, label)


def _int_label(value) -> int | None:
    """SuperGLUE's hidden test labels are -1, HellaSwag's are ""."""
    if value is None or value == "":
        return None
    value = int(value)
    return None if value < 0 else value


def _letter_label(letters: list[str], key: str | None) -> int | None:
    if not key:
        return None
    if key not in letters:
        raise ValueError(f"answerKey: got {key!r}; allowed: {letters}")
    return letters.index(key)


# ---- multiple choice -------------------------------------------------------------------

def ai2_arc(row: dict, seed: int) -> Parts:
    """allenai/ai2_arc: question, choices{text,label}, answerKey (letters or digits)."""
    choices = row["choices"]
    return _choice(f"Question: {row['question']}\nAnswer:", list(choices["text"]),
                   _letter_label(list(choices["label"]), row["answerKey"]))


def openbookqa(row: dict, seed: int) -> Parts:
    """allenai/openbookqa (main): question_stem, choices{text,label}, answerKey."""
    choices = row["choices"]
    return _choice(f"Question: {row['question_stem']}\nAnswer:", list(choices["text"]),
                   _letter_label(list(choices["label"]), row["answerKey"]))


def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry "[title]"/"[step]" markup (lm-eval's preprocessing)
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(row: dict, seed: int) -> Parts:
    """Rowan/hellaswag: activity_label, ctx_a, ctx_b, endings, label ("0".."3"; "" on test)."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _choice(_hellaswag_clean(row["activity_label"] + ": " + ctx),
                   [_hellaswag_clean(e) for e in row["endings"]], _int_label(row["label"]))


def boolq(row: dict, seed: int) -> Parts:
    """google/boolq: question, passage, answer (bool)."""
    answer = row["answer"]
    return _choice(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"],
                   None if answer is None else int(bool(answer)))


def race(row: dict, seed: int) -> Parts:
    """ehovy/race: article, question, options (4), answer ("A".."D")."""
    options = list(row["options"])
    letters = [chr(ord("A") + i) for i in range(len(options))]
    return _choice(f"Article: {row['article']}\n\nQuestion: {row['question']}\nAnswer:", options,
                   _letter_label(letters, row["answer"]))


def superglue_boolq(row: dict, seed: int) -> Parts:
    """aps/super_glue boolq: question, passage, label (0 False, 1 True)."""
    return _choice(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"],
                   _int_label(row["label"]))


def superglue_cb(row: dict, seed: int) -> Parts:
    """aps/super_glue cb: premise, hypothesis, label (0 entailment, 1 contradiction, 2 neutral)."""
    return _choice(f"{row['premise']}\nQuestion: {row['hypothesis']}. True, False, or Neither?\nAnswer:",
                   ["True", "False", "Neither"], _int_label(row["label"]))


def superglue_copa(row: dict, seed: int) -> Parts:
    """aps/super_glue copa: premise, choice1, choice2, question (cause/effect), label."""
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    premise = row["premise"].strip()
    prompt = (premise[:-1] if premise.endswith(".") else premise) + " " + connector
    choices = [c[:1].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return _choice(prompt, choices, _int_label(row["label"]))


def superglue_rte(row: dict, seed: int) -> Parts:
    """aps/super_glue rte: premise, hypothesis, label (0 entailment, 1 not_entailment)."""
    return _choice(f"{row['premise']}\nQuestion: {row['hypothesis']} True or False?\nAnswer:",
                   ["True", "False"], _int_label(row["label"]))


def superglue_wic(row: dict, seed: int) -> Parts:
    """aps/super_glue wic: word, sentence1, sentence2, label (0 False, 1 True)."""
    prompt = (f"Sentence 1: {row['sentence1']}\nSentence 2: {row['sentence2']}\nQuestion: Is the "
              f"word '{row['word']}' used in the same way in the two sentences above?\nAnswer:")
    return _choice(prompt, ["no", "yes"], _int_label(row["label"]))


def superglue_wsc(row: dict, seed: int) -> Parts:
    """aps/super_glue wsc.fixed: text, span1_text, span2_text, label (0 False, 1 True)."""
    prompt = (f"Passage: {row['text']}\nQuestion: In the passage above, does the pronoun "
              f"\"*{row['span2_text']}*\" refer to \"*{row['span1_text']}*\"?\nAnswer:")
    return _choice(prompt, ["no", "yes"], _int_label(row["label"]))


def gpqa(row: dict, seed: int) -> Parts:
    """Idavidrein/gpqa: Question, Correct Answer, Incorrect Answer 1-3 -> 4 choices.

    The order is shuffled per example from ``(seed, Record ID or Question)``, so it
    is the same in every process and run (``random.Random`` hashes strings stably).
    """
    correct = row["Correct Answer"].strip()
    choices = [correct] + [row[f"Incorrect Answer {i}"].strip() for i in (1, 2, 3)]
    key = row.get("Record ID") or row["Question"]
    random.Random(f"{seed}|{key}").shuffle(choices)
    return _choice(f"Question: {row['Question'].strip()}\nAnswer:", choices, choices.index(correct))


# ---- generation ------------------------------------------------------------------------

def gsm8k(row: dict, seed: int) -> Parts:
    """openai/gsm8k (main): question, answer (reasoning, then ``#### <number>``)."""
    return Parts(f"Question: {row['question']}\nAnswer:", row["answer"].strip(), None, None)


def orca_math(row: dict, seed: int) -> Parts:
    """microsoft/orca-math-word-problems-200k: question, answer (ends on the number)."""
    return Parts(f"Question: {row['question']}\nAnswer:", row["answer"].strip(), None, None)


def problem_solution(row: dict, seed: int) -> Parts:
    """MATH (hendrycks) and AI-MO/NuminaMath-CoT: problem, solution (``\\boxed{}`` answer)."""
    return Parts(f"Problem: {row['problem']}\nSolution:", row["solution"].strip(), None, None)
