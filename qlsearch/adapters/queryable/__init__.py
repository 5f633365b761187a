"""Queryable LoRA: a routed r x r operator from a shared atom memory inside each LoRA bottleneck."""

from qlsearch.adapters.queryable.config import QueryableConfig
from qlsearch.adapters.queryable.encoder import InstructionEncoder
from qlsearch.adapters.queryable.layer import QueryableLinear
from qlsearch.adapters.queryable.model import QueryableModel, parameter_count
from qlsearch.adapters.queryable.router import AtomRouter, Route, rms_norm, top_k_softmax

__all__ = [
    "AtomRouter",
    "InstructionEncoder",
    "QueryableConfig",
    "QueryableLinear",
    "QueryableModel",
    "Route",
    "parameter_count",
    "rms_norm",
    "top_k_softmax",
]
