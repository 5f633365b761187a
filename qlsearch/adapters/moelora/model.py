"""Attach MoE-LoRA to a model: pick the linears, replace them, save/load.

MoE-LoRA (Luo et al. 2024, arXiv 2402.12851) has no public code; this is a
reconstruction from the paper's description, with every choice it leaves open
written down in ``baselines/moelora.toml`` (``assumptions``). The main ones:

* ``E = 4`` experts of rank 8, top-2, a bias-free gate on every layer linear:
  this reproduces Table 6's 18,579,456 at Qwen2.5-0.5B exactly;
* load balance ``E sum_i f_i P_i`` (Switch) and a supervised-contrastive InfoNCE
  on the selected experts' rank-space outputs ``A_e x`` (same expert = positive);
  both batch-level and training-only, weights 0.01 each, ``tau = 0.1``;
* every ``B_i = 0`` at init, so the adapted model equals the base exactly.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qlsearch.adapters.moelora.config import MoELoRAConfig
from qlsearch.adapters.moelora.layer import MoELoRALinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_list_prefix(model: nn.Module) -> str | None:
    """Name of the ``nn.ModuleList`` with the most children holding a linear: the transformer layers."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            count = sum(any(isinstance(m, nn.Linear) for m in child.modules()) for child in module)
            if count > best_count:
                best, best_count = name, count
    return best


def find_targets(model: nn.Module, config: MoELoRAConfig) -> list[str]:
    """Names of the linears to adapt, in module order."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if config.target_modules is None:
        prefix = _layer_list_prefix(model)
        found = [n for n in linears if prefix is None or n.startswith(prefix + ".")]
    else:
        found = [n for n in linears if _matches(n, config.target_modules)]
    if not found:
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})[:20])
        raise ValueError(f"target_modules: {config.target_modules!r} matches no nn.Linear; linears here: {shown}")
    return found


def parameter_count(config: MoELoRAConfig, shapes: Sequence[tuple[int, int]]) -> int:
    """Trainable parameters of MoE-LoRA on linears of ``(d_in, d_out)`` shapes.

    ``sum_p E [r (d_in + d_out) + d_in]``  (E experts A_i, B_i and the gate W_g, no bias)
    """
    c = config
    return sum(c.num_experts * (c.r * (d_in + d_out) + d_in) for d_in, d_out in shapes)


class MoELoRAModel(nn.Module):
    """A base model with MoE-LoRA on its linears; the base weights are frozen.

    ``forward`` passes every argument to the base model. In training mode each
    adapted layer keeps its weighted auxiliary term; add
    ``qlsearch.adapters.auxiliary_loss(model)`` to the task loss.

    >>> model = MoELoRAModel(AutoModelForCausalLM.from_config(cfg), MoELoRAConfig())
    >>> loss = model(**batch).loss + auxiliary_loss(model)
    """

    def __init__(self, base_model: nn.Module, config: MoELoRAConfig):
        super().__init__()
        self.base_model = base_model
        self.config = config
        base_model.requires_grad_(False)
        names = find_targets(base_model, config)
        with torch.random.fork_rng(devices=[]) if config.seed is not None else contextlib.nullcontext():
            if config.seed is not None:
                torch.manual_seed(config.seed)
            for name in names:
                parent_name, _, child = name.rpartition(".")
                parent = base_model.get_submodule(parent_name)
                setattr(parent, child, MoELoRALinear(getattr(parent, child), config))
        self.adapted: list[str] = names

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)  # config, device, generation_config, ...

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def routing_trace(self) -> dict[str, Tensor]:
        """The top-k expert ids each adapted layer chose in the last forward (``... x k``)."""
        return {n: self.base_model.get_submodule(n).last_top for n in self.adapted}

    # ---- parameters, save and load ------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def adapted_shapes(self) -> list[tuple[int, int]]:
        layers = [self.base_model.get_submodule(n).base_layer for n in self.adapted]
        return [(m.in_features, m.out_features) for m in layers]

    def save_pretrained(self, directory: str | Path) -> None:
        """Adapter weights (safetensors) and config (JSON); the base model is not saved."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous() for n, t in self.adapter_state_dict().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        (directory / ADAPTER_CONFIG).write_text(
            json.dumps({"method": "moelora", **self.config.to_dict()}, indent=2) + "\n"
        )

    def load_adapter(self, directory: str | Path) -> None:
        tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
        expected = set(self.adapter_state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"adapter checkpoint {directory} does not fit this model: "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path) -> MoELoRAModel:
        data = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        data.pop("method", None)
        model = cls(base_model, MoELoRAConfig.from_dict(data))
        model.load_adapter(directory)
        return model
