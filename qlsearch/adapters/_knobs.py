"""What a knob accepts, declared once: the adapter configs and the study validation both read it.

A ``Knob`` is a knob's type, bounds and allowed values; an ``AtMost`` is a rule
between two knobs (paper B.2: ``top_k <= num_atoms``). A hand-written method
declares its knobs in its config dataclass's field metadata (``metadata={"knob": ...}``)
and its rules in the class attribute ``RULES``; ``check_values`` is what both the
config's ``__post_init__`` and ``Method.check_knobs`` (so the study, before anything
runs) call.

Decisions: a value is never coerced (``r = "8"`` and ``r = 8.0`` are errors, an
integer is accepted where a float is asked); ``True``/``False`` are not numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Knob:
    """One knob's allowed values: ``kind`` is ``int``, ``float``, ``str``, ``bool`` or ``list``
    (a non-empty list of non-empty names); ``low``/``high`` bound numbers (``*_open``: strict);
    ``choices`` lists the allowed strings; ``optional``: ``None`` (unset) is allowed too."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    optional: bool = False

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind is bool:
            return isinstance(value, bool)
        if self.kind is list:
            return isinstance(value, list | tuple) and len(value) > 0 and all(isinstance(v, str) and v for v in value)
        if self.kind is str:
            return isinstance(value, str) and bool(value) and (self.choices is None or value in self.choices)
        numeric = int if self.kind is int else int | float
        if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def allowed(self) -> str:
        """``an integer >= 1``, ``a finite number in [0, 1)``, ``one of 'gelu', 'relu'``, ..."""
        if self.kind is bool:
            text = "true or false"
        elif self.kind is list:
            text = "a non-empty list of names"
        elif self.kind is str:
            text = f"one of {', '.join(map(repr, self.choices))}" if self.choices else "a non-empty string"
        else:
            text = "an integer" if self.kind is int else "a finite number"
            if self.low is not None and self.high is not None:
                text += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
            elif self.low is not None:
                text += f" {'>' if self.low_open else '>='} {self.low:g}"
            elif self.high is not None:
                text += f" {'<' if self.high_open else '<='} {self.high:g}"
        return f"{text}, or leave it unset" if self.optional else text


@dataclass(frozen=True)
class AtMost:
    """``knob <= bound`` (``top_k <= num_atoms``): combinations that break it are never run."""

    knob: str
    bound: str


# The knobs most methods share, declared once.
POSITIVE_INT = Knob(int, low=1)
POSITIVE = Knob(float, low=0, low_open=True)
NON_NEGATIVE = Knob(float, low=0)
FINITE = Knob(float)
DROPOUT = Knob(float, low=0, high=1, high_open=True)
TARGETS = Knob(list, optional=True)
SEED = Knob(int, optional=True)


def knob_specs(config_class: type) -> dict[str, Knob]:
    """The ``Knob`` of every field of a config dataclass that declares one."""
    return {f.name: f.metadata["knob"] for f in fields(config_class) if "knob" in f.metadata}


def check_values(knobs: Mapping, specs: Mapping[str, Knob], where: str = "") -> None:
    """Each value against its knob's spec; a miss raises ``ValueError("<where>.<knob>: got V; allowed: ...")``."""
    for name, value in knobs.items():
        spec = specs.get(name)
        if spec is not None and not spec.accepts(value):
            raise ValueError(f"{where}{'.' if where else ''}{name}: got {value!r}; allowed: {spec.allowed()}")


def check_rules(knobs: Mapping, rules: tuple[AtMost, ...], defaults: Mapping, where: str = "") -> None:
    """Every rule on ``knobs`` over ``defaults`` (a knob left out takes its default)."""
    values = {**defaults, **knobs}
    for rule in rules:
        knob, bound = values.get(rule.knob), values.get(rule.bound)
        if isinstance(knob, int | float) and isinstance(bound, int | float) and knob > bound:
            given = "" if rule.bound in knobs else ", its default"
            raise ValueError(f"{where}{'.' if where else ''}{rule.knob}: got {knob!r}; allowed: "
                             f"<= {rule.bound} ({bound!r}{given})")
