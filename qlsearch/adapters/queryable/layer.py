"""The adapted linear: ``y = W0 x + (alpha/r) B (s + g S_b s)``, ``s = A dropout(x)``.

The forward is a handful of tensor ops (DESIGN.md, "Where the time goes"): the
route ``S_b`` and every projection's mixer ``(I + g S_b)^T`` are computed once per
block (by the block's first state projection) and only read here. While decoding,
the route is held, so ``(alpha/r)(I + g S_b) A`` is folded once per route into a
per-example factor and each step costs one batched matmul, as LoRA's does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlsearch.adapters.queryable.router import AtomRouter
from qlsearch.adapters.queryable.state import RoutingState


class QueryableLinear(nn.Module):
    """One adapted projection. ``A`` and ``B`` are its own; ``S_b`` is its block's, and its
    gate logit ``eta`` is entry ``index`` of the router's ``gate_logits``.

    Placement in the model is set by ``QueryableModel``: ``unit``, ``block``, ``index``
    and ``slot`` (its position among the block's projections), and on the first state
    projection of each unit, ``state_layers`` (the unit's Q, K, V projections, whose
    mean state is the unit state).
    """

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT LoRA's initialisation
        self.dropout = nn.Dropout(dropout)
        self.dropout_p = dropout  # skip the dropout call entirely when it is off
        self.scaling = scaling
        self.r = r
        self.unit = 0
        self.block = 0
        self.index = 0
        self.slot = 0
        self.is_entry = False
        self._shared: tuple[AtomRouter, RoutingState] | None = None  # a tuple: not a submodule
        self.state_layers: tuple[QueryableLinear, ...] = ()
        self._folded: Tensor | None = None
        self._folded_for: object = None  # the Route the folded factor was made from
        # A plain nn.Linear base is applied as F.linear on its own weight and bias: the module
        # call costs as much as the op on a small layer (so hooks on the base layer itself do
        # not fire; any other base, e.g. a quantized one, is called as a module)
        self._plain_base = type(base_layer) is nn.Linear

    @property
    def gate(self) -> Tensor:
        """``g = sigmoid(eta)``."""
        return torch.sigmoid(self._shared[0].gate_logits[self.index])

    def forward(self, x: Tensor) -> Tensor:
        router, state = self._shared
        if state.hold and state.fold and not self.training:
            return self._forward_folded(x, state)
        s = F.linear(self.dropout(x) if self.dropout_p else x, self.lora_A)
        if self.state_layers and not state.hold:
            self._record_unit_state(x, s, router, state)
        route = state.routes.get(self.block)
        if route is None:
            raise RuntimeError(
                f"block {self.block} has no route: its entry projection must run before the "
                "block's other adapted projections (is the model's forward order unusual?)"
            )
        mixer_t = route.mixers_t[self.slot]
        base = self.base_layer
        y = F.linear(x, base.weight, base.bias) if self._plain_base else base(x)
        if s.dim() == 2:  # one row per example (a plain MLP): the B GEMM adds onto the base output
            t = torch.bmm(s.unsqueeze(1), mixer_t).squeeze(1)  # s (I + g S)^T = s + g s S^T
            return torch.addmm(y, t, self.lora_B.t(), alpha=self.scaling)
        if s.dim() == 3:
            t = torch.bmm(s, mixer_t)
        else:  # (batch, ..., r): one example per leading row
            t = torch.bmm(s.reshape(mixer_t.shape[0], -1, self.r), mixer_t).view_as(s)
        return torch.add(y, F.linear(t, self.lora_B), alpha=self.scaling)

    def _record_unit_state(self, x: Tensor, s: Tensor, router: AtomRouter, state: RoutingState) -> None:
        """Unit state: mean over the unit's Q, K, V of the token-averaged ``A^p x`` (eq. 15-16).

        The token average commutes with ``A``, so it is taken once on ``x``.
        The state is read without dropout: routing sees the input itself, so the
        train-time route matches the eval-time one. A unit of one projection (a plain
        MLP's linear) whose ``s = A x`` saw no dropout reads its state off ``s``: the
        router's work per unit is then at most one token average, not four ops.
        """
        if len(self.state_layers) == 1 and not (self.dropout_p and self.training):
            s = state.token_mean(s)
        else:
            A = torch.cat([layer.lora_A for layer in self.state_layers])
            s = F.linear(state.token_mean(x), A).unflatten(-1, (len(self.state_layers), self.r)).mean(-2)
        state.unit_states[self.unit] = s
        if self.is_entry:
            state.route_block(router, self.block, s)

    def _forward_folded(self, x: Tensor, state: RoutingState) -> Tensor:
        route = state.routes[self.block]
        if self._folded_for is not route:  # a new route (a new generate call): fold it once
            A = self.lora_A
            mixer = route.mixers_t[self.slot].transpose(1, 2)  # I + g S_b
            self._folded = self.scaling * (mixer @ A)  # (batch, r, d_in)
            self._folded_for = route
        folded = self._folded
        x3 = x.reshape(folded.shape[0], -1, x.shape[-1])
        update = F.linear(torch.bmm(x3, folded.transpose(1, 2)), self.lora_B)
        return self.base_layer(x) + update.view(*x.shape[:-1], -1)
