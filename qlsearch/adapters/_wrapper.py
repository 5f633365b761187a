"""What every hand-written adapter shares: config I/O, target lookup, the model wrapper.

A method supplies its config dataclass (with ``AdapterConfig`` mixed in), its
layer, and a subclass of ``AdapterModel`` that says which linears it adapts;
freezing, attribute fall-through, parameter counts and safetensors
save/load are here, once.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qlsearch.adapters import Method
from qlsearch.adapters._knobs import AtMost, check_rules, check_values, knob_specs
from qlsearch.adapters._precision import canonical_name

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class AdapterConfig:
    """Mixin for a method's config dataclass: validation from the declared knobs, JSON round trip.

    Each field's ``metadata["knob"]`` (a ``Knob``) and the class's ``RULES`` are the one
    declaration of what the method accepts; the registry entry (``registry_entry``) checks
    a study's values against the same declaration before anything runs.
    """

    RULES: ClassVar[tuple[AtMost, ...]] = ()

    def __post_init__(self) -> None:
        targets = getattr(self, "target_modules", None)
        if isinstance(targets, str):  # one target name: a one-item list
            self.target_modules = [targets]
        elif isinstance(targets, tuple):
            self.target_modules = list(targets)
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        check_values(values, knob_specs(type(self)))
        check_rules(values, self.RULES, {})

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path):
        return cls.from_dict(json.loads(Path(path).read_text()))


def matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's rule: a module name matches a target when equal to it or ending in ``.target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def find_linears(model: nn.Module, targets: Sequence[str] | None,
                 default: Sequence[str] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules matching ``targets`` (or ``default``), in module order."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linears if matches(n, targets or default or ())]
    if not found:
        what = ("matches no nn.Linear" if targets or not default
                else f"(default {list(default)}) matches no nn.Linear; name the linears")
        _no_linear(linears, targets, what)
    return found


def find_layer_linears(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    """``find_linears(model, targets)``; for ``targets=None``, every ``nn.Linear`` inside the
    transformer layers (every one of a model without a layer list): PEFT's ``"all-linear"``."""
    if targets is not None:
        return find_linears(model, targets)
    layers = layer_list(model)
    prefix = layers[0] + "." if layers else ""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linears if n.startswith(prefix)]
    if not found:
        _no_linear(linears, targets, "matches no nn.Linear")
    return found


def layer_linear_names(model: nn.Module) -> list[str]:
    """The distinct names (last component) of the linears inside the transformer layers, in
    model order (``find_layer_linears(model, None)``): one target list every method accepts."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in find_layer_linears(model, None)))


def _no_linear(linears: list[str], targets: Sequence[str] | None, what: str):
    shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})[:20])
    raise ValueError(f"target_modules: {targets!r} {what}; linears here: {shown}")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` with the most children holding a linear: the transformer layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(any(isinstance(m, nn.Linear) for m in child.modules()) for child in module)
            if count > best_count:
                best, best_count = (name, module), count
    return best


def group_by_layer(model: nn.Module, names: Sequence[str]) -> list[list[str]]:
    """``names`` grouped into units in order: the linears of one transformer layer (a child of
    ``layer_list(model)``) form one unit; a linear outside the layers, or in a model without a
    layer list, is a unit of its own. Methods that share parameters per layer build on this."""
    layers = layer_list(model)
    prefix = layers[0] + "." if layers else None
    units: dict[str, list[str]] = {}
    for n in names:
        inside = prefix is not None and n.startswith(prefix)
        units.setdefault(n[len(prefix):].split(".", 1)[0] if inside else n, []).append(n)
    return list(units.values())


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Initialise under ``seed`` without disturbing the global RNG (no-op for None)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class AdapterModel(nn.Module):
    """A frozen base model whose chosen linears were replaced by a method's layers.

    Subclasses set ``method`` (the registry name written into checkpoints) and
    ``config_class``, and call ``replace(name, make_layer)`` for each target.
    Attributes the wrapper lacks (``config`` aside) fall through to the base model.
    """

    method: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, base_model: nn.Module, config: Any):
        super().__init__()
        self.base_model = base_model
        self.config = config
        self.adapted: list[str] = []
        base_model.requires_grad_(False)

    def replace(self, name: str, make_layer: Callable[[nn.Linear], nn.Module]) -> nn.Module:
        """Swap the linear ``name`` for ``make_layer(linear)`` and record it as adapted."""
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name)
        layer = make_layer(getattr(parent, child))
        setattr(parent, child, layer)
        self.adapted.append(name)
        return layer

    def adapted_layers(self) -> list[nn.Module]:
        return [self.base_model.get_submodule(n) for n in self.adapted]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # device, generation_config, ...

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # ---- parameters, save and load ------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The trainable tensors as stored, by their names without the precision policy's
        parametrization (``canonical_name``), so a checkpoint loads under either policy."""
        return {canonical_name(n): p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def print_trainable_parameters(self) -> None:
        total = sum(p.numel() for p in self.parameters())
        trainable = self.num_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, directory: str | Path) -> None:
        """Adapter weights (safetensors) and config (JSON); the base model is not saved."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous() for n, t in self.adapter_state_dict().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        (directory / ADAPTER_CONFIG).write_text(
            json.dumps({"method": self.method, **self.config.to_dict()}, indent=2) + "\n"
        )

    def load_adapter(self, directory: str | Path) -> None:
        tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        expected = set(self.adapter_state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"adapter checkpoint {directory} does not fit this model: "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        stored = {canonical_name(n): n for n, p in self.named_parameters() if p.requires_grad}
        self.load_state_dict({stored[n]: t for n, t in tensors.items()}, strict=False)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path):
        data = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"method: adapter checkpoint {directory} holds {method!r}, not {cls.method!r}")
        model = cls(base_model, cls.config_class.from_dict(data))
        model.load_adapter(directory)
        return model


def registry_entry(model_class: type[AdapterModel], summary: str, routing: str = "No") -> Method:
    """The registry line of a hand-written method: its knobs are its config's fields, with the
    config's defaults, knob specs and rules; ``attach(model, **knobs)`` builds the config
    (unknown knobs: ``ValueError``) and wraps ``model``, leaving only the adapter trainable.

    >>> METHOD = registry_entry(HyRAModel, "HyRA: ...", routing="Generated")
    """
    config_class = model_class.config_class

    def attach(model: nn.Module, **knobs) -> AdapterModel:
        return model_class(model, config_class.from_dict(knobs))

    attach.__doc__ = f"``{model_class.__name__}(model, {config_class.__name__}(**knobs))``; unknown knobs raise ``ValueError``."
    return Method(model_class.method, attach, summary, config_class().to_dict(), routing,
                  specs=knob_specs(config_class), rules=config_class.RULES)
