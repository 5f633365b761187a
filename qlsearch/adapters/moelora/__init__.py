"""MoE-LoRA (Luo et al. 2024): top-k routed LoRA experts per linear, load-balance + contrastive losses."""

from qlsearch.adapters._wrapper import registry_entry
from qlsearch.adapters.moelora.config import MoELoRAConfig
from qlsearch.adapters.moelora.layer import (
    MoELoRALinear,
    expert_contrastive_loss,
    load_balance_loss,
)
from qlsearch.adapters.moelora.model import MoELoRAModel, parameter_count

METHOD = registry_entry(
    MoELoRAModel,
    "MoE-LoRA (Luo et al. 2024): top-k routed LoRA experts per linear with load-balance and contrastive losses",
    routing="Yes",
)
attach = METHOD.attach
DEFAULTS = dict(METHOD.knobs)

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
