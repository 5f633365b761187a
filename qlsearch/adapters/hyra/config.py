"""Hyperparameters of HyRA, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlsearch.adapters._knobs import DROPOUT, POSITIVE, POSITIVE_INT, SEED, TARGETS, Knob
from qlsearch.adapters._wrapper import AdapterConfig

#: Attention projections adapted by default: Llama/Qwen2 spellings, then BERT's.
#: ``attention.output.dense`` is BERT's O projection (its bare ``output.dense`` is the MLP's).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "attention.output.dense")


@dataclass
class HyRAConfig(AdapterConfig):
    """HyRA hyperparameters (Diep et al. 2026, arXiv 2510.04295; symbols in brackets).

    Each adapted projection with ``H`` heads of ``d_head = d_out / H`` output rows
    gets learnable head embeddings ``e_h`` and one hypernetwork shared by its heads:

    ``z_h = tanh(W_1 e_h + b_1)``, ``A_h = W_A z_h + b_A`` (``r x d_in``),
    ``B_h = W_B z_h + b_B`` (``d_head x r``), ``Delta W = (alpha/r) [B_1 A_1; ...; B_H A_H]``.

    ``num_heads=None`` reads the head count from the model config
    (``num_attention_heads``; ``num_key_value_heads`` for ``k_proj``/``v_proj``);
    a model without one (a plain MLP) needs it set.
    """

    r: int = field(default=8, metadata={"knob": POSITIVE_INT, "help": "rank of each head's factors [r]"})
    alpha: float = field(default=16.0, metadata={"knob": POSITIVE, "help": "LoRA scale numerator [alpha]; the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"knob": DROPOUT, "help": "dropout on the adapter input, in [0, 1)"})
    embed_dim: int = field(default=16, metadata={"knob": POSITIVE_INT, "help": "width of each head's learnable embedding [d_e]"})
    hidden_dim: int = field(default=8, metadata={"knob": POSITIVE_INT, "help": "hidden width of the shared hypernetwork [d_h]"})
    num_heads: int | None = field(default=None, metadata={"knob": Knob(int, low=1, optional=True), "help": "heads per adapted linear; None: from the model config"})
    target_modules: list[str] | None = field(default=None, metadata={"knob": TARGETS, "help": "names (or name suffixes) of the linears to adapt; None: the attention projections q, k, v, o"})
    seed: int | None = field(default=None, metadata={"knob": SEED, "help": "seed for the adapter's initialisation (None: the global RNG)"})

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
