"""One registry for every adapter method: ``attach(model, method, **knobs)``.

A study names a method by string; the registry maps it to a function that
wraps a base model and returns the adapted model. PEFT's own methods are used
through PEFT, never rewritten: the built-in ``lora``, ``dora``, ``lily`` and
``vblora`` with our knob names, and every method the installed PEFT registers
as ``peft:<name>`` with its config's own fields. User methods are a ``Method``
named by ``module:attribute`` or by an entry point of group ``qlsearch.methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from difflib import get_close_matches

import torch
from torch import nn

from qlsearch._registry import Registry
from qlsearch.adapters._knobs import AtMost, Knob, check_rules, check_values


@dataclass(frozen=True)
class Method:
    name: str
    attach: Callable[..., nn.Module]
    summary: str
    knobs: dict[str, object] = field(default_factory=dict)
    #: Table 6's columns: how the update depends on the input, and whether text steers it.
    routing: str = "No"
    instruction: bool = False
    #: what each knob accepts and the rules between knobs (``qlsearch.adapters._knobs``): the one
    #: declaration the method's config and the study validation both check against
    specs: Mapping[str, Knob] = field(default_factory=dict)
    rules: tuple[AtMost, ...] = ()
    #: a further check of a whole set of knobs (e.g. building PEFT's config with them):
    #: ``check(knobs, where)`` raises ``ValueError("<where>...: ...; allowed: ...")``
    check: Callable[[dict, str], None] | None = None
    #: what this method's implementation does that its rivals' (PEFT's layers) do not, where
    #: that shows in latency: reports and profiles state it beside the times ("": nothing)
    advantage: str = ""

    def check_names(self, names, where: str = "knobs", also: tuple[str, ...] = ()) -> None:
        """Every name must be one of this method's knobs or of ``also`` (settings a study puts
        beside them, e.g. ``lr``); a near miss is suggested."""
        allowed = [*self.knobs, *also]
        for name in names:
            if name not in allowed:
                close = get_close_matches(name, allowed, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{where}.{name}: not a knob of {self.name}; allowed: "
                                 f"{', '.join(sorted(allowed))}.{hint}")

    def check_values(self, knobs: Mapping, where: str = "knobs") -> None:
        """Names (``check_names``), then each value against its knob's spec, one at a time."""
        self.check_names(knobs, where)
        check_values(knobs, self.specs, where)

    def check_knobs(self, knobs: Mapping, where: str = "knobs") -> None:
        """One whole configuration (knobs left out take their defaults): names, values,
        the rules between knobs, then ``check``."""
        self.check_values(knobs, where)
        check_rules(knobs, self.rules, self.knobs, where)
        if self.check is not None:
            self.check(dict(knobs), where)


METHODS: Registry[Method] = Registry("adapter", "method", "qlsearch.methods", Method)


def register(method: Method) -> Method:
    """Make ``method`` a built-in: named by ``method.name`` (a clash raises ``ValueError``)."""
    return METHODS.add(method.name, method)


def get_method(name: str) -> Method:
    """The method a study names: built-in, ``peft:<name>``, ``module:attribute`` or an entry point."""
    return METHODS.get(name)


def advantages(names: Iterable[str]) -> dict[str, str]:
    """``Method.advantage`` of each of ``names`` that states one, for a comparison of their
    latency to say so (a name that no longer resolves, e.g. an uninstalled plug-in, has none)."""
    found = {}
    for name in dict.fromkeys(names):
        try:
            text = get_method(name).advantage
        except ValueError:
            continue
        if text:
            found[name] = text
    return found


def list_methods() -> list[Method]:
    """The built-in methods (``METHODS.listed()`` adds PEFT's and the installed plug-ins)."""
    return [METHODS.builtins[n] for n in sorted(METHODS.builtins)]


def attach(model: nn.Module, method: str, precision: str | None = "mixed", **knobs) -> nn.Module:
    """Adapt ``model`` with ``method`` (a registry name) and return the adapted model.

    Only the adapter's parameters are left trainable. Knobs not given take the
    method's defaults (``list_methods()`` shows them). ``precision`` is the one
    policy every method runs under (``qlsearch.adapters._precision``): ``"mixed"``
    stores the trainable weights in float32 and computes in the model's dtype,
    ``"model"`` stores them in the model's dtype.

    >>> adapted = attach(model, "queryable", r=8, num_atoms=16, top_k=4)
    """
    from qlsearch.adapters._precision import PRECISIONS, apply_precision

    if precision is not None and precision not in PRECISIONS:  # before any work is done
        raise ValueError(f"precision: got {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return apply_precision(get_method(method).attach(model, **knobs), precision)


def auxiliary_loss(model: nn.Module) -> torch.Tensor | float:
    """Sum of the auxiliary losses the adapter's modules produced in the last forward.

    The one hook through which methods add training terms (e.g. MoE-LoRA's load
    balance and contrastive losses): any module may define
    ``auxiliary_loss(self) -> Tensor | None``, returning its already-weighted term
    for the last forward. The training loop adds this sum to the task loss.
    Returns ``0.0`` when no module contributes.
    """
    total: torch.Tensor | float = 0.0
    for module in model.modules():
        fn = getattr(module, "auxiliary_loss", None)
        if module is not model and callable(fn):
            term = fn()
            if term is not None:
                total = total + term
    return total


from qlsearch.adapters import _builtin, _peft_any  # noqa: E402,F401  (register the built-ins, peft:<name>)
