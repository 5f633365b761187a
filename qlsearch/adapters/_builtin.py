"""The built-in methods. Each entry is one line of the registry.

PEFT's own methods (LoRA, DoRA, Lily, VB-LoRA) are used through PEFT; our knob
names map onto their config fields in one table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from qlsearch.adapters import Method, register


def _peft_method(name: str, config_name: str, defaults: dict, fields: dict, routing: str = "No",
                 **fixed) -> Method:
    """A registry entry that builds PEFT's ``config_name`` from our knobs (renamed by ``fields``)."""

    def attach(model: nn.Module, **knobs) -> nn.Module:
        import peft

        unknown = sorted(set(knobs) - set(defaults))
        if unknown:
            raise ValueError(f"{name}: unknown knob(s) {unknown}; allowed: {sorted(defaults)}")
        values = {**defaults, **knobs}
        # None: every linear of the transformer blocks (the output head excluded), the
        # same set the queryable adapter adapts by default
        values["target_modules"] = values["target_modules"] or "all-linear"
        config = getattr(peft, config_name)(**{fields.get(k, k): v for k, v in values.items()}, **fixed)
        return peft.get_peft_model(model, config)

    return Method(name, attach, f"{config_name} from PEFT", dict(defaults), routing)


_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
_LORA_FIELDS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}

register(_peft_method("lora", "LoraConfig", _LORA, _LORA_FIELDS))
register(_peft_method("dora", "LoraConfig", _LORA, _LORA_FIELDS, use_dora=True))
# Lily: A shared by `stride_A` consecutive layers, `num_B` B experts shared by all layers of a
# target type. Its router averages over batch and tokens: outputs depend on batch-mates.
register(_peft_method("lily", "LilyConfig",
                      {"r": 8, "stride_A": 1, "num_B": 2, "scaling": 1.0, "target_modules": None}, {},
                      routing="Yes"))
# VB-LoRA: vector_length must divide every adapted dimension; 64 divides all of Qwen2.5's
# (896, 128, 4864), PEFT's default 256 does not.
register(_peft_method("vblora", "VBLoRAConfig",
                      {"r": 4, "num_vectors": 256, "vector_length": 64, "topk": 2, "dropout": 0.0,
                       "target_modules": None},
                      {"dropout": "vblora_dropout"}, routing="Shared bank"))


def _queryable(defaults: dict) -> Callable[..., nn.Module]:
    def attach(model: nn.Module, **knobs) -> nn.Module:
        from qlsearch.adapters.queryable import QueryableConfig, QueryableModel

        return QueryableModel(model, QueryableConfig(**{**defaults, **knobs}))

    return attach


_QUERYABLE = {"r": 8, "alpha": 16, "num_atoms": 16, "top_k": 4, "num_blocks": 4,
              "tau_lang": 0.0, "lambda_ctx": 0.0, "dropout": 0.0, "d_k": 64, "target_modules": None}
# The instruction variant is the same adapter with both language channels on.
_INSTR = {**_QUERYABLE, "tau_lang": 1.0, "lambda_ctx": 1.0}

register(Method("queryable", _queryable(_QUERYABLE),
                "Queryable LoRA: routed r x r operator from a shared atom bank", _QUERYABLE, "Yes"))
register(Method("instr-queryable", _queryable(_INSTR),
                "Queryable LoRA with the instruction prior and query channel on", _INSTR, "Yes", True))

# Baselines without public reference code, implemented here from their papers
# (assumptions in each package's docstrings and in baselines/<name>.toml).
for _package in ("replora", "hyra", "doran", "moelora"):
    register(importlib.import_module(f"qlsearch.adapters.{_package}").METHOD)
