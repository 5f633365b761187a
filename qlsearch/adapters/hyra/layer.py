"""The HyRA linear: ``y = W0 x + (alpha/r) [B_1 A_1; ...; B_H A_H] x``, factors from a hypernetwork.

Head ``h`` owns output rows ``h d_head : (h+1) d_head``. While training, the factors
are generated from the head embeddings at every forward (a few small matmuls,
independent of the batch), so the hypernetwork, not the factors, is what is trained
and saved. Deployed, ``fold()`` generates them once and the forward is LoRA's: one
``r H``-wide down projection and one block-diagonal up projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HeadHypernetwork(nn.Module):
    """Maps head embeddings ``e_h`` (``H x d_e``) to factors ``A_h`` (``r x d_in``) and ``B_h`` (``d_head x r``).

    ``z_h = tanh(W_1 e_h + b_1)``; ``A_h = W_A z_h + b_A``; ``B_h = W_B z_h + b_B``.
    ``W_B``, ``b_B`` start at zero, so every ``B_h = 0`` at init and the adapted
    model equals the base; ``W_A`` is scaled so that ``A_h`` starts with the spread
    of PEFT LoRA's ``A`` (std ``1/sqrt(3 d_in)``).
    """

    def __init__(self, num_heads: int, d_in: int, d_head: int, r: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.num_heads, self.d_in, self.d_head, self.r = num_heads, d_in, d_head, r
        self.head_embeddings = nn.Parameter(torch.randn(num_heads, embed_dim))
        self.trunk = nn.Linear(embed_dim, hidden_dim)
        self.to_A = nn.Linear(hidden_dim, r * d_in)
        self.to_B = nn.Linear(hidden_dim, d_head * r)
        with torch.no_grad():
            z = self.hidden()
            z_rms = z.pow(2).sum(-1).mean().sqrt().clamp_min(1e-6)
            nn.init.normal_(self.to_A.weight, std=1.0 / (math.sqrt(3 * d_in) * float(z_rms)))
            nn.init.zeros_(self.to_A.bias)
            nn.init.zeros_(self.to_B.weight)
            nn.init.zeros_(self.to_B.bias)

    def hidden(self) -> Tensor:
        return torch.tanh(self.trunk(self.head_embeddings))

    def forward(self) -> tuple[Tensor, Tensor]:
        """``(A, B)``: ``H x r x d_in`` and ``H x d_head x r``."""
        z = self.hidden()
        A = self.to_A(z).view(self.num_heads, self.r, self.d_in)
        B = self.to_B(z).view(self.num_heads, self.d_head, self.r)
        return A, B


class HyRALinear(nn.Module):
    """One adapted projection: its frozen ``base_layer`` plus a hypernetwork shared by its heads."""

    def __init__(self, base_layer: nn.Linear, num_heads: int, r: int, scaling: float, dropout: float,
                 embed_dim: int, hidden_dim: int):
        super().__init__()
        d_in, d_out = base_layer.in_features, base_layer.out_features
        if d_out % num_heads:
            raise ValueError(
                f"num_heads: got {num_heads}; allowed: a divisor of the adapted linear's "
                f"out_features ({d_out})"
            )
        self.base_layer = base_layer
        w = base_layer.weight
        self.hypernet = HeadHypernetwork(num_heads, d_in, d_out // num_heads, r, embed_dim, hidden_dim).to(
            device=w.device, dtype=w.dtype)
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout
        self.scaling = scaling
        self.num_heads = num_heads
        self.r = r
        self._folded: tuple[Tensor, Tensor] | None = None

    def fold(self) -> None:
        """Generate the factors once and keep them; the forward stops calling the hypernetwork."""
        with torch.no_grad():
            A, B = self.hypernet()
            self._folded = (A.flatten(0, 1).clone(), B.clone())

    def unfold(self) -> None:
        self._folded = None

    def delta_weight(self) -> Tensor:
        """``Delta W = (alpha/r) [B_1 A_1; ...; B_H A_H]`` (``d_out x d_in``), the heads stacked along rows."""
        A, B = self.hypernet()
        return self.scaling * torch.bmm(B, A).flatten(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self._folded is None:
            A, B = self.hypernet()
            A = A.flatten(0, 1)
        elif self.training:
            raise RuntimeError("this HyRA layer is folded; call unfold() before training it again")
        else:
            A, B = self._folded
        s = F.linear(self.dropout(x) if self.dropout_p else x, A)  # (..., H r)
        update = torch.einsum("...hr,hdr->...hd", s.unflatten(-1, (self.num_heads, self.r)), B)
        return torch.add(self.base_layer(x), update.flatten(-2), alpha=self.scaling)
