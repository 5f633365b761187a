"""Attach HyRA to a model: pick the attention projections, read their head counts, save/load.

HyRA (Diep et al. 2026, arXiv 2510.04295) has no public code; this is a
reconstruction from the paper's description, with every choice it leaves open
written down in ``baselines/hyra.toml`` (``assumptions``). The main ones:

* one hypernetwork per adapted projection (per layer and target), shared by its heads;
  ``z_h = tanh(W_1 e_h + b_1)``, ``A_h = W_A z_h + b_A``, ``B_h = W_B z_h + b_B``;
* head ``h`` owns output rows ``h d_head:(h+1) d_head`` (for ``o_proj`` too);
  heads from ``num_attention_heads`` (``num_key_value_heads`` for k/v), or the
  ``num_heads`` knob;
* ``W_B = b_B = 0`` at init, so the adapted model equals the base exactly;
* default targets q, k, v, o; our count (6,660,864 at Qwen2.5-0.5B, r = 8) is
  the adapter alone and does not reproduce Table 6's 147,922,752.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from qlsearch.adapters.hyra.config import DEFAULT_TARGETS, HyRAConfig
from qlsearch.adapters.hyra.layer import HyRALinear

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: Projections whose heads are the key/value heads (grouped-query attention).
KV_PROJECTIONS = ("k_proj", "v_proj")


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: HyRAConfig) -> list[str]:
    """Names of the linears to adapt, in module order."""
    targets = list(config.target_modules or DEFAULT_TARGETS)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [n for n in linears if _matches(n, targets)]
    if not found:
        shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linears})[:20])
        what = "matches no nn.Linear" if config.target_modules else "found no attention projection; name the linears"
        raise ValueError(f"target_modules: {config.target_modules!r} {what}; linears here: {shown}")
    return found


def head_count(model: nn.Module, name: str, config: HyRAConfig) -> int:
    """Heads of the linear ``name``: ``config.num_heads``, else the model config's attention heads."""
    if config.num_heads is not None:
        return config.num_heads
    model_config = getattr(model, "config", None)
    heads = getattr(model_config, "num_attention_heads", None)
    if heads is None:
        raise ValueError(
            "num_heads: got None; allowed: an integer >= 1 (this model has no config with "
            "num_attention_heads to read the head count from)"
        )
    if name.rsplit(".", 1)[-1] in KV_PROJECTIONS:
        heads = getattr(model_config, "num_key_value_heads", None) or heads
    return heads


def parameter_count(config: HyRAConfig, shapes: Sequence[tuple[int, int, int]]) -> int:
    """Trainable parameters of HyRA on linears of ``(d_in, d_out, H)`` shapes.

    ``sum_p [H d_e``                       (head embeddings e_h)
    ``      + (d_e + 1) d_h``              (shared trunk W_1, b_1)
    ``      + (d_h + 1) r (d_in + d_out/H)]``  (generator heads W_A, b_A and W_B, b_B)
    """
    c = config
    return sum(
        h * c.embed_dim + (c.embed_dim + 1) * c.hidden_dim + (c.hidden_dim + 1) * c.r * (d_in + d_out // h)
        for d_in, d_out, h in shapes
    )


class HyRAModel(nn.Module):
    """A base model with HyRA on its attention projections; the base weights are frozen.

    ``forward`` passes every argument to the base model.

    >>> model = HyRAModel(AutoModelForCausalLM.from_config(cfg), HyRAConfig(r=8))
    >>> model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())
    True
    """

    def __init__(self, base_model: nn.Module, config: HyRAConfig):
        super().__init__()
        self.base_model = base_model
        self.config = config
        base_model.requires_grad_(False)
        names = find_targets(base_model, config)
        heads = {n: head_count(base_model, n, config) for n in names}
        with torch.random.fork_rng(devices=[]) if config.seed is not None else contextlib.nullcontext():
            if config.seed is not None:
                torch.manual_seed(config.seed)
            for name in names:
                self._replace(name, heads[name])
        self.adapted: list[str] = names

    def _replace(self, name: str, num_heads: int) -> HyRALinear:
        parent_name, _, child = name.rpartition(".")
        parent = self.base_model.get_submodule(parent_name)
        c = self.config
        try:
            layer = HyRALinear(getattr(parent, child), num_heads, c.r, c.scaling, c.dropout,
                               c.embed_dim, c.hidden_dim)
        except ValueError as err:
            raise ValueError(f"{err} (at {name})") from None
        setattr(parent, child, layer)
        return layer

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

    # ---- parameters, save and load ------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def adapted_shapes(self) -> list[tuple[int, int, int]]:
        """``(d_in, d_out, H)`` of each adapted linear."""
        layers = [self.base_model.get_submodule(n) for n in self.adapted]
        return [(m.base_layer.in_features, m.base_layer.out_features, m.num_heads) for m in layers]

    def save_pretrained(self, directory: str | Path) -> None:
        """Adapter weights (safetensors) and config (JSON); the base model is not saved."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.contiguous() for n, t in self.adapter_state_dict().items()}
        save_file(tensors, str(directory / ADAPTER_WEIGHTS))
        (directory / ADAPTER_CONFIG).write_text(
            json.dumps({"method": "hyra", **self.config.to_dict()}, indent=2) + "\n"
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
    def from_pretrained(cls, base_model: nn.Module, directory: str | Path) -> HyRAModel:
        data = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
        data.pop("method", None)
        model = cls(base_model, HyRAConfig.from_dict(data))
        model.load_adapter(directory)
        return model
