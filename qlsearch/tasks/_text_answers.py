"""Final answers of math solutions: extraction and the normal form exact match compares.

The same rules read the reference solution and the model's output, so a task
needs no answer column of its own: GSM8K writes ``#### 72``, MATH and
NuminaMath-CoT ``\\boxed{...}``, Orca-Math ends on the number.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces kept), or None.

    >>> last_boxed(r"so $\\boxed{\\frac{1}{2}}$ and \\boxed{x^{2}}")
    'x^{2}'
    """
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    return text[i + 1:j].strip()
            continue  # unbalanced: try an earlier one
        # "\boxed 5": the argument is the next token
        token = re.match(r"[^\s$]+", text[i:])
        if token:
            return token.group(0)
    return None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a solution: last ``\\boxed{}``, else what follows ``####``,
    else the last number; None when there is none.

    >>> extract_final_answer("3 + 4 = 7 apples.\\n#### 7")
    '7'
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        after = text.split("####", 1)[1].strip()
        number = _NUMBER.match(after)
        if number:
            return number.group(0)
        line = after.splitlines()[0].strip() if after else ""
        return line or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """A normal form for exact match: numbers canonical (``"1,000"``, ``"1000.0"`` and
    ``"$1000"`` all give ``"1000"``), LaTeX spacing and wrappers removed.

    >>> normalize_answer("1,000.50")
    '1000.5'
    """
    s = answer.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\mbox\{([^{}]*)\}", r"\1", s)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\$", ""), ("$", ""),
                     ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\s+", "", s).rstrip(".")
    if s and _PLAIN_NUMBER.fullmatch(s):
        try:
            value = Decimal(s.replace(",", ""))
        except InvalidOperation:
            return s
        if value == value.to_integral_value():
            return str(int(value))
        return format(value.normalize(), "f")
    return s


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Exact match of the normal forms; a missing answer never matches."""
    if predicted is None or reference is None:
        return False
    return normalize_answer(predicted) == normalize_answer(reference)
