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
* The gates ``g_p = sigmoid(eta_p)`` of all adapted projections are one vector
  here, not a scalar per layer: each block reads its projections' gates as one
  slice, so gating costs one op per block, and the optimizer steps one tensor
  instead of one per projection (the parameters are the same).
* ``Q_dep`` exists only with two or more blocks, ``Q_dep,q`` and ``Q_dep,k`` with
  three or more: with fewer, no route reads them.
* ``Q_ctx`` exists only when ``lambda_ctx != 0`` and ``R_ctx`` only when
  ``tau_lang != 0``: the plain adapter (both 0) never reads them, so it does not
  carry them. (Table 6 counts the same parameters for both variants; we count what
  each variant trains, ``2 d_e d_k`` apart.)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlsearch.adapters.queryable.config import QueryableConfig

RMS_EPS = 1e-6


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = RMS_EPS) -> Tensor:
    """``x / RMS_eps(x)`` over the last dimension, times ``weight`` if given (the router's
    norms have no learnable weight; ``weight`` carries a constant scale).

    ``F.rms_norm`` is one fused kernel on CUDA. On a CPU torch computes it as the same few
    ops plus dtype round trips and dispatch layers that cost as much as the ops at a route's
    sizes (12 against 9 us on 64 x 64), so float32 on a CPU is spelled out here, with as
    little Python as can be: the same to the bit. Other dtypes keep torch's (which computes
    bf16 in float32). With the depth attention's ``bmm``s, 3-5 % of a deep-MLP forward
    (four routes, eight norms; old and new router alternated in one process).
    """
    if x.is_cpu and x.dtype is torch.float32:
        y = x * (x * x).mean(-1, keepdim=True).add_(eps).rsqrt_()
        return y if weight is None else y * weight
    return F.rms_norm(x, x.shape[-1:], weight, eps)


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
    operator_t: Tensor  # S_b^T, contiguous: what the fixed-gate forward multiplies by
    #: makes the stacked mixers (see ``mixer_stack``) at their first read
    make_mixers: Callable[[], Tensor] = field(repr=False)
    _mixer_stack: Tensor | None = field(default=None, repr=False)
    _mixers_t: tuple[Tensor, ...] = field(default=(), repr=False)

    @property
    def mixer_stack(self) -> Tensor:
        """``(alpha/r)(I + g_p S_b)^T`` (projections, batch, r, r) for the block's projections, in
        forward order: made once per block at the first read, so each projection's scaled
        routed update ``(alpha/r) s (I + g_p S_b)^T`` is one ``bmm`` (whose backward is one op
        shorter than ``s + s (g_p S_b)^T``'s). The inference form (gates fixed) never reads them.
        In bf16 the diagonal ``(alpha/r)(1 + g S_ii)`` rounds to bf16's spacing near
        ``alpha/r``, an error of the size of the rounding of the result ``t`` itself."""
        if self._mixer_stack is None:
            self._mixer_stack = self.make_mixers()
            self._mixers_t = self._mixer_stack.unbind(0)
        return self._mixer_stack

    @property
    def mixers_t(self) -> tuple[Tensor, ...]:
        """``mixer_stack`` as one (batch, r, r) view per projection."""
        if self._mixer_stack is None:
            self.mixer_stack  # noqa: B018 (makes them)
        return self._mixers_t


@dataclass
class RouteConstants:
    """What every block's route of one forward reads, made once per forward
    (``AtomRouter.constants``): the router's op count per block is what its cost is on
    a small backbone, so nothing that is the same for every block is made per block.
    The maps' weights are here as plain references for the same reason: reading a
    parameter through ``nn.Module.__getattr__`` costs 1-2 us, as much as a small op."""

    keys: Tensor  # RMSNorm(k_m), (M, d_k): the instruction prior reads these
    logit_keys: Tensor  # RMSNorm(k_m)^T / (sqrt(d_k) T_attn), (d_k, M): logits in one matmul
    atoms_t: Tensor  # C_m^T flattened, (M, r*r): a route mixes S_b^T directly
    gates: Tensor  # g_p = sigmoid(eta_p) of every projection, (P, 1)
    #: ``gates`` split by block, (P_b, 1) each: one split, whose backward is one cat, where a
    #: slice per block was a zero-filled copy per block and an add per block
    block_gates: tuple[Tensor, ...]
    depth_scale: Tensor  # 1 / (sqrt(d_k) T_dep) as RMSNorm weights (d_k,): the depth query's scale
    priors: tuple[Tensor, ...]  # w_{l_b} of each block, (d_k,)
    query_cur: Tensor  # Q_cur, (d_k, r)
    query_dep: Tensor | None  # Q_dep, (d_k, r)
    depth_query: Tensor | None  # Q_dep,q, (d_k, d_k)
    depth_key: Tensor | None  # Q_dep,k, (d_k, r)
    eye_flat: Tensor | None = None  # (alpha/r) I_r repeated per example, (1, batch*r*r): made at the first route


