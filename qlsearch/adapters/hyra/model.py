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

from collections.abc import Sequence

from torch import nn

from qlsearch.adapters._wrapper import AdapterModel, find_linears, seeded
from qlsearch.adapters.hyra.config import DEFAULT_TARGETS, HyRAConfig
from qlsearch.adapters.hyra.layer import HyRALinear

#: Projections whose heads are the key/value heads (grouped-query attention).
KV_PROJECTIONS = ("k_proj", "v_proj")


def find_targets(model: nn.Module, config: HyRAConfig) -> list[str]:
    """Names of the linears to adapt (``target_modules``, else the attention projections), in module order."""
    return find_linears(model, config.target_modules, DEFAULT_TARGETS)


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


class HyRAModel(AdapterModel):
    """A base model with HyRA on its attention projections; the base weights are frozen.

    ``forward`` passes every argument to the base model.

    >>> model = HyRAModel(AutoModelForCausalLM.from_config(cfg), HyRAConfig(r=8))
    >>> model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())
    True
    """

    method = "hyra"
    config_class = HyRAConfig

    def __init__(self, base_model: nn.Module, config: HyRAConfig):
        super().__init__(base_model, config)
        names = find_targets(base_model, config)
        heads = {n: head_count(base_model, n, config) for n in names}
        c = config
        with seeded(config.seed):
            for name in names:
                try:
                    self.replace(name, lambda base, h=heads[name]: HyRALinear(
                        base, h, c.r, c.scaling, c.dropout, c.embed_dim, c.hidden_dim))
                except ValueError as err:
                    raise ValueError(f"{err} (at {name})") from None

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return super().num_trainable_parameters()

    def adapted_shapes(self) -> list[tuple[int, int, int]]:
        """``(d_in, d_out, H)`` of each adapted linear."""
        return [(m.base_layer.in_features, m.base_layer.out_features, m.num_heads) for m in self.adapted_layers()]
