"""Hyperparameters of RepLoRA, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlsearch.adapters._knobs import DROPOUT, POSITIVE, POSITIVE_INT, SEED, TARGETS, Knob
from qlsearch.adapters._wrapper import AdapterConfig

#: The attention Q and V projections: Llama/Qwen2 spellings, then BERT's.
DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh", "identity")


@dataclass
class RepLoRAConfig(AdapterConfig):
    """RepLoRA hyperparameters (Truong et al. 2025, arXiv 2502.03044; symbols in brackets).

    Each adapted projection ``t`` has learnable seeds ``A0_t`` (``r x d_in``) and
    ``B0_t`` (``d_out x r``); each *unit* (transformer layer) has one shared first
    layer per factor, each projection its own head:

    ``A_t = (W2_{A,t} sigma(W1_A A0_t^T + b1_A) + b2_{A,t})^T``,
    ``B_t =  W2_{B,t} sigma(W1_B B0_t   + b1_B) + b2_{B,t}``  (rows through the MLP),
    ``y = W0 x + (alpha/r) B_t A_t dropout(x)``.

    The MLP acts on the rank axis (``r -> hidden -> r``), so one first layer fits
    projections of any shape (Q and V differ in ``d_out`` under GQA).
    """

    r: int = field(default=8, metadata={"knob": POSITIVE_INT, "help": "LoRA rank [r]"})
    alpha: float = field(default=16.0, metadata={"knob": POSITIVE, "help": "LoRA scale numerator [alpha]; the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"knob": DROPOUT, "help": "dropout on the adapter input, in [0, 1)"})
    hidden: int = field(default=32, metadata={"knob": POSITIVE_INT, "help": "hidden width of the reparameterising MLP [h]"})
    activation: str = field(default="gelu", metadata={"knob": Knob(str, choices=ACTIVATIONS), "help": f"MLP nonlinearity [sigma], one of {ACTIVATIONS}"})
    target_modules: list[str] | None = field(default=None, metadata={"knob": TARGETS, "help": "names (or name suffixes) of the linears to adapt; None: the attention Q and V projections"})
    seed: int | None = field(default=None, metadata={"knob": SEED, "help": "seed for the adapter's initialisation (None: the global RNG)"})

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules or DEFAULT_TARGETS)