class AtomRouter(nn.Module):
    """Atoms ``C_m`` with keys ``k_m``, the maps that turn a block's state into a route,
    and the gate logits ``eta_p`` of the adapted projections.

    ``block_sizes`` counts the adapted projections of each block, in forward order
    (empty: a router with no projections to gate, as the theory tests use).
    """

    def __init__(self, config: QueryableConfig, block_sizes: Sequence[int] = ()):
        super().__init__()
        c = config
        self.config = c
        # Atoms ~ N(0, 1/r): ||C_m|| = O(1), so g*S_b starts comparable to the identity
        # path without dominating it; B = 0 keeps the adapted model equal to the base.
        self.atoms = nn.Parameter(torch.randn(c.num_atoms, c.r, c.r) / math.sqrt(c.r))
        # k_m; not "keys": parametrize (the precision policy) keeps its tensors in a ModuleDict
        self.atom_keys = nn.Parameter(torch.randn(c.num_atoms, c.d_k))
        self.block_prior = nn.Parameter(torch.randn(c.num_blocks, c.d_k))  # w_{l_b}
        self.query_cur = nn.Linear(c.r, c.d_k, bias=False)  # Q_cur
        # Only what some route reads (no dead parameters): the depth summary needs a completed
        # block (B >= 2), and its attention two of them (B >= 3; see depth_summary).
        self.query_dep = nn.Linear(c.r, c.d_k, bias=False) if c.num_blocks >= 2 else None  # Q_dep
        self.depth_query = nn.Linear(c.d_k, c.d_k, bias=False) if c.num_blocks >= 3 else None  # Q_dep,q
        self.depth_key = nn.Linear(c.r, c.d_k, bias=False) if c.num_blocks >= 3 else None  # Q_dep,k
        self.query_ctx = nn.Linear(c.instruction_dim, c.d_k, bias=False) if c.lambda_ctx else None  # Q_ctx
        self.prior_ctx = nn.Linear(c.instruction_dim, c.d_k, bias=False) if c.tau_lang else None  # R_ctx
        self.gate_logits = nn.Parameter(torch.full((sum(block_sizes),), float(c.init_gate)))  # eta_p
        self.block_sizes = tuple(block_sizes)  # each block's gates: one split (constants)

    def normed_keys(self) -> Tensor:
        """``RMSNorm(k_m)`` (M x d_k)."""
        return rms_norm(self.atom_keys)

    def constants(self) -> RouteConstants:
        """What every route of a forward reads (``RouteConstants``), made once for the forward."""
        c = self.config
        keys = self.normed_keys()
        atoms = self.atoms
        weight = lambda linear: None if linear is None else linear.weight  # noqa: E731
        gates = self.gate_logits.sigmoid().unsqueeze(1)
        return RouteConstants(
            keys=keys,
            logit_keys=keys.T / (math.sqrt(c.d_k) * c.T_attn),
            atoms_t=atoms.transpose(1, 2).reshape(c.num_atoms, c.r * c.r),
            gates=gates,
            block_gates=gates.split(self.block_sizes) if self.block_sizes else (),
            depth_scale=keys.new_full((c.d_k,), 1.0 / (math.sqrt(c.d_k) * c.T_dep)),
            priors=self.block_prior.unbind(0),
            query_cur=self.query_cur.weight,
            query_dep=weight(self.query_dep),
            depth_query=weight(self.depth_query),
            depth_key=weight(self.depth_key),
        )

    def language_log_prior(self, instruction: Tensor, keys: Tensor | None = None) -> Tensor:
        """``log p(c)`` over atoms, ``p_m ∝ exp(<RMSNorm(R_ctx e), RMSNorm(k_m)> / (sqrt(d_k) T_lang))``."""
        c = self.config
        keys = self.normed_keys() if keys is None else keys
        rho = rms_norm(self.prior_ctx(instruction)) @ keys.T
        return torch.log_softmax(rho / (math.sqrt(c.d_k) * c.T_lang), dim=-1)

    def depth_summary(self, pre_query: Tensor, block_means: Tensor,
                      constants: RouteConstants | None = None) -> tuple[Tensor, Tensor]:
        """``u = sum_i beta_i sbar_i`` over completed blocks (eq. 27-32).

        ``pre_query`` is ``q0`` (batch x d_k); ``block_means`` stacks ``sbar_i``
        (batch x i x r); ``constants`` as ``constants()`` gives (None: made here).
        Returns ``(u, beta)``.

        With one completed block the softmax is exactly 1 and its gradient exactly
        0, so the attention is skipped: ``u = sbar_0`` (``Q_dep,q`` and ``Q_dep,k``
        then get no gradient from this block rather than a zero one).
        """
        if block_means.shape[1] == 1:
            return block_means[:, 0], block_means.new_ones(block_means.shape[0], 1)
        const = self.constants() if constants is None else constants
        # the logits' 1/(sqrt(d_k) T_dep) rides on the query's RMSNorm as its weight
        q = rms_norm(F.linear(pre_query, const.depth_query), const.depth_scale)
        keys = rms_norm(F.linear(block_means, const.depth_key))  # (b, i, d_k)
        # one bmm each, where a broadcast product and a sum were two ops (a sum over the
        # middle dimension is the slower op on a CPU)
        beta = torch.softmax(torch.bmm(keys, q.unsqueeze(2)).squeeze(2), dim=-1)
        return torch.bmm(beta.unsqueeze(1), block_means).squeeze(1), beta

    def logits(self, query: Tensor, log_prior: Tensor | None, constants: RouteConstants | None = None) -> Tensor:
        """Fused logits ``zeta + tau_lang log p`` (eq. 3 / 36); ``constants`` as ``constants()``
        gives (None: made here), whose ``logit_keys`` carry the ``1/(sqrt(d_k) T_attn)``."""
        c = self.config
        const = self.constants() if constants is None else constants
        zeta = rms_norm(query) @ const.logit_keys
        if log_prior is not None and c.tau_lang != 0:
            zeta = torch.add(zeta, log_prior, alpha=c.tau_lang)
        return zeta

    def context_query(self, instruction: Tensor | None) -> Tensor | None:
        """``lambda_ctx Q_ctx e(c)`` (batch x d_k), the instruction's term of every block's query
        (eq. 3): the same for every block, so made once per forward. None without one."""
        if instruction is None or self.config.lambda_ctx == 0:
            return None
        return self.config.lambda_ctx * self.query_ctx(instruction)

    def route(
        self,
        block: int,
        entry_state: Tensor,
        block_means: Tensor | None,
        context: Tensor | None,
        log_prior: Tensor | None,
        constants: RouteConstants | None = None,
    ) -> Route:
        """Route block ``block`` from its entry state (batch x r).

        ``block_means`` stacks the completed blocks' mean states (batch x block x r),
        None for the first block; ``context`` is ``context_query(e(c))`` (batch x d_k) and
        ``log_prior`` is ``language_log_prior(e(c))`` (batch x M), both made once per forward
        (None: no instruction); ``constants`` is ``constants()``, made once per forward (None:
        made here).
        """
        c = self.config
        const = self.constants() if constants is None else constants
        # F.linear with the bias slot doing the addition: one op where module call + add were two
        query = F.linear(entry_state, const.query_cur, const.priors[block])
        if context is not None:
            query = query + context
        beta = None
        if block_means is not None:
            summary, beta = self.depth_summary(query, block_means, const)
            query = F.linear(summary, const.query_dep, query)
        alpha, active = top_k_softmax(self.logits(query, log_prior, const), c.top_k)
        # S_b^T = sum_m alpha_m C_m^T: one (batch x M) @ (M x r*r) GEMM over the dense weights
        # (a gather of the k active atoms and a batch of tiny bmms costs more on a CPU)
        operator_t = (alpha @ const.atoms_t).view(-1, c.r, c.r)
        operator = operator_t.transpose(1, 2)
        return Route(alpha, active, beta, operator, operator_t,
                     functools.partial(self.mixers_t, block, operator, const))

    def mixers_t(self, block: int, operator: Tensor, constants: RouteConstants | None = None) -> Tensor:
        """``(alpha/r)(I + g_p S_b)^T`` stacked for the projections ``p`` of ``block``
        (P x batch x r x r): one outer product of the gates with the flattened ``S_b^T`` added
        to the scaled identity (one ``addcmul`` on 2-D operands: faster on CPU than a rank-1
        ``addmm``, and than a broadcast over four dimensions). The LoRA scale ``alpha/r``
        rides on the mixer, so the adapted layers never multiply by it (a launch per layer,
        forward and backward, where the mixer takes it once per block)."""
        c = self.config
        const = self.constants() if constants is None else constants
        eye = const.eye_flat
        if eye is None or eye.shape[1] != operator.shape[0] * c.r * c.r or eye.dtype != operator.dtype:
            eye = torch.eye(c.r, device=operator.device, dtype=operator.dtype).mul_(c.scaling)
            eye = eye.reshape(1, -1).repeat(1, operator.shape[0])
            const.eye_flat = eye
        flat_t = operator.transpose(1, 2).reshape(1, -1)  # (1, batch r r); a view of S_b^T
        gates = const.block_gates[block].to(flat_t.dtype)
        mixers = torch.addcmul(eye, gates, flat_t, value=c.scaling)
        return mixers.view(-1, *operator.shape)
