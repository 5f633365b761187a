"""The MoE-LoRA linear: ``y = W0 x + (alpha/r) sum_{i in topk} G(x)_i B_i A_i x``, routed per token.

All ``E`` experts' rank-``r`` codes ``s_i = A_i x`` are computed in one matmul
(``E r`` columns) and mixed with the gate weights, zero outside the top-k, in a
second; this equals sparse dispatch and costs about ``E`` LoRAs' bottlenecks.
Routing looks at one token at a time, so outputs do not depend on batch-mates;
only the auxiliary losses (training only) use batch-level statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlsearch.adapters.moelora.config import MoELoRAConfig


def load_balance_loss(probs: Tensor, top: Tensor) -> Tensor:
    """Switch-style ``L_balance = E sum_i f_i P_i`` over the ``N`` tokens of a forward.

    ``f_i``: share of the ``N k`` (token, slot) assignments that go to expert ``i``
    (for ``k = 1`` Switch's fraction of tokens); ``P_i``: mean gate probability of
    expert ``i``. Equals 1 under uniform routing; gradients reach the gate through ``P``.
    """
    num_experts = probs.shape[-1]
    f = F.one_hot(top, num_experts).sum(-2).float().mean(0) / top.shape[-1]
    return num_experts * (f * probs.float().mean(0)).sum()


def expert_contrastive_loss(codes: Tensor, experts: Tensor, temperature: float) -> Tensor:
    """InfoNCE over the routed expert outputs, positives = same expert (supervised-contrastive form).

    ``codes``: ``M x r`` rank-space outputs ``A_e x_n`` of the ``M`` selected
    (token ``n``, expert ``e``) pairs; ``experts``: their expert ids ``e``. With
    ``z = normalize(codes)`` and ``sim = z z^T / tau``, each anchor ``j`` with at
    least one positive contributes
    ``-1/|P(j)| sum_{p in P(j)} log(exp(sim_jp) / sum_{a != j} exp(sim_ja))``,
    ``P(j)`` = the other pairs routed to the same expert; the loss is the mean over
    such anchors (0 when there is none). The other experts chosen for the same
    token are among the negatives.
    """
    z = F.normalize(codes.float(), dim=-1)
    sim = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(eye, float("-inf"))
    positive = (experts[:, None] == experts[None, :]) & ~eye
    anchors = positive.any(1)
    if not anchors.any():
        return sim.new_zeros(())
    log_prob = (sim - sim.logsumexp(1, keepdim=True)).masked_fill(~positive, 0.0)
    per_anchor = -log_prob.sum(1)[anchors] / positive.sum(1)[anchors]
    return per_anchor.mean()


class MoELoRALinear(nn.Module):
    """One adapted projection: frozen ``base_layer``, experts ``lora_A`` (``E x r x d_in``),
    ``lora_B`` (``E x d_out x r``, zero at init) and the gate ``W_g`` (``gate.weight``, ``E x d_in``)."""

    def __init__(self, base_layer: nn.Linear, config: MoELoRAConfig):
        super().__init__()
        self.base_layer = base_layer
        c = config
        d_in, d_out = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(c.num_experts, c.r, d_in, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(c.num_experts, d_out, c.r, device=w.device, dtype=w.dtype))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT LoRA's initialisation, per expert
        self.gate = nn.Linear(d_in, c.num_experts, bias=False, device=w.device, dtype=w.dtype)
        self.dropout = nn.Dropout(c.dropout)
        self.config = c
        #: this layer's share of the auxiliary term: 1 / (number of adapted layers), set by
        #: ``MoELoRAModel``, so the model's term is the per-layer mean and does not grow with depth
        self.aux_share = 1.0
        self._aux: Tensor | None = None
        self.last_top: Tensor | None = None  # the experts chosen in the last forward (for routing traces)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(probs, top, weights)``: ``G = softmax(W_g x)``, its top-k ids, and the
        renormalised top-k weights scattered into an ``E``-wide tensor (zero elsewhere)."""
        probs = self.gate(x).float().softmax(-1)
        top_p, top = probs.topk(self.config.top_k, dim=-1)
        weights = torch.zeros_like(probs).scatter(-1, top, top_p / top_p.sum(-1, keepdim=True))
        return probs, top, weights.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        probs, top, weights = self.route(x)
        s = F.linear(self.dropout(x) if c.dropout else x, self.lora_A.flatten(0, 1))  # (..., E r)
        s = s.unflatten(-1, (c.num_experts, c.r))
        mixed = (s * weights.unsqueeze(-1)).flatten(-2)
        B = self.lora_B.permute(1, 0, 2).flatten(1)  # (d_out, E r), matching mixed's layout
        out = torch.add(self.base_layer(x), F.linear(mixed, B), alpha=c.scaling)
        self.last_top = top.detach()
        self._aux = self._auxiliary(probs, top, s) if self.training else None
        return out

    def _auxiliary(self, probs: Tensor, top: Tensor, s: Tensor) -> Tensor | None:
        c = self.config
        if not (c.load_balance_weight or c.contrastive_weight):
            return None
        E = c.num_experts
        probs, top, s = probs.reshape(-1, E), top.reshape(-1, c.top_k), s.reshape(-1, E, c.r)
        total = c.load_balance_weight * load_balance_loss(probs, top) if c.load_balance_weight else 0.0
        if c.contrastive_weight:
            # an evenly strided subset of tokens keeps the M x M similarity small
            step = -(-len(s) // c.contrastive_tokens)
            s_sub, top_sub = s[::step], top[::step]
            codes = s_sub.gather(1, top_sub.unsqueeze(-1).expand(-1, -1, c.r))  # (n, k, r)
            cl = expert_contrastive_loss(codes.flatten(0, 1), top_sub.flatten(), c.contrastive_temperature)
            total = total + c.contrastive_weight * cl
        return self.aux_share * total

    def auxiliary_loss(self) -> Tensor | None:
        """This layer's share of the weighted load-balance + contrastive term of the last
        training forward (None in eval)."""
        return self._aux
