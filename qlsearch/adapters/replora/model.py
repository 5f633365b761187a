"""Attach RepLoRA to a model: units, the shared first layers, fold, save/load.

A *unit* is one transformer layer (the children of the model's largest
``nn.ModuleList`` that hold a linear); its adapted projections (by default Q
and V) share the first MLP layer. In a model without a layer list (a plain
MLP), each adapted linear is a unit of its own.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qlsearch.adapters.replora.config import RepLoRAConfig
from qlsearch.adapters.replora.layer import RepLoRALinear, SharedInput

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The ``nn.ModuleList`` with the most children holding a linear: the transformer layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(any(isinstance(m, nn.Linear) for m in child.modules()) for child in module)
            if count > best_count:
                best, best_count = (name, module), count
    return best


def find_units(model: nn.Module, targets: Sequence[str]) -> list[list[str]]:
    """Names of the linears to adapt, grouped into units (transformer layers) in model order."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    names = [n for n in linears if _matches(n, targets)]
    if not names:
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})[:20])
        raise ValueError(f"target_modules: {list(targets)!r} matches no nn.Linear; linears here: {shown}")
    layers = _layer_list(model)
    prefix = layers[0] + "." if layers else None
    units: dict[str, list[str]] = {}
    for n in names:
        inside = prefix is not None and n.startswith(prefix)
        key = n[len(prefix):].split(".", 1)[0] if inside else n  # outside the layers: a unit of its own
        units.setdefault(key, []).append(n)
    return list(units.values())


def parameter_count(config: RepLoRAConfig, units: Sequence[Sequence[tuple[int, int]]]) -> int:
    """Trainable parameters of RepLoRA on units of adapted linears of ``(d_in, d_out)`` shapes.

    ``sum_t [r (d_in + d_out) + 2 (h r + r)]``  (seeds A0, B0; heads W2_A, W2_B with biases)
    ``+ U * 2 (r h + h)``                       (each unit's shared W1_A, W1_B with biases)

    with ``h = hidden`` and ``U`` units.
    """
    r, h = config.r, config.hidden
    per_target = sum(r * (d_in + d_out) + 2 * (h * r + r) for shapes in units for d_in, d_out in shapes)
    return per_target + len(units) * 2 * (r * h + h)


class RepLoRAModel(nn.Module):
    """A base model with RepLoRA on its Q and V projections (or ``target_modules``); the base is frozen.

    ``forward`` and ``generate`` pass everything through to the base model.

    >>> model = RepLoRAModel(base, RepLoRAConfig(r=8))
    >>> ...  # train
    >>> model.fold()  # plain LoRA factors from here on; outputs unchanged
    """

    method = "replora"
    config_cls = RepLoRAConfig
    layer_cls = RepLoRALinear

    def __init__(self, base_model: nn.Module, config: RepLoRAConfig):
        super().__init__()
        self.base_model = base_model
        self.config = config
        base_model.requires_grad_(False)
        units = find_units(base_model, config.targets)
        first = base_model.get_submodule(units[0][0]).weight
        c = config
        with torch.random.fork_rng(devices=[]) if c.seed is not None else contextlib.nullcontext():
            if c.seed is not None:
                torch.manual_seed(c.seed)
            self.shared = nn.ModuleList(SharedInput(c.r, c.hidden, first) for _ in units)
            self.units = [list(names) for names in units]
            for shared, names in zip(self.shared, units, strict=True):
                for name in names:
                    self._replace(name, shared)

    def _make_layer(self, base_layer: nn.Linear, shared: SharedInput) -> RepLoRALinear:
        c = self.config
        return self.layer_cls(base_layer, shared, c.r, c.hidden, c.scaling, c.dropout, c.activation)

    def _replace(self, name: str, shared: SharedInput) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name)
        setattr(parent, child, self._make_layer(getattr(parent, child), shared))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # config, device, generation_config, ...

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    # ---- the adapted layers and folding ---------------------------------------------------

    @property
    def adapted(self) -> list[str]:
        return [n for names in self.units for n in names]

    def adapted_layers(self) -> dict[str, RepLoRALinear]:
        return {n: self.base_model.get_submodule(n) for n in self.adapted}

    def fold(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Fold the MLPs into plain LoRA factors: every layer keeps its ``(A, B)`` and stops
        calling the MLP (outputs unchanged). Returns ``{name: (A, B)}``; the update is
        ``(alpha/r) B A``. ``unfold()`` before training again."""
        factors = {}
        for name, layer in self.adapted_layers().items():
            layer.fold()
            factors[name] = layer._folded[:2]
        return factors

    def unfold(self) -> None:
        for layer in self.adapted_layers().values():
            layer.unfold()

    # ---- parameters, save and load ------------------------------------------------------

    def adapted_shapes(self) -> list[list[tuple[int, int]]]:
        """Per unit, the ``(d_in, d_out)`` of its adapted linears (``parameter_count``'s input)."""
        return [[(layer.base_layer.in_features, layer.base_layer.out_features)
                 for layer in (self.base_model.get_submodule(n) for n in names)] for names in self.units]

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
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
            json.dumps({"method": self.method, **self.config.to_dict()}, indent=2) + "\n")

    def load_adapter(self, directory: str | Path) -> None:
        tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        expected = set(self.adapter_state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"adapter checkpoint {directory} does not fit this model: "
                             f"missing {missing[:3]}, unexpected {extra[:3]}")
        self.load_state_dict(tensors, strict=False)
        self.unfold()  # folded factors, if any, came from the old weights

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path):
        data = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"method: the checkpoint in {directory} is {method!r}, not {cls.method!r}")
        model = cls(base_model, cls.config_cls.from_dict(data))
        model.load_adapter(directory)
        return model
