"""DoRAN's adapted linear: DoRA with a learnable ``tau`` in the denominator and generated factors.

``y = m / (||W0 + s B A|| + tau) * (W0 x + s B A dropout(x)) + b``: the weight is
never materialised for the product, only for its row norms (as PEFT's DoRA does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlsearch.adapters.replora.layer import RepLoRALinear, SharedInput


class DoRANLinear(RepLoRALinear):
    """One adapted projection: RepLoRA's generated ``A``, ``B`` plus magnitude ``m`` and ``tau``."""

    def __init__(self, base_layer: nn.Linear, shared: SharedInput, r: int, hidden: int, scaling: float,
                 dropout: float, activation: str, tau_init: float, magnitude_init: str):
        super().__init__(base_layer, shared, r, hidden, scaling, dropout, activation)
        w = base_layer.weight
        with torch.no_grad():
            norm = torch.linalg.vector_norm(w.float(), dim=1).to(w.dtype)
            magnitude = norm + tau_init if magnitude_init == "norm_plus_tau" else norm
        self.magnitude = nn.Parameter(magnitude)  # [m], one per output row
        # rho = softplus^{-1}(tau_init), so tau = softplus(rho) starts at tau_init
        rho = tau_init + math.log(-math.expm1(-tau_init))
        self.tau_logit = nn.Parameter(torch.tensor(rho, device=w.device, dtype=w.dtype))

    @property
    def tau(self) -> Tensor:
        """``tau = softplus(rho) > 0``."""
        return F.softplus(self.tau_logit)

    def row_scale(self, A: Tensor, B: Tensor) -> Tensor:
        """``m / (||W0 + s B A|| + tau)`` per output row; the norm is detached (DoRA, §4.3)."""
        weight = self.base_layer.weight + self.scaling * (B @ A)
        norm = torch.linalg.vector_norm(weight, dim=1).detach()
        return self.magnitude / (norm + self.tau)

    def fold(self) -> None:
        """Keep ``A``, ``B`` and the row scale: inference then costs LoRA's (or merge ``merged_weight()``)."""
        with torch.no_grad():
            A, B = (t.detach().clone() for t in self.factors())
            self._folded = (A, B, self.row_scale(A, B).detach().clone())

    def merged_weight(self) -> Tensor:
        """``W'`` itself, for merging into the base linear."""
        with torch.no_grad():
            A, B = self.factors()
            return self.row_scale(A, B)[:, None] * (self.base_layer.weight + self.scaling * (B @ A))

    def forward(self, x: Tensor) -> Tensor:
        if self._folded is not None:
            if self.training:
                raise RuntimeError("this DoRAN layer is folded; call unfold() before training it again")
            A, B, scale = self._folded
        else:
            A, B = self.factors()
            scale = self.row_scale(A, B)
        h = self.dropout(x) if self.dropout_p else x
        out = torch.add(F.linear(x, self.base_layer.weight), F.linear(F.linear(h, A), B), alpha=self.scaling)
        out = out * scale
        bias = self.base_layer.bias
        return out if bias is None else out + bias
