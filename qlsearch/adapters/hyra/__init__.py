"""HyRA (Diep et al. 2026): per projection, a hypernetwork shared by its heads emits each head's low-rank factors."""

from torch import nn

from qlsearch.adapters import Method
from qlsearch.adapters.hyra.config import DEFAULT_TARGETS, HyRAConfig
from qlsearch.adapters.hyra.layer import HeadHypernetwork, HyRALinear
from qlsearch.adapters.hyra.model import HyRAModel, parameter_count

DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "embed_dim": 16, "hidden_dim": 8, "num_heads": None,
            "target_modules": None, "seed": None}


def attach(model: nn.Module, **knobs) -> HyRAModel:
    """``HyRAModel(model, HyRAConfig(**knobs))``; unknown knobs raise ``ValueError``."""
    return HyRAModel(model, HyRAConfig.from_dict({**DEFAULTS, **knobs}))


METHOD = Method(
    name="hyra",
    attach=attach,
    summary="HyRA: a hypernetwork shared by a projection's heads generates each head's low-rank factors",
    knobs=dict(DEFAULTS),
    routing="Generated",
)

__all__ = [
    "DEFAULTS",
    "DEFAULT_TARGETS",
    "METHOD",
    "HeadHypernetwork",
    "HyRAConfig",
    "HyRALinear",
    "HyRAModel",
    "attach",
    "parameter_count",
]
