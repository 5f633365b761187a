"""Attach DoRAN to a model: RepLoRA's units and auxiliary networks, DoRA's magnitude, learnable tau."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from qlsearch.adapters.doran.config import DoRANConfig
from qlsearch.adapters.doran.layer import DoRANLinear
from qlsearch.adapters.replora.layer import SharedInput
from qlsearch.adapters.replora.model import RepLoRAModel
from qlsearch.adapters.replora.model import parameter_count as _replora_count


def parameter_count(config: DoRANConfig, units: Sequence[Sequence[tuple[int, int]]]) -> int:
    """Trainable parameters of DoRAN on units of adapted linears of ``(d_in, d_out)`` shapes.

    ``sum_t [r (d_in + d_out) + 2 (h r + r) + d_out + 1]``  (inputs A0, B0; heads; m; tau)
    ``+ U * 2 (r h + h)``                                   (each unit's shared W1_A, W1_B)

    with ``h = hidden`` and ``U`` units: RepLoRA's count plus ``d_out + 1`` per projection.
    """
    return _replora_count(config, units) + sum(d_out + 1 for shapes in units for _, d_out in shapes)


class DoRANModel(RepLoRAModel):
    """A base model with DoRAN on its Q and V projections (or ``target_modules``); the base is frozen.

    >>> model = DoRANModel(base, DoRANConfig(r=8))
    >>> model.fold()  # generated factors and row scales fixed; outputs unchanged
    """

    method = "doran"
    config_class = DoRANConfig
    layer_cls = DoRANLinear

    def _make_layer(self, base_layer: nn.Linear, shared: SharedInput) -> DoRANLinear:
        c = self.config
        return DoRANLinear(base_layer, shared, c.r, c.hidden, c.scaling, c.dropout, c.activation,
                           c.tau_init, c.magnitude_init)

    def merged_weights(self) -> dict[str, Tensor]:
        """``{name: W'}`` for each adapted linear, to merge into the base weights."""
        return {name: layer.merged_weight() for name, layer in self.adapted_layers().items()}
