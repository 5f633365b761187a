"""The adapted linear: ``y = W0 x + (alpha/r) B (s + g S_b s)``, ``s = A dropout(x)``.

The forward is a handful of tensor ops (DESIGN.md, "Where the time goes"), as few as
PEFT LoRA's: the route ``S_b`` is computed once per block (by the block's first state
projection), and so is every projection's mixer ``(alpha/r)(I + g S_b)^T`` while ``g``
trains; the inference form, whose ``g`` is a fixed number, applies it as one ``baddbmm``
on ``S_b`` itself and makes no mixers. A unit's Q, K and V share one GEMM for their ``A``
(which also gives the unit state), and ``B``'s GEMM accumulates into the base output.
While decoding, the route is held, so ``(alpha/r)(I + g S_b) A`` is folded once per route
into a per-example factor and each step costs one batched matmul, as LoRA's does.
``qlsearch profile`` counts the kernels (``qlsearch/profiling/_kernels.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from qlsearch.adapters.queryable.router import AtomRouter, Route
from qlsearch.adapters.queryable.state import RoutingState


class QueryableLinear(nn.Module):
    """One adapted projection. ``A`` and ``B`` are its own; ``S_b`` is its block's, and its
    gate logit ``eta`` is entry ``index`` of the router's ``gate_logits``.

    Placement in the model is set by ``QueryableModel``: ``unit``, ``block``, ``index``
    and ``slot`` (its position among the block's projections); ``state_slot``, its position
    among its unit's state projections (Q, K, V; -1: not one), and on the first of them,
    ``state_layers`` (those projections, whose mean state is the unit state) and
    ``records_state`` (whether some route reads the unit state).
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
        self.state_slot = -1
        self.state_layers: tuple[QueryableLinear, ...] = ()
        self.records_state = False
        self._folded: Tensor | None = None  # the held route folded in (fold_route)
        self.fixed: Operands | None = None  # the inference form's operands (QueryableModel.fold)
        self._plain_base = type(base_layer) is nn.Linear  # see _plus_base

    @property
    def gate(self) -> Tensor:
        """``g = sigmoid(eta)``."""
        return torch.sigmoid(self._shared[0].gate_logits[self.index])

    def operands(self, gate: float | None = None) -> Operands:
        """The tensors the forward reads, each read once (``Operands``). ``gate`` is ``g`` as a
        number, for the inference form, which keeps these for all its forwards. Per forward,
        a state projection of a unit of several leaves ``A^T`` to its unit's stacked GEMM
        (``_down``; read where it is needed after all)."""
        base = self.base_layer
        weight, bias = (base.weight, base.bias) if self._plain_base else (None, None)
        stacked = len(self.state_layers) > 1 or self.state_slot > 0
        A_t = self.lora_A.t() if gate is not None or not stacked else None
        state_A_t = None
        if len(self.state_layers) > 1:
            state_A_t = torch.cat([layer.lora_A for layer in self.state_layers]).t()
        elif self.state_layers:
            state_A_t = A_t
        return Operands(A_t, self.lora_B.t(), weight, None if weight is None else weight.t(), bias, gate, state_A_t)

    def forward(self, x: Tensor) -> Tensor:
        """``W0 x + b + t B^T`` with ``t = (alpha/r) s (I + g S_b)^T``, or while a route is held,
        ``t = x ((alpha/r)(I + g S_b) A)^T`` from the folded factor.

        One method with few calls, because its Python is a visible part of a small layer's
        cost: on the deep-MLP backbone (32 layers of width 32, batch 64), each helper call a
        layer made cost about 1 % of the forward (measured in shuffled rounds). A plain ``nn.Linear``
        base runs as its GEMM on the operands (the module call costs as much as the op on a
        small layer; hooks on the base layer itself do not fire), and the B GEMM accumulates
        into that output in place: one GEMM where a GEMM and an add were two launches (nothing
        saved the output for backward; it is ours to write). Any other base (e.g. a quantized
        one) is called as a module on ``x``."""
        router, state = self._shared
        training = self.training
        ops = self.fixed if self.fixed is not None and not training else self.operands()
        flat = x.dim() == 2  # one row per example (a plain MLP)
        rows = x if flat else x.reshape(-1, x.shape[-1])  # x's rows as one matrix: 2-D GEMMs
        if state.hold and state.fold and not training:
            folded = self._folded  # (examples, r, d_in)
            t = torch.bmm(rows.view(folded.shape[0], -1, rows.shape[-1]), folded.transpose(1, 2))
        else:
            s = self._down(x, rows, ops, router, state)
            route = state.routes.get(self.block)
            if route is None:
                raise RuntimeError(
                    f"block {self.block} has no route: its entry projection must run before the "
                    "block's other adapted projections (is the model's forward order unusual?)"
                )
            s = s.view(route.operator_t.shape[0], -1, self.r)  # one route per leading row of x
            if ops.gate is None:  # one bmm by the route's mixer, which carries alpha/r
                t = torch.bmm(s, route.mixers_t[self.slot])
            else:  # g a number (the inference form): (alpha/r) s + (alpha/r) g s S_b^T, no mixer made
                t = torch.baddbmm(s, s, route.operator_t, beta=self.scaling, alpha=self.scaling * ops.gate)
        t = t.view(-1, self.r)
        if ops.weight is None:
            y = self.base_layer(x).reshape(rows.shape[0], -1) + t @ ops.B_t
        else:
            y = torch.mm(rows, ops.weight_t) if ops.bias is None else torch.addmm(ops.bias, rows, ops.weight_t)
            # under autocast, which casts out-of-place ops only, y's dtype is not B's
            y = y.addmm_(t, ops.B_t) if y.dtype == ops.B_t.dtype else torch.addmm(y, t, ops.B_t)
        return y if flat else y.view(*x.shape[:-1], -1)

    def _A_t(self, ops: Operands) -> Tensor:
        """``A^T``: the operands', or made here where they leave it to the unit's stacked GEMM
        (read only where needed: under a precision policy each read of ``lora_A`` is a cast)."""
        return self.lora_A.t() if ops.A_t is None else ops.A_t

    def _down(self, x: Tensor, rows: Tensor, ops: Operands, router: AtomRouter, state: RoutingState) -> Tensor:
        """``s = A dropout(x)`` as (rows, r); on its unit's first state projection, also the unit
        state (eq. 15-16: the mean over Q, K, V of the token-averaged ``A^p x``), and on its
        block's entry, the block's route.

        The state is read without dropout: routing sees the input itself, so the train-time
        route matches the eval-time one. Where no dropout is in play, the unit's state
        projections see one ``x`` (an attention's Q, K and V), so the first of them makes
        every one's ``s`` with one GEMM on their stacked ``A`` and takes the state off those
        (the token average commutes with ``A``), and the others take their slice: per unit,
        one GEMM where there were four, and a backward to match. A state projection that
        sees another ``x`` than the first (an unusual model) makes its own.
        """
        if self.state_slot > 0:
            made = state.unit_downs.get(self.unit)
            if made is not None and made[0] is x:
                if self.state_slot == len(made[1]) - 1:  # the last reader: x need not live on
                    del state.unit_downs[self.unit]
                return made[1][self.state_slot]
        records = self.records_state and not state.hold
        if self.dropout_p and self.training:  # each projection its own dropout mask: no shared GEMM
            s = torch.mm(self.dropout(rows), self._A_t(ops))
            if records:
                self._record_unit_state(torch.mm(state.token_mean(x), ops.state_A_t), router, state)
            return s
        if not self.state_layers:  # A^T is None for a state projection whose x was not its unit's
            return torch.mm(rows, self._A_t(ops))
        stacked = torch.mm(rows, ops.state_A_t)  # (rows, P r)
        if records:
            self._record_unit_state(stacked if x.dim() == 2 else state.token_mean(stacked.view(*x.shape[:-1], -1)),
                                    router, state)
        if len(self.state_layers) == 1:
            return stacked
        parts = stacked.split(self.r, dim=-1)
        state.unit_downs[self.unit] = (x, parts)
        return parts[0]

    def _record_unit_state(self, means: Tensor, router: AtomRouter, state: RoutingState) -> None:
        """The unit state from its projections' token-averaged ``A^p x`` side by side
        (batch, P r); routes the block if this unit is its entry."""
        p = len(self.state_layers)
        state.unit_states[self.unit] = means if p == 1 else means.view(-1, p, self.r).mean(1)
        if self.is_entry:
            state.route_block(router, self.block, state.unit_states[self.unit])

    def fold_route(self, route: Route) -> None:
        """Fold the held ``route`` into this projection's per-example factor
        ``(alpha/r)(I + g S_b) A`` (batch, r, d_in), which every decode step then reads
        (``QueryableModel._hold_routes`` folds once per held route)."""
        mixer = route.mixers_t[self.slot].transpose(1, 2)  # (alpha/r)(I + g S_b)
        self._folded = mixer @ self._A_t(self.fixed or self.operands()).t()


class Operands(NamedTuple):
    """What an adapted projection's forward reads, as plain references, transposed for the GEMMs
    that read them: reading a parameter through ``nn.Module.__getattr__`` costs 1-2 us on a
    CPU, and a transpose about as much, each as much as a small op, and a small layer's
    forward did half a dozen of each. Made per forward (``operands()``), or once by the
    inference form (``QueryableModel.fold``), which also turns ``g`` into a number."""

    A_t: Tensor | None  # A^T, (d_in, r); None: made by the unit's stacked GEMM (see operands)
    B_t: Tensor  # B^T, (r, d_out)
    weight: Tensor | None  # W0 of a plain nn.Linear base (any other base is called as a module)
    weight_t: Tensor | None  # W0^T: a 2-D input's base GEMM is one addmm on it
    bias: Tensor | None
    gate: float | None  # g as a number (the inference form); None: the route's mixers carry it
    state_A_t: Tensor | None  # the unit's A^p stacked, transposed (d_in, P r), on its first state projection
