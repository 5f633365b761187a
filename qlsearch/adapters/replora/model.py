"""Attach RepLoRA to a model: units, the shared first layers, fold, save/load.

A *unit* is one transformer layer (the children of the model's largest
``nn.ModuleList`` that hold a linear); its adapted projections (by default Q
and V) share the first MLP layer. In a model without a layer list (a plain
MLP), each adapted linear is a unit of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from qlsearch.adapters._wrapper import AdapterModel, find_linears, group_by_layer, seeded
from qlsearch.adapters.replora.config import RepLoRAConfig
from qlsearch.adapters.replora.layer import RepLoRALinear, SharedInput


def find_units(model: nn.Module, targets: Sequence[str]) -> list[list[str]]:
    """Names of the linears to adapt, grouped into units (transformer layers) in model order."""
    return group_by_layer(model, find_linears(model, targets))


def parameter_count(config: RepLoRAConfig, units: Sequence[Sequence[tuple[int, int]]]) -> int:
    """Trainable parameters of RepLoRA on units of adapted linears of ``(d_in, d_out)`` shapes.

    ``sum_t [r (d_in + d_out) + 2 (h r + r)]``  (seeds A0, B0; heads W2_A, W2_B with biases)
    ``+ U * 2 (r h + h)``                       (each unit's shared W1_A, W1_B with biases)

    with ``h = hidden`` and ``U`` units.
    """
    r, h = config.r, config.hidden
    per_target = sum(r * (d_in + d_out) + 2 * (h * r + r) for shapes in units for d_in, d_out in shapes)
    return per_target + len(units) * 2 * (r * h + h)


class RepLoRAModel(AdapterModel):
    """A base model with RepLoRA on its Q and V projections (or ``target_modules``); the base is frozen.

    ``forward`` and ``generate`` pass everything through to the base model.

    >>> model = RepLoRAModel(base, RepLoRAConfig(r=8))
    >>> ...  # train
    >>> model.fold()  # plain LoRA factors from here on; outputs unchanged
    """

    method = "replora"
    config_class = RepLoRAConfig
    inference_form_name = "folded"  # factors generated once (fold), then plain LoRA
    layer_cls = RepLoRALinear

    def __init__(self, base_model: nn.Module, config: RepLoRAConfig):
        super().__init__(base_model, config)
        units = find_units(base_model, config.targets)
        first = base_model.get_submodule(units[0][0]).weight
        c = config
        with seeded(c.seed):
            self.shared = nn.ModuleList(SharedInput(c.r, c.hidden, first) for _ in units)
            self.units = [list(names) for names in units]
            for shared, names in zip(self.shared, units, strict=True):
                for name in names:
                    self.replace(name, lambda base, shared=shared: self._make_layer(base, shared))

    def _make_layer(self, base_layer: nn.Linear, shared: SharedInput) -> RepLoRALinear:
        c = self.config
        return self.layer_cls(base_layer, shared, c.r, c.hidden, c.scaling, c.dropout, c.activation)

    # ---- the adapted layers and folding ---------------------------------------------------

    def adapted_layers(self) -> dict[str, RepLoRALinear]:
        """``{name: layer}`` in model order (a dict, unlike the base class's list: folding reports by name)."""
        return dict(zip(self.adapted, super().adapted_layers(), strict=True))

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

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return super().num_trainable_parameters()

    def load_adapter(self, directory) -> None:
        super().load_adapter(directory)
        self.unfold()  # folded factors, if any, came from the old weights
