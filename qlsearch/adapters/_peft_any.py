"""Every method the installed PEFT registers, as ``peft:<name>`` (``peft:loha``, ``peft:ia3``, ...).

The knobs are the fields of the method's PEFT config dataclass, with PEFT's
names and defaults (the fields every ``PeftConfig`` has, such as ``task_type``,
are not knobs). Values are checked against the fields' type hints, then by
building the config (PEFT's own ``__post_init__``), when the study is validated. Like every other method, ``target_modules`` unset means every linear
of the transformer layers (PEFT's ``"all-linear"``); a trial names its targets.

Decisions:

* Prompt-learning methods (prompt, prefix, P-tuning, ...) add virtual tokens and
  adapt no linear: they cannot run under the targets every other method gets,
  so naming one is an error that says so.
* A method whose training loop must do more than step the optimizer, or that
  needs something a study cannot describe, is refused with the reason
  (``_CANNOT_RUN``); AdaLoRA is one: its rank budget is reallocated by
  ``update_and_allocate(step)`` after every optimizer step, which our training
  loop does not call, and without it AdaLoRA would silently be a fixed-rank SVD
  adapter. Its ``total_step`` would come from the trial.

Nothing here imports PEFT before a ``peft:`` name is used.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from collections.abc import Mapping, Sequence

from torch import nn

from qlsearch._registry import Family, unknown_name
from qlsearch.adapters import METHODS, Method

PREFIX = "peft"

_CANNOT_RUN = {
    "adalora": "AdaLoRA reallocates its rank budget with update_and_allocate(step) after every "
               "optimizer step, which the training loop does not call; use peft:lora, or a "
               "plug-in method (module:attribute) with its own loop",
    "xlora": "X-LoRA mixes already trained LoRA adapters (its `adapters` field): a study cannot "
             "give them",
    "trainable_tokens": "it trains token embeddings, not linears, so it cannot take the study's targets",
    "adaption_prompt": "it adds prompts to attention layers, not linears, so it cannot take the "
                       "study's targets",
}


def _configs() -> dict[str, type]:
    """PEFT's method name → config class, for every method PEFT registers."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return {str(getattr(t, "value", t)).lower(): c for t, c in PEFT_TYPE_TO_CONFIG_MAPPING.items()}


def _prompt_learning(config_class: type) -> bool:
    from peft.config import PromptLearningConfig

    return issubclass(config_class, PromptLearningConfig)


def runnable() -> list[str]:
    """The PEFT methods a study can name: every registered one but the prompt-learning ones
    and those in ``_CANNOT_RUN``."""
    return sorted(n for n, c in _configs().items() if not _prompt_learning(c) and n not in _CANNOT_RUN)


def _knobs(config_class: type) -> dict[str, object]:
    """The method's own config fields and their defaults."""
    from peft import PeftConfig

    common = {f.name for f in dataclasses.fields(PeftConfig)}
    knobs = {}
    for f in dataclasses.fields(config_class):
        if f.name in common or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            knobs[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            knobs[f.name] = f.default_factory()
        else:
            knobs[f.name] = None
    return knobs


def fits(value, hint) -> bool:
    """Whether a study value (TOML: bool, int, float, str, list, table) fits the type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or isinstance(hint, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin in (list, tuple, set, frozenset, Sequence) or hint in (list, tuple):
        item = args[0] if args else typing.Any  # list[X], tuple[X, ...]
        return isinstance(value, list | tuple) and all(fits(v, item) for v in value)
    if origin in (dict, Mapping) or hint is dict:
        return isinstance(value, dict)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or value in {m.name for m in hint}
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint we cannot read: PEFT's __post_init__ decides


def describe(hint) -> str:
    """``typing.Union[str, list[str], NoneType]`` → ``list[str] | str | None``.

    A union's members are sorted, ``None`` last: ``typing`` caches equal unions, so the order
    of ``Union[int, list[int]]``'s args depends on which spelling the process built first."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        names = sorted(describe(a) for a in args if a is not type(None))
        return " | ".join(names + ["None"] * (type(None) in args))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if hint is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(describe(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


@functools.cache
def peft_method(name: str) -> Method:
    """The registry entry of PEFT's method ``name`` (``"loha"``); an unknown or unrunnable name
    raises ``ValueError`` naming the allowed ones or the reason."""
    import peft

    configs = _configs()
    field = "method"
    if name not in configs:
        raise unknown_name(f"{PREFIX}:{name}", [f"{PREFIX}:{n}" for n in runnable()], field,
                       f"PEFT {peft.__version__} method")
    config_class = configs[name]
    if _prompt_learning(config_class):
        raise ValueError(f"{field}: {PREFIX}:{name} is a prompt-learning method: it adds virtual tokens "
                         "and adapts no linear, so it cannot run under the study's targets")
    if name in _CANNOT_RUN:
        raise ValueError(f"{field}: {PREFIX}:{name} cannot run here: {_CANNOT_RUN[name]}")
    full = f"{PREFIX}:{name}"
    defaults = _knobs(config_class)
    hints = typing.get_type_hints(config_class)

    def config(knobs: dict):
        values = {**defaults, **knobs}
        if "target_modules" in values:
            values["target_modules"] = values["target_modules"] or "all-linear"
        return config_class(**values)

    def check(knobs: dict, where: str) -> None:
        """The fields' type hints first (a clear ``allowed``), then PEFT's own ``__post_init__``."""
        for knob, value in knobs.items():
            if knob in hints and not fits(value, hints[knob]):
                raise ValueError(f"{where}.{knob}: got {value!r}; allowed: {describe(hints[knob])} "
                                 f"({config_class.__name__}.{knob}, default {defaults[knob]!r})")
        try:
            config(knobs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: {full} ({config_class.__name__}) refused {knobs}: {err}") from None

    def attach(model: nn.Module, **knobs) -> nn.Module:
        method.check_knobs(knobs, "knobs")
        return peft.get_peft_model(model, config(knobs))

    method = Method(full, attach, f"{config_class.__name__} from PEFT {peft.__version__}", defaults,
                    check=check)
    return method  # attach checks its knobs through it


METHODS.add_family(Family(PREFIX, "PEFT", runnable, peft_method))
