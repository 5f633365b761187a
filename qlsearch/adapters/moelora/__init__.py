"""MoE-LoRA (Luo et al. 2024): top-k routed LoRA experts per linear, load-balance + contrastive losses."""

from torch import nn

from qlsearch.adapters import Method
from qlsearch.adapters.moelora.config import MoELoRAConfig
from qlsearch.adapters.moelora.layer import (
    MoELoRALinear,
    expert_contrastive_loss,
    load_balance_loss,
)
from qlsearch.adapters.moelora.model import MoELoRAModel, parameter_count

DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "num_experts": 4, "top_k": 2,
            "load_balance_weight": 0.01, "contrastive_weight": 0.01, "contrastive_temperature": 0.1,
            "contrastive_tokens": 256, "target_modules": None, "seed": None}


def attach(model: nn.Module, **knobs) -> MoELoRAModel:
    """``MoELoRAModel(model, MoELoRAConfig(**knobs))``; unknown knobs raise ``ValueError``."""
    return MoELoRAModel(model, MoELoRAConfig.from_dict({**DEFAULTS, **knobs}))


METHOD = Method(
    name="moelora",
    attach=attach,
    summary="MoE-LoRA (Luo et al. 2024): top-k routed LoRA experts per linear with load-balance and contrastive losses",
    knobs=dict(DEFAULTS),
    routing="Yes",
)

__all__ = [
    "DEFAULTS",
    "METHOD",
    "MoELoRAConfig",
    "MoELoRALinear",
    "MoELoRAModel",
    "attach",
    "expert_contrastive_loss",
    "load_balance_loss",
    "parameter_count",
]
