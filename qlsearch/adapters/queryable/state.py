"""What one forward pass shares between the adapted layers: mask, the instruction's terms, states, routes.

Writes are keyed by unit and block, never appended, so a forward recomputed by
gradient checkpointing rewrites the same entries with the same values instead of
adding to them: the recomputed layers see the route of the original forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from qlsearch.adapters.queryable.router import AtomRouter, Route, RouteConstants


@dataclass
class RoutingState:
    blocks: list[list[int]] = field(default_factory=list)  # unit ids of each block, in order
    #: (batch, tokens) weights of the mask-aware token average (rows sum to 1),
    #: or None: average uniformly over tokens (or take 2-D inputs as they are).
    token_weights: Tensor | None = None
    log_prior: Tensor | None = None  # log p(c), (batch, M); the same for every block
    context: Tensor | None = None  # lambda_ctx Q_ctx e(c), (batch, d_k); the same for every block
    constants: RouteConstants | None = None  # what every block's route reads, made once per forward
    unit_states: dict[int, Tensor] = field(default_factory=dict)  # unit -> (batch, r)
    #: unit -> (x, each state projection's s = A^p x): made by the unit's first state projection
    #: in one GEMM, read by the others (QueryableLinear._down)
    unit_downs: dict[int, tuple[Tensor, tuple[Tensor, ...]]] = field(default_factory=dict)
    block_means: dict[int, Tensor] = field(default_factory=dict)  # block -> sbar_b
    routes: dict[int, Route] = field(default_factory=dict)
    #: True while the routes are held fixed (decoding after prefill).
    hold: bool = False
    #: Fold (alpha/r)(I + g S_b) A into one factor while routes are held (exact up to rounding).
    fold: bool = True
    #: The route constants made once for every forward while the weights are fixed
    #: (``QueryableModel.fold``, the inference form); None: made per forward.
    fixed_constants: RouteConstants | None = None

    def begin(self, token_weights: Tensor | None, instruction: Tensor | None, router: AtomRouter) -> None:
        """Start a new forward pass that computes its own routes (and the constants and the
        instruction's prior and query term that all of them read)."""
        self.token_weights = token_weights
        self.constants = self.fixed_constants or router.constants()
        self.log_prior = None
        if instruction is not None and router.config.tau_lang != 0:
            self.log_prior = router.language_log_prior(instruction, self.constants.keys)
        self.context = router.context_query(instruction)
        # fresh dicts, not clear(): a compiled forward then never guards on the last one's keys
        self.unit_states, self.unit_downs, self.block_means, self.routes = {}, {}, {}, {}
        self.hold = False

    def route_block(self, router: AtomRouter, block: int, entry_state: Tensor) -> None:
        """Route ``block`` from its entry state and the completed blocks' mean states.

        The just-completed block's mean is (re)computed on every call and the earlier
        ones are read back, so a recomputed forward runs exactly the same ops.
        """
        means = None
        if block > 0:
            last = self.blocks[block - 1]
            self.block_means[block - 1] = torch.stack([self.unit_states[u] for u in last]).mean(0)
            means = [self.block_means[i] for i in range(block)]
            means = means[0].unsqueeze(1) if block == 1 else torch.stack(means, dim=1)  # a view, not a copy, of one
        self.routes[block] = router.route(block, entry_state, means, self.context, self.log_prior,
                                          self.constants)

    def token_mean(self, x: Tensor) -> Tensor:
        """Mask-aware average of ``x`` (batch x tokens x d) over the tokens the route may see."""
        if x.dim() == 2:
            return x
        if self.token_weights is None:
            return x.mean(dim=-2)
        w = self.token_weights
        if w.shape != x.shape[:2]:
            raise ValueError(
                f"route_mask has shape {tuple(w.shape)} but the adapted layer sees "
                f"(batch, tokens) = {tuple(x.shape[:2])}; pass one mask entry per input token"
            )
        if w.dtype != x.dtype:  # cast once per forward, not once per unit
            w = self.token_weights = w.to(x.dtype)
        return torch.bmm(w.unsqueeze(1), x).squeeze(1)


def token_weights_from_mask(mask: Tensor | None) -> Tensor | None:
    """Row-normalised weights from a 0/1 mask (batch x tokens); all-zero rows stay zero."""
    if mask is None:
        return None
    mask = mask.float()
    return mask / mask.sum(-1, keepdim=True).clamp(min=1.0)
