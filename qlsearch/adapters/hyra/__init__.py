"""HyRA (Diep et al. 2026): per projection, a hypernetwork shared by its heads emits each head's low-rank factors."""

from qlsearch.adapters._wrapper import registry_entry
from qlsearch.adapters.hyra.config import DEFAULT_TARGETS, HyRAConfig
from qlsearch.adapters.hyra.layer import HeadHypernetwork, HyRALinear
from qlsearch.adapters.hyra.model import HyRAModel, parameter_count

METHOD = registry_entry(
    HyRAModel,
    "HyRA: a hypernetwork shared by a projection's heads generates each head's low-rank factors",
    routing="Generated",
)
attach = METHOD.attach
DEFAULTS = dict(METHOD.knobs)

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
