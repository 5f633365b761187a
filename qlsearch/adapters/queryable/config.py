"""Hyperparameters of the queryable adapter, validated once at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qlsearch.adapters._wrapper import AdapterConfig, is_positive_int

#: Projections whose rank-space states form an attention unit's router state
#: (paper eq. 15-16: the mean over Q, K, V). Llama/Qwen2 and BERT spellings.
DEFAULT_STATE_MODULES = ("q_proj", "k_proj", "v_proj", "query", "key", "value")


@dataclass
class QueryableConfig(AdapterConfig):
    """Queryable LoRA hyperparameters (paper §3, Algorithm 1; symbols in brackets).

    ``target_modules=None`` adapts every ``nn.Linear`` inside the transformer
    layers (or every ``nn.Linear`` of a model without a layer list), the same set
    as PEFT's ``"all-linear"``.
    """

    r: int = field(default=8, metadata={"help": "LoRA rank [r]; atoms are r x r"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scale numerator [alpha_L]; the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input [D], in [0, 1)"})
    num_atoms: int = field(default=16, metadata={"help": "atoms in the shared memory [M]"})
    top_k: int = field(default=4, metadata={"help": "atoms mixed per block and example [k], 1 <= k <= M"})
    num_blocks: int = field(default=4, metadata={"help": "contiguous blocks of units, one route each [B]"})
    d_k: int = field(default=64, metadata={"help": "query/key width of the router [d_k]"})
    T_attn: float = field(default=1.0, metadata={"help": "temperature of the state logits [T_attn] > 0"})
    T_lang: float = field(default=1.0, metadata={"help": "temperature of the language prior [T_lang] > 0"})
    T_dep: float = field(default=1.0, metadata={"help": "temperature of the depth summary [T_dep] > 0"})
    tau_lang: float = field(default=0.0, metadata={"help": "strength of the instruction prior [tau_lang] >= 0"})
    lambda_ctx: float = field(default=0.0, metadata={"help": "weight of the instruction in the query [lambda_ctx] >= 0"})
    instruction_dim: int = field(default=384, metadata={"help": "width of the instruction embedding [d_e] (384: all-MiniLM-L6-v2)"})
    instruction_encoder: str = field(default="all-MiniLM-L6-v2", metadata={"help": "sentence-transformers model that embeds instruction text"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "names (or name suffixes) of the linears to adapt; None: all linears of the layers"})
    state_modules: list[str] = field(default_factory=lambda: list(DEFAULT_STATE_MODULES), metadata={"help": "projections whose states form the unit state"})
    init_gate: float = field(default=0.0, metadata={"help": "initial gate logit [eta]; g = sigmoid(eta)"})
    seed: int | None = field(default=None, metadata={"help": "seed for the adapter's initialisation (None: the global RNG)"})

    def __post_init__(self) -> None:
        need = self.require
        for name in ("r", "num_atoms", "num_blocks", "d_k", "instruction_dim"):
            need(is_positive_int(getattr(self, name)), name, "an integer >= 1")
        need(is_positive_int(self.top_k) and self.top_k <= self.num_atoms, "top_k",
             f"an integer with 1 <= top_k <= num_atoms ({self.num_atoms})")
        need(0.0 <= self.dropout < 1.0, "dropout", "a number in [0, 1)")
        for name in ("T_attn", "T_lang", "T_dep"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a finite number > 0")
        for name in ("tau_lang", "lambda_ctx"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        need(self.alpha > 0, "alpha", "a number > 0")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.state_modules = list(self.state_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
