"""Attach HyRA to a model: pick the attention projections, read their head counts, save/load.

HyRA (Diep et al. 2026, arXiv 2510.04295) has no public code; this is a
reconstruction from the paper's description, with every choice it leaves open
written down in ``baselines/hyra.toml`` (``assumptions``). The main ones:

* one hypernetwork per adapted projection (per layer and target), shared by its heads;
  ``z_h = tanh(W_1 e_h + b_1)``, ``A_h = W_A z_h + b_A``, ``B_h = W_B z_h + b_B``;
* head ``h`` owns output rows ``h d_head:(h+1) d_head`` (for ``o_proj`` too);
  HyRA adapts any linear: heads per linear = ``out_features / head_dim`` (the
  model's attention head width; so k/v get the key/value heads under GQA and an
  MLP projection ``intermediate / head_dim``), with the fallback of ``head_count``
  where that does not divide; the ``num_heads`` knob sets one count for every linear;
* ``W_B = b_B = 0`` at init, so the adapted model equals the base exactly;
* default targets q, k, v, o (studies and ``qlsearch profile`` pass their own);
  our count is the adapter alone and does not reproduce Table 6's 147,922,752;
* deployed with its factors generated once (``fold``): the forward then costs LoRA's.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qlsearch.adapters._wrapper import AdapterModel, find_linears, seeded
from qlsearch.adapters.hyra.config import DEFAULT_TARGETS, HyRAConfig
from qlsearch.adapters.hyra.layer import HyRALinear


def find_targets(model: nn.Module, config: HyRAConfig) -> list[str]:
    """Names of the linears to adapt (``target_modules``, else the attention projections), in module order."""
    return find_linears(model, config.target_modules, DEFAULT_TARGETS)


def head_dim(model: nn.Module) -> int | None:
    """The attention head width of the model config (``head_dim``, else
    ``hidden_size / num_attention_heads``); None for a model without attention heads."""
    model_config = getattr(model, "config", None)
    width = getattr(model_config, "head_dim", None)
    heads = getattr(model_config, "num_attention_heads", None)
    hidden = getattr(model_config, "hidden_size", None)
    if width is None and heads and hidden:
        width = hidden // heads
    return width


def head_count(out_features: int, width: int) -> int:
    """Heads of a linear with ``out_features`` rows when a head is ``width`` rows wide.

    ``out_features / width`` where that divides (q, k, v, o and Qwen2.5's 4864-wide
    gate/up: 76 heads of 64). Fallback where it does not: the largest divisor of
    ``out_features`` not above ``out_features / width``, so every head is at least
    ``width`` rows and the heads tile the rows exactly (1 head for a linear narrower
    than one head).
    """
    most = max(1, out_features // width)
    return next(h for h in range(most, 0, -1) if out_features % h == 0)


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
    inference_form_name = "folded"

    def __init__(self, base_model: nn.Module, config: HyRAConfig):
        super().__init__(base_model, config)
        names = find_targets(base_model, config)
        width = head_dim(base_model)  # None: a model without attention heads, one head per linear
        heads = {n: config.num_heads or (head_count(base_model.get_submodule(n).out_features, width)
                                         if width else 1) for n in names}
        c = config
        with seeded(config.seed):
            for name in names:
                try:
                    self.replace(name, lambda base, h=heads[name]: HyRALinear(
                        base, h, c.r, c.scaling, c.dropout, c.embed_dim, c.hidden_dim))
                except ValueError as err:
                    raise ValueError(f"{err} (at {name})") from None

    def fold(self) -> None:
        """Generate every head's factors once and keep them (outputs unchanged); ``unfold()``
        before training again."""
        for layer in self.adapted_layers():
            layer.fold()

    def unfold(self) -> None:
        for layer in self.adapted_layers():
            layer.unfold()

    def load_adapter(self, directory) -> None:
        super().load_adapter(directory)
        self.unfold()  # folded factors, if any, came from the old weights

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return super().num_trainable_parameters()

    def adapted_shapes(self) -> list[tuple[int, int, int]]:
        """``(d_in, d_out, H)`` of each adapted linear."""
        return [(m.base_layer.in_features, m.base_layer.out_features, m.num_heads) for m in self.adapted_layers()]
