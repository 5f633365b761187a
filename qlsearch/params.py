"""Parameter counts per method at matched rank, like the paper's Table 6, without any weights.

Models are built from their config on the meta device: shapes exist, storage
does not, so a 0.5B (or 70B) model costs nothing to count and nothing is
downloaded when the config is a local folder.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qlsearch.adapters import attach, get_method
from qlsearch.adapters._precision import adapted_targets
from qlsearch.profiling._settings import PAPER_TARGETS  # the paper's targets: attention + MLP


@dataclass
class ParameterRow:
    method: str
    trainable: int
    total: int
    routing: str
    instruction: str
    targets: list[str]  # the linears it adapted (last name component), in model order

    def as_dict(self) -> dict:
        return asdict(self)


def load_config(model: str):
    """An HF config from a local folder or a (cached) hub id."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except OSError as err:
        raise ValueError(
            f"--model: cannot read a config for {model!r} ({err}); give a local folder with "
            "config.json, or a hub id that is cached on this machine"
        ) from err


def meta_model(config) -> nn.Module:
    """The causal-LM for ``config`` with shapes only (no memory, no initialisation cost)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_table(model: str, methods: list[str], r: int = 8,
                    target_modules: list[str] | None = None, **knobs) -> list[ParameterRow]:
    """Trainable and total parameters of each method on ``model`` at rank ``r``, every
    method adapting the same ``target_modules`` (a method that cannot adapt one says so:
    ``ValueError``, naming it).

    ``knobs`` are passed to every method that has them (e.g. ``num_atoms``).
    """
    base = meta_model(load_config(model))
    targets = list(target_modules or PAPER_TARGETS)
    rows = []
    for name in methods:
        method = get_method(name)
        # the shared knobs this method has (IA3, for one, has no rank)
        own = {k: v for k, v in {"r": r, **knobs}.items() if k in method.knobs}
        try:
            adapted = attach(copy.deepcopy(base), name, target_modules=targets, **own)
        except ValueError as err:
            raise ValueError(f"--target-modules: {name} cannot adapt {targets}: {err}") from None
        params = list(adapted.parameters())
        rows.append(ParameterRow(
            method=name,
            trainable=sum(p.numel() for p in params if p.requires_grad),
            total=sum(p.numel() for p in params),
            routing=method.routing,
            instruction="Yes" if method.instruction else "No",
            targets=adapted_targets(adapted),
        ))
    return rows


def format_table(rows: list[ParameterRow]) -> str:
    """The table; below it, where both appear, what instr-queryable adds to queryable."""
    lines = [f"{'Method':<18}{'Trainable params':>18}{'Total params':>16}  {'Routing?':<14}"
             f"{'Instruction?':<14}Targets"]
    lines += [f"{row.method:<18}{row.trainable:>18,}{row.total:>16,}  {row.routing:<14}{row.instruction:<14}"
              f"{','.join(row.targets)}" for row in rows]
    count = {row.method: row.trainable for row in rows}
    if {"queryable", "instr-queryable"} <= set(count):
        lines.append(f"\ninstr-queryable - queryable = {count['instr-queryable'] - count['queryable']:,} "
                     "instruction parameters (Q_ctx, R_ctx: d_e x d_k each); plain queryable creates none")
    return "\n".join(lines)
