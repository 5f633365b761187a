"""The built-in methods. Each entry is one line of the registry."""

from __future__ import annotations

from torch import nn

from qlsearch.adapters import Method, register

_LORA_KNOBS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None}


def _peft_lora(model: nn.Module, *, use_dora: bool, **knobs) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    unknown = set(knobs) - set(_LORA_KNOBS)
    if unknown:
        raise ValueError(
            f"{'dora' if use_dora else 'lora'}: unknown knob(s) {sorted(unknown)}; "
            f"allowed: {sorted(_LORA_KNOBS)}"
        )
    k = {**_LORA_KNOBS, **knobs}
    config = LoraConfig(
        r=k["r"],
        lora_alpha=k["alpha"],
        lora_dropout=k["dropout"],
        # every linear layer of the transformer blocks (the output head excluded),
        # the same set the queryable adapter adapts by default
        target_modules=k["target_modules"] or "all-linear",
        use_dora=use_dora,
    )
    return get_peft_model(model, config)


def _queryable(model: nn.Module, **knobs) -> nn.Module:
    from qlsearch.adapters.queryable import QueryableConfig, QueryableModel

    return QueryableModel(model, QueryableConfig(**knobs))


def _instr_queryable(model: nn.Module, **knobs) -> nn.Module:
    from qlsearch.adapters.queryable import QueryableConfig, QueryableModel

    return QueryableModel(model, QueryableConfig(**{**INSTRUCTION_DEFAULTS, **knobs}))


# The instruction variant is the same adapter with both language channels on.
INSTRUCTION_DEFAULTS = {"tau_lang": 1.0, "lambda_ctx": 1.0}

register(Method("lora", lambda m, **k: _peft_lora(m, use_dora=False, **k),
                "LoRA (Hu et al. 2022) through PEFT", dict(_LORA_KNOBS)))
register(Method("dora", lambda m, **k: _peft_lora(m, use_dora=True, **k),
                "DoRA (Liu et al. 2024) through PEFT (use_dora=True)", dict(_LORA_KNOBS)))
register(Method("queryable", _queryable,
                "Queryable LoRA: routed r x r operator from a shared atom bank",
                {"r": 8, "alpha": 16, "num_atoms": 16, "top_k": 4, "num_blocks": 4}))
register(Method("instr-queryable", _instr_queryable,
                "Queryable LoRA with the instruction prior and query channel on",
                {"r": 8, "alpha": 16, "num_atoms": 16, "top_k": 4, "num_blocks": 4,
                 **INSTRUCTION_DEFAULTS}))
