"""Hyperparameters of the queryable adapter, validated once at the edge."""

from __future__ import annotations

from dataclasses import dataclass, field

from qlsearch.adapters._knobs import (
    DROPOUT,
    FINITE,
    NON_NEGATIVE,
    POSITIVE,
    POSITIVE_INT,
    SEED,
    TARGETS,
    AtMost,
    Knob,
)
from qlsearch.adapters._wrapper import AdapterConfig

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

    r: int = field(default=8, metadata={"knob": POSITIVE_INT, "help": "LoRA rank [r]; atoms are r x r"})
    alpha: float = field(default=16.0, metadata={"knob": POSITIVE, "help": "LoRA scale numerator [alpha_L]; the update is scaled by alpha/r"})
    dropout: float = field(default=0.0, metadata={"knob": DROPOUT, "help": "dropout on the adapter input [D], in [0, 1)"})
    num_atoms: int = field(default=16, metadata={"knob": POSITIVE_INT, "help": "atoms in the shared memory [M]"})
    top_k: int = field(default=4, metadata={"knob": POSITIVE_INT, "help": "atoms mixed per block and example [k], 1 <= k <= M"})
    num_blocks: int = field(default=4, metadata={"knob": POSITIVE_INT, "help": "contiguous blocks of units, one route each [B]"})
    d_k: int = field(default=64, metadata={"knob": POSITIVE_INT, "help": "query/key width of the router [d_k]"})
    T_attn: float = field(default=1.0, metadata={"knob": POSITIVE, "help": "temperature of the state logits [T_attn] > 0"})
    T_lang: float = field(default=1.0, metadata={"knob": POSITIVE, "help": "temperature of the language prior [T_lang] > 0"})
    T_dep: float = field(default=1.0, metadata={"knob": POSITIVE, "help": "temperature of the depth summary [T_dep] > 0"})
    tau_lang: float = field(default=0.0, metadata={"knob": NON_NEGATIVE, "help": "strength of the instruction prior [tau_lang] >= 0"})
    lambda_ctx: float = field(default=0.0, metadata={"knob": NON_NEGATIVE, "help": "weight of the instruction in the query [lambda_ctx] >= 0"})
    instruction_dim: int = field(default=384, metadata={"knob": POSITIVE_INT, "help": "width of the instruction embedding [d_e] (384: all-MiniLM-L6-v2)"})
    instruction_encoder: str = field(default="all-MiniLM-L6-v2", metadata={"knob": Knob(str), "help": "sentence-transformers model that embeds instruction text"})
    target_modules: list[str] | None = field(default=None, metadata={"knob": TARGETS, "help": "names (or name suffixes) of the linears to adapt; None: all linears of the layers"})
    state_modules: list[str] = field(default_factory=lambda: list(DEFAULT_STATE_MODULES), metadata={"knob": Knob(list), "help": "projections whose states form the unit state"})
    init_gate: float = field(default=0.0, metadata={"knob": FINITE, "help": "initial gate logit [eta]; g = sigmoid(eta)"})
    seed: int | None = field(default=None, metadata={"knob": SEED, "help": "seed for the adapter's initialisation (None: the global RNG)"})

    RULES = (AtMost("top_k", "num_atoms"),)  # paper B.2: k <= M

    def __post_init__(self) -> None:
        super().__post_init__()
        self.state_modules = list(self.state_modules)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r
