"""The built-in methods. Each entry is one line of the registry.

PEFT's own methods (LoRA, DoRA, Lily, VB-LoRA) are used through PEFT; our knob
names map onto their config fields in one table.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from torch import nn

from qlsearch.adapters import Method, register
from qlsearch.adapters._knobs import (
    DROPOUT,
    POSITIVE,
    POSITIVE_INT,
    TARGETS,
    AtMost,
    Knob,
    knob_specs,
)


def _peft_method(name: str, config_name: str, defaults: dict, fields: dict, specs: dict,
                 routing: str = "No", rules: tuple[AtMost, ...] = (), **fixed) -> Method:
    """A registry entry that builds PEFT's ``config_name`` from our knobs (renamed by ``fields``).

    ``specs`` declare our knobs (PEFT itself accepts, e.g., ``LoraConfig(r=0)``); the entry's
    ``check`` then builds the PEFT config, so what PEFT refuses is refused before a trial runs.
    """

    def config(knobs: dict):
        import peft

        unknown = sorted(set(knobs) - set(defaults))
        if unknown:
            raise ValueError(f"{name}: unknown knob(s) {unknown}; allowed: {sorted(defaults)}")
        values = {**defaults, **knobs}
        # None: every linear of the transformer blocks (the output head excluded), the
        # same set the queryable adapter adapts by default
        values["target_modules"] = values["target_modules"] or "all-linear"
        return getattr(peft, config_name)(**{fields.get(k, k): v for k, v in values.items()}, **fixed)

    def check(knobs: dict, where: str) -> None:
        try:
            config(knobs)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: PEFT's {config_name} refused {knobs}: {err}") from None

    def attach(model: nn.Module, **knobs) -> nn.Module:
        import peft

        return peft.get_peft_model(model, config(knobs))

    return Method(name, attach, f"{config_name} from PEFT", dict(defaults), routing, specs=specs,
                  rules=rules, check=check)


_LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}
_LORA_FIELDS = {"alpha": "lora_alpha", "dropout": "lora_dropout"}
_LORA_SPECS = {"r": POSITIVE_INT, "alpha": POSITIVE, "dropout": DROPOUT, "target_modules": TARGETS}

register(_peft_method("lora", "LoraConfig", _LORA, _LORA_FIELDS, _LORA_SPECS))
register(_peft_method("dora", "LoraConfig", _LORA, _LORA_FIELDS, _LORA_SPECS, use_dora=True))
# Lily: A shared by `stride_A` consecutive layers, `num_B` B experts shared by all layers of a
# target type. Its router averages over batch and tokens: outputs depend on batch-mates.
register(_peft_method("lily", "LilyConfig",
                      {"r": 8, "stride_A": 1, "num_B": 2, "scaling": 1.0, "target_modules": None}, {},
                      {"r": POSITIVE_INT, "stride_A": POSITIVE_INT, "num_B": Knob(int, low=2),  # PEFT: >= 2
                       "scaling": POSITIVE, "target_modules": TARGETS},
                      routing="Yes"))
# VB-LoRA: vector_length must divide every adapted dimension; 64 divides all of Qwen2.5's
# (896, 128, 4864), PEFT's default 256 does not.
register(_peft_method("vblora", "VBLoRAConfig",
                      {"r": 4, "num_vectors": 256, "vector_length": 64, "topk": 2, "dropout": 0.0,
                       "target_modules": None},
                      {"dropout": "vblora_dropout"},
                      {"r": POSITIVE_INT, "num_vectors": POSITIVE_INT, "vector_length": POSITIVE_INT,
                       "topk": POSITIVE_INT, "dropout": DROPOUT, "target_modules": TARGETS},
                      routing="Shared bank", rules=(AtMost("topk", "num_vectors"),)))


def _queryable(defaults: dict) -> Callable[..., nn.Module]:
    def attach(model: nn.Module, **knobs) -> nn.Module:
        from qlsearch.adapters.queryable import QueryableConfig, QueryableModel

        return QueryableModel(model, QueryableConfig(**{**defaults, **knobs}))

    return attach


_QUERYABLE = {"r": 8, "alpha": 16, "num_atoms": 16, "top_k": 4, "num_blocks": 4,
              "tau_lang": 0.0, "lambda_ctx": 0.0, "dropout": 0.0, "d_k": 64, "target_modules": None}
# The instruction variant is the same adapter with both language channels on.
_INSTR = {**_QUERYABLE, "tau_lang": 1.0, "lambda_ctx": 1.0}


_QUERYABLE_ADVANTAGE = (
    "its layers run one GEMM for the A of a unit's Q, K and V (which also gives the router its "
    "state) and add B's GEMM into the base output in place, where PEFT's LoRA layers run two "
    "GEMMs, a scale and an add per projection; they also run a plain linear base as its GEMM "
    "on its weight (no module call) and, in the inference form, read their weights as plain "
    "references made once (no nn.Module attribute lookups): part of its latency against PEFT's "
    "methods is this implementation, not the method (`qlsearch profile` counts each method's kernels)")


def _queryable_entry(name: str, defaults: dict, summary: str, instruction: bool = False) -> Method:
    from qlsearch.adapters.queryable.config import QueryableConfig

    return Method(name, _queryable(defaults), summary, defaults, "Yes", instruction,
                  specs=knob_specs(QueryableConfig), rules=QueryableConfig.RULES,
                  advantage=_QUERYABLE_ADVANTAGE)


register(_queryable_entry("queryable", _QUERYABLE, "Queryable LoRA: routed r x r operator from a shared atom bank"))
register(_queryable_entry("instr-queryable", _INSTR,
                          "Queryable LoRA with the instruction prior and query channel on", instruction=True))

# Baselines without public reference code, implemented here from their papers
# (assumptions in each package's docstrings and in baselines/<name>.toml).
for _package in ("replora", "hyra", "doran", "moelora"):
    register(importlib.import_module(f"qlsearch.adapters.{_package}").METHOD)
