"""The shared atom memory and the blockwise router (paper §3, Algorithm 2).

Everything here is per example: a batch of ``b`` examples gives ``b`` routes,
and no operation mixes rows, so an example's route never depends on its
batch-mates. Top-k is a fixed-size ``topk`` + ``scatter`` (no data-dependent
shapes, no host synchronisation).

Decisions where the paper is ambiguous (DESIGN.md decides):

* Logits are divided by ``sqrt(d_k) * T`` (§3 and the proofs), not
  ``sqrt(d_k * T)`` as Algorithm 1 prints.
* RMSNorm has no learnable weight: ``x / sqrt(mean(x^2) + eps)`` (Assumption D.3).
* The layer prior ``w`` exists once per block: the paper lists ``w_l`` for every
  layer but only reads ``w`` of each block's entry layer (eq. 26), so the other
  ``w_l`` would be parameters that never receive a gradient.
* ``Q_ctx`` and ``R_ctx`` exist in the plain adapter too (Table 6 counts the same
  parameters for both variants); with ``tau_lang = lambda_ctx = 0`` they are unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlsearch.adapters.queryable.config import QueryableConfig

RMS_EPS = 1e-6


def rms_norm(x: Tensor, eps: float = RMS_EPS) -> Tensor:
    """``x / RMS_eps(x)`` over the last dimension (no learnable weight)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def top_k_softmax(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Softmax over the ``k`` largest logits, zero elsewhere.

    Returns the dense weights (same shape as ``logits``) and the active indices
    (``... x k``). With ``k`` equal to the number of logits this is the dense softmax.
    """
    values, active = logits.topk(k, dim=-1)
    weights = torch.zeros_like(logits).scatter(-1, active, torch.softmax(values, dim=-1))
    return weights, active


@dataclass
class Route:
    """One block's route for a batch: what the routing trace reports."""

    alpha: Tensor  # (batch, M) routing weights, zero off the active set
    active: Tensor  # (batch, k) active atom ids
    beta: Tensor | None  # (batch, blocks before this one) depth-summary weights; None for block 0
    operator: Tensor  # (batch, r, r) S_b
    operator_t: Tensor  # S_b^T, made once per block for the projections' row-vector products


class AtomRouter(nn.Module):
    """Atoms ``C_m`` with keys ``k_m``, and the maps that turn a block's state into a route."""

    def __init__(self, config: QueryableConfig):
        super().__init__()
        c = config
        self.config = c
        # Atoms ~ N(0, 1/r): ||C_m|| = O(1), so g*S_b starts comparable to the identity
        # path without dominating it; B = 0 keeps the adapted model equal to the base.
        self.atoms = nn.Parameter(torch.randn(c.num_atoms, c.r, c.r) / math.sqrt(c.r))
        self.keys = nn.Parameter(torch.randn(c.num_atoms, c.d_k))
        self.block_prior = nn.Parameter(torch.randn(c.num_blocks, c.d_k))  # w_{l_b}
        self.query_cur = nn.Linear(c.r, c.d_k, bias=False)  # Q_cur
        self.query_dep = nn.Linear(c.r, c.d_k, bias=False)  # Q_dep
        self.depth_query = nn.Linear(c.d_k, c.d_k, bias=False)  # Q_dep,q
        self.depth_key = nn.Linear(c.r, c.d_k, bias=False)  # Q_dep,k
        self.query_ctx = nn.Linear(c.instruction_dim, c.d_k, bias=False)  # Q_ctx
        self.prior_ctx = nn.Linear(c.instruction_dim, c.d_k, bias=False)  # R_ctx

    def language_log_prior(self, instruction: Tensor) -> Tensor:
        """``log p(c)`` over atoms, ``p_m ∝ exp(<RMSNorm(R_ctx e), RMSNorm(k_m)> / (sqrt(d_k) T_lang))``."""
        c = self.config
        rho = rms_norm(self.prior_ctx(instruction)) @ rms_norm(self.keys).T
        return torch.log_softmax(rho / (math.sqrt(c.d_k) * c.T_lang), dim=-1)

    def depth_summary(self, pre_query: Tensor, block_means: Tensor) -> tuple[Tensor, Tensor]:
        """``u = sum_i beta_i sbar_i`` over completed blocks (eq. 27-32).

        ``pre_query`` is ``q0`` (batch x d_k); ``block_means`` stacks ``sbar_i``
        (batch x i x r). Returns ``(u, beta)``.
        """
        c = self.config
        q = rms_norm(self.depth_query(pre_query)).unsqueeze(-1)  # (b, d_k, 1)
        keys = rms_norm(self.depth_key(block_means))  # (b, i, d_k)
        beta = torch.softmax((keys @ q).squeeze(-1) / (math.sqrt(c.d_k) * c.T_dep), dim=-1)
        return (beta.unsqueeze(1) @ block_means).squeeze(1), beta

    def logits(self, query: Tensor, log_prior: Tensor | None) -> Tensor:
        """Fused logits ``zeta + tau_lang log p`` (eq. 3 / 36)."""
        c = self.config
        zeta = rms_norm(query) @ rms_norm(self.keys).T / (math.sqrt(c.d_k) * c.T_attn)
        if log_prior is not None and c.tau_lang != 0:
            zeta = zeta + c.tau_lang * log_prior
        return zeta

    def route(
        self,
        block: int,
        entry_state: Tensor,
        block_means: Tensor | None,
        instruction: Tensor | None,
        log_prior: Tensor | None,
    ) -> Route:
        """Route block ``block`` from its entry state (batch x r).

        ``block_means`` stacks the completed blocks' mean states (batch x block x r),
        None for the first block; ``instruction`` is ``e(c)`` (batch x d_e) or None.
        """
        c = self.config
        query = self.block_prior[block] + self.query_cur(entry_state)
        if instruction is not None and c.lambda_ctx != 0:
            query = query + c.lambda_ctx * self.query_ctx(instruction)
        beta = None
        if block_means is not None:
            summary, beta = self.depth_summary(query, block_means)
            query = query + self.query_dep(summary)
        alpha, active = top_k_softmax(self.logits(query, log_prior), c.top_k)
        operator = (alpha @ self.atoms.flatten(1)).view(-1, c.r, c.r)
        return Route(alpha, active, beta, operator, operator.transpose(1, 2))
