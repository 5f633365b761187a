"""Hyperparameters of MoE-LoRA, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlsearch.adapters._knobs import (
    DROPOUT,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    TARGETS,
    AtMost,
)
from qlsearch.adapters._wrapper import AdapterConfig


@dataclass
class MoELoRAConfig(AdapterConfig):
    """MoE-LoRA hyperparameters (Luo et al. 2024, arXiv 2402.12851; symbols in brackets).

    Per adapted linear: ``y = W0 x + (alpha/r) sum_{i in topk} G(x)_i B_i A_i x``,
    ``G(x) = softmax(W_g x)`` per token, renormalised over its top-k experts.
    During training each layer also produces
    ``load_balance_weight * L_balance + contrastive_weight * L_contrastive``
    (see ``MoELoRALinear``); the model's auxiliary term, read through
    ``qlsearch.adapters.auxiliary_loss(model)``, is the mean of these over the adapted
    layers, so the weights mean the same at any depth.

    ``target_modules=None`` adapts every ``nn.Linear`` inside the transformer
    layers (every ``nn.Linear`` of a model without a layer list).
    """

    r: int = field(default=8, metadata={"knob": POSITIVE_INT, "help": "rank of each expert [r]"})
    alpha: float = field(default=16.0, metadata={"knob": POSITIVE, "help": "LoRA scale numerator [alpha]; each expert is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"knob": DROPOUT, "help": "dropout on the experts' input, in [0, 1)"})
    num_experts: int = field(default=4, metadata={"knob": POSITIVE_INT, "help": "LoRA experts per adapted linear [E]"})
    top_k: int = field(default=2, metadata={"knob": POSITIVE_INT, "help": "experts mixed per token [k], 1 <= k <= E"})
    load_balance_weight: float = field(default=0.01, metadata={"knob": NON_NEGATIVE, "help": "weight of the Switch load-balance loss E sum_i f_i P_i, >= 0"})
    contrastive_weight: float = field(default=0.01, metadata={"knob": NON_NEGATIVE, "help": "weight of the expert contrastive (InfoNCE) loss, >= 0"})
    contrastive_temperature: float = field(default=0.1, metadata={"knob": POSITIVE, "help": "temperature of the contrastive loss [tau] > 0"})
    contrastive_tokens: int = field(default=256, metadata={"knob": POSITIVE_INT, "help": "most tokens per layer and forward the contrastive loss looks at (an evenly strided subset)"})
    target_modules: list[str] | None = field(default=None, metadata={"knob": TARGETS, "help": "names (or name suffixes) of the linears to adapt; None: all linears of the layers"})
    seed: int | None = field(default=None, metadata={"knob": SEED, "help": "seed for the adapter's initialisation (None: the global RNG)"})

    RULES = (AtMost("top_k", "num_experts"),)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
