"""Attach MoE-LoRA to a model: pick the linears, replace them, save/load.

MoE-LoRA (Luo et al. 2024, arXiv 2402.12851) has no public code; this is a
reconstruction from the paper's description, with every choice it leaves open
written down in ``baselines/moelora.toml`` (``assumptions``). The main ones:

* ``E = 4`` experts of rank 8, top-2, a bias-free gate on every layer linear:
  this reproduces Table 6's 18,579,456 at Qwen2.5-0.5B exactly;
* load balance ``E sum_i f_i P_i`` (Switch) and a supervised-contrastive InfoNCE
  on the selected experts' rank-space outputs ``A_e x`` (same expert = positive);
  both batch-level and training-only, weights 0.01 each, ``tau = 0.1``, averaged over
  the adapted layers (Switch and Mixtral's ``load_balancing_loss_func`` average over
  layers too): summed over Qwen2.5-0.5B's 168 layers they would add ~10 to a task
  loss of 1-2, averaged they add ~0.07;
* every ``B_i = 0`` at init, so the adapted model equals the base exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from qlsearch.adapters._wrapper import AdapterModel, find_layer_linears, seeded
from qlsearch.adapters.moelora.config import MoELoRAConfig
from qlsearch.adapters.moelora.layer import MoELoRALinear


def find_targets(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Names of the linears to adapt (``target_modules``, else every linear of the layers), in module order."""
    return find_layer_linears(model, config.target_modules)


def parameter_count(config: MoELoRAConfig, shapes: Sequence[tuple[int, int]]) -> int:
    """Trainable parameters of MoE-LoRA on linears of ``(d_in, d_out)`` shapes.

    ``sum_p E [r (d_in + d_out) + d_in]``  (E experts A_i, B_i and the gate W_g, no bias)
    """
    c = config
    return sum(c.num_experts * (c.r * (d_in + d_out) + d_in) for d_in, d_out in shapes)


class MoELoRAModel(AdapterModel):
    """A base model with MoE-LoRA on its linears; the base weights are frozen.

    ``forward`` passes every argument to the base model. In training mode each
    adapted layer keeps its weighted auxiliary term; add
    ``qlsearch.adapters.auxiliary_loss(model)`` to the task loss.

    >>> model = MoELoRAModel(AutoModelForCausalLM.from_config(cfg), MoELoRAConfig())
    >>> loss = model(**batch).loss + auxiliary_loss(model)
    """

    method = "moelora"
    config_class = MoELoRAConfig
    inference_form_name = "routed"  # per-token routing: nothing to fold

    def __init__(self, base_model: nn.Module, config: MoELoRAConfig):
        super().__init__(base_model, config)
        names = find_targets(base_model, config)
        with seeded(config.seed):
            for name in names:
                self.replace(name, lambda base: MoELoRALinear(base, config))
        for layer in self.adapted_layers():  # the auxiliary term is the mean over layers
            layer.aux_share = 1.0 / len(names)

    def routing_trace(self) -> dict[str, Tensor]:
        """The top-k expert ids each adapted layer chose in the last forward (``... x k``)."""
        return {n: layer.last_top for n, layer in zip(self.adapted, self.adapted_layers(), strict=True)}

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return super().num_trainable_parameters()

    def adapted_shapes(self) -> list[tuple[int, int]]:
        return [(m.base_layer.in_features, m.base_layer.out_features) for m in self.adapted_layers()]
