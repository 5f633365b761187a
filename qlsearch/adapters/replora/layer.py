"""RepLoRA's adapted linear: plain LoRA whose factors an MLP generates from learnable seeds.

The first MLP layer (``SharedInput``) belongs to the unit and is shared by its
projections; the seeds and output heads are the projection's own. After
training, ``fold()`` evaluates the MLP once and keeps the plain factors, so
inference costs what LoRA's does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda z: z}


def _linear(n_in: int, n_out: int, like: Tensor, zero: bool = False) -> nn.Linear:
    layer = nn.Linear(n_in, n_out, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        layer.bias.zero_()  # a bias would add the same value to every row of a factor
        if zero:
            layer.weight.zero_()
    return layer


class SharedInput(nn.Module):
    """The unit's first MLP layers ``W1_A``, ``W1_B`` (``r -> hidden``), shared by its projections."""

    def __init__(self, r: int, hidden: int, like: Tensor):
        super().__init__()
        self.A = _linear(r, hidden, like)
        self.B = _linear(r, hidden, like)


class RepLoRALinear(nn.Module):
    """``y = W0 x + (alpha/r) B A dropout(x)`` with ``A``, ``B`` generated from seeds (see config)."""

    def __init__(self, base_layer: nn.Linear, shared: SharedInput, r: int, hidden: int, scaling: float,
                 dropout: float, activation: str):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.seed_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype))
        self.seed_B = nn.Parameter(torch.empty(base_layer.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.seed_A, a=math.sqrt(5))  # PEFT LoRA's initialisation of A
        # B0 is random (not zero) so the zero head still receives a gradient
        nn.init.uniform_(self.seed_B, -1 / math.sqrt(r), 1 / math.sqrt(r))
        self.head_A = _linear(hidden, r, w)
        self.head_B = _linear(hidden, r, w, zero=True)  # B = 0 at init: the output is the base model's
        self.act = _ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout
        self.scaling = scaling
        self._shared = (shared,)  # a tuple: the unit owns it, not a submodule of each projection
        self._folded: tuple[Tensor, ...] | None = None

    def factors(self) -> tuple[Tensor, Tensor]:
        """The generated LoRA factors ``A`` (``r x d_in``) and ``B`` (``d_out x r``)."""
        shared = self._shared[0]
        A = self.head_A(self.act(shared.A(self.seed_A.t()))).t()
        B = self.head_B(self.act(shared.B(self.seed_B)))
        return A, B

    def fold(self) -> None:
        """Evaluate the MLP once and keep the plain factors; forward then costs LoRA's."""
        with torch.no_grad():
            self._folded = tuple(t.detach().clone() for t in self.factors())

    def unfold(self) -> None:
        self._folded = None

    @property
    def folded(self) -> bool:
        return self._folded is not None

    def _current(self) -> tuple[Tensor, Tensor]:
        if self._folded is None:
            return self.factors()
        if self.training:
            raise RuntimeError("this RepLoRA layer is folded; call unfold() before training it again")
        return self._folded

    def forward(self, x: Tensor) -> Tensor:
        A, B = self._current()
        h = self.dropout(x) if self.dropout_p else x
        return torch.add(self.base_layer(x), F.linear(F.linear(h, A), B), alpha=self.scaling)
