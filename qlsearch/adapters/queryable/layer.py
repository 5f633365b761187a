"""The adapted linear: ``y = W0 x + (alpha/r) B (s + g S_b s)``, ``s = A dropout(x)``.

The forward is a handful of tensor ops (DESIGN.md, "Where the time goes"): the
route ``S_b`` is computed once per block (by the block's first state projection), and
so is every projection's mixer ``(I + g S_b)^T`` while ``g`` trains; the inference
form, whose ``g`` is a fixed number, applies ``I + g S_b`` as one ``baddbmm`` on ``S_b``
itself and makes no mixers. While decoding,
the route is held, so ``(alpha/r)(I + g S_b) A`` is folded once per route into a
per-example factor and each step costs one batched matmul, as LoRA's does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlsearch.adapters.queryable.router import AtomRouter, Route
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
        self.fixed: Operands | None = None  # the inference form's operands (QueryableModel.fold)
        self._plain_base = type(base_layer) is nn.Linear  # see _base

    @property
    def gate(self) -> Tensor:
        """``g = sigmoid(eta)``."""
        return torch.sigmoid(self._shared[0].gate_logits[self.index])

    def operands(self, gate: float | None = None) -> Operands:
        """The tensors the forward reads, each read once (``Operands``). ``gate`` is ``g`` as a
        number, for the inference form, which keeps these for all its forwards."""
        base = self.base_layer
        weight, bias = (base.weight, base.bias) if self._plain_base else (None, None)
        state_A = None
        if gate is not None and self.state_layers:
            state_A = torch.cat([layer.lora_A for layer in self.state_layers])
        return Operands(self.lora_A.t(), self.lora_B.t(), weight, None if weight is None else weight.t(),
                        bias, gate, state_A)

    def forward(self, x: Tensor) -> Tensor:
        router, state = self._shared
        if state.hold and state.fold and not self.training:
            return self._forward_folded(x, state)
        ops = self.fixed if self.fixed is not None and not self.training else self.operands()
        flat = x.dim() == 2  # one row per example (a plain MLP): 2-D GEMMs, no reshapes
        h = self.dropout(x) if self.dropout_p else x
        s = torch.mm(h, ops.A_t) if flat else h @ ops.A_t
        if self.state_layers and not state.hold:
            self._record_unit_state(x, s, router, state, ops.state_A)
        route = state.routes.get(self.block)
        if route is None:
            raise RuntimeError(
                f"block {self.block} has no route: its entry projection must run before the "
                "block's other adapted projections (is the model's forward order unusual?)"
            )
        y = self._base(x, ops, flat)
        if flat:  # the B GEMM adds onto the base output
            s = s.unsqueeze(1)
            return torch.addmm(y, self._mix(s, route, ops.gate).squeeze(1), ops.B_t, alpha=self.scaling)
        if s.dim() == 3:
            t = self._mix(s, route, ops.gate)
        else:  # (batch, ..., r): one example per leading row
            t = self._mix(s.reshape(route.operator_t.shape[0], -1, self.r), route, ops.gate).view_as(s)
        return torch.add(y, t @ ops.B_t, alpha=self.scaling)

    def _base(self, x: Tensor, ops: Operands, flat: bool) -> Tensor:
        """``W0 x + b``: a plain ``nn.Linear`` as its GEMM on the operands (the module call costs
        as much as the op on a small layer; hooks on the base layer itself do not fire), any
        other base (e.g. a quantized one) as a module."""
        if ops.weight is None:
            return self.base_layer(x)
        if flat and ops.bias is not None:
            return torch.addmm(ops.bias, x, ops.weight_t)
        return F.linear(x, ops.weight, ops.bias)

    def _mix(self, s: Tensor, route: Route, gate: float | None) -> Tensor:
        """``s (I + g S_b)^T`` for ``s`` of (batch, n, r): one ``bmm`` by the route's mixer, or,
        with ``g`` a fixed number (the inference form), one ``baddbmm`` ``s + g s S_b^T``,
        so that no mixer is made at all."""
        if gate is None:
            return torch.bmm(s, route.mixers_t[self.slot])
        return torch.baddbmm(s, s, route.operator_t, alpha=gate)

    def _record_unit_state(self, x: Tensor, s: Tensor, router: AtomRouter, state: RoutingState,
                           state_A: Tensor | None) -> None:
        """Unit state: mean over the unit's Q, K, V of the token-averaged ``A^p x`` (eq. 15-16).

        The token average commutes with ``A``, so it is taken once on ``x``.
        The state is read without dropout: routing sees the input itself, so the
        train-time route matches the eval-time one. A unit of one projection (a plain
        MLP's linear) whose ``s = A x`` saw no dropout reads its state off ``s``: the
        router's work per unit is then at most one token average, not four ops.
        ``state_A`` stacks the unit's ``A^p`` (None: stacked here).
        """
        if len(self.state_layers) == 1 and not (self.dropout_p and self.training):
            s = state.token_mean(s)
        else:
            A = torch.cat([layer.lora_A for layer in self.state_layers]) if state_A is None else state_A
            s = F.linear(state.token_mean(x), A).unflatten(-1, (len(self.state_layers), self.r)).mean(-2)
        state.unit_states[self.unit] = s
        if self.is_entry:
            state.route_block(router, self.block, s)

    def _forward_folded(self, x: Tensor, state: RoutingState) -> Tensor:
        route = state.routes[self.block]
        ops = self.fixed or self.operands()
        if self._folded_for is not route:  # a new route (a new generate call): fold it once
            mixer = route.mixers_t[self.slot].transpose(1, 2)  # I + g S_b
            self._folded = self.scaling * (mixer @ ops.A_t.t())  # (batch, r, d_in)
            self._folded_for = route
        folded = self._folded
        x3 = x.reshape(folded.shape[0], -1, x.shape[-1])
        update = torch.bmm(x3, folded.transpose(1, 2)) @ ops.B_t
        return self._base(x, ops, False) + update.view(*x.shape[:-1], -1)


class Operands(NamedTuple):
    """What an adapted projection's forward reads, as plain references, transposed for the GEMMs
    that read them: reading a parameter through ``nn.Module.__getattr__`` costs 1-2 us on a
    CPU, and a transpose about as much, each as much as a small op, and a small layer's
    forward did half a dozen of each. Made per forward (``operands()``), or once by the
    inference form (``QueryableModel.fold``), which also turns ``g`` into a number."""

    A_t: Tensor  # A^T, (d_in, r)
    B_t: Tensor  # B^T, (r, d_out)
    weight: Tensor | None  # W0 of a plain nn.Linear base (any other base is called as a module)
    weight_t: Tensor | None  # W0^T: a 2-D input's base GEMM is one addmm on it
    bias: Tensor | None
    gate: float | None  # g as a number (the inference form); None: the route's mixers carry it
    state_A: Tensor | None  # the unit's A^p stacked, on its first state projection (inference form)
