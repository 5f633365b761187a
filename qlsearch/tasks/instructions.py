"""Default task instructions: the text ``c`` whose embedding ``e(c)`` steers the route.

One string per text task (paper §3: the instruction prior ``rho`` and the query
channel ``lambda_ctx Q_ctx e(c)``). They describe the task, not the example, so
every example of a task carries the same ``c``; a batch may still mix tasks.
The instruction is *not* written into the prompt: the model reads it only
through ``e(c)``, so the plain adapters see exactly the same tokens.
"""

from __future__ import annotations

_SCIENCE = "Answer the following science question by choosing the correct option."
_BOOLQ = "Read the passage and answer the yes/no question about it."

INSTRUCTIONS: dict[str, str] = {
    # multiple choice
    "arc_challenge": _SCIENCE,
    "arc_easy": _SCIENCE,
    "openbookqa": "Answer the following elementary science question by choosing the correct "
                  "option, using common knowledge about the world.",
    "hellaswag": "Choose the most plausible continuation of the following description of an "
                 "everyday situation.",
    "boolq": _BOOLQ,
    "race": "Read the article and answer the question about it by choosing the correct option.",
    "superglue_boolq": _BOOLQ,
    "superglue_cb": "Decide whether the premise entails the hypothesis, contradicts it, or neither.",
    "superglue_copa": "Choose the more plausible cause or effect of the given premise.",
    "superglue_rte": "Decide whether the premise entails the hypothesis.",
    "superglue_wic": "Decide whether the word is used with the same meaning in both sentences.",
    "superglue_wsc": "Decide whether the pronoun refers to the given noun phrase.",
    "gpqa_diamond": "Answer the following graduate-level science question by choosing the "
                    "correct option.",
    # generation
    "gsm8k": "Solve the following grade-school math word problem step by step and give the "
             "final numerical answer after ####.",
    "math": "Solve the following competition mathematics problem step by step and put the "
            "final answer in \\boxed{}.",
    "orca_math": "Solve the following math word problem step by step and state the final "
                 "numerical answer.",
    "numina_math": "Solve the following mathematics problem step by step and put the final "
                   "answer in \\boxed{}.",
}
