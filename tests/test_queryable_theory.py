"""The paper's statements about the router and the routed update (Prop. D.7-D.9, Thm 5.1, 5.3)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from qlsearch.adapters.queryable import (
    AtomRouter,
    QueryableConfig,
    QueryableLinear,
    QueryableModel,
    rms_norm,
    top_k_softmax,
)
from tests.conftest import VOCAB, randomize_adapter, tiny_mlp, tiny_qwen2

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def queryable(base, **knobs) -> QueryableModel:
    knobs = {"r": 4, "num_atoms": 8, "top_k": 3, "num_blocks": 2, "d_k": 16, "seed": 0, **knobs}
    return QueryableModel(base, QueryableConfig(**knobs))


def ids(batch=3, tokens=9, seed=1):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["qwen2", "mlp"])
def test_gate_zero_is_lora(kind):
    """Prop. D.7(b): g = 0 gives exactly LoRA's output with the same A and B."""
    base = tiny_qwen2() if kind == "qwen2" else tiny_mlp()
    targets = PROJECTIONS if kind == "qwen2" else ["0", "2", "4", "6", "8"]
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    # init_gate must be finite; sigmoid(-1e4) underflows to exactly 0 in float32 and float64
    model = queryable(base, target_modules=targets, init_gate=-1e4)
    randomize_adapter(model)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, QueryableLinear):
                peft_layer = lora.get_submodule("base_model.model." + name.removeprefix("base_model."))
                peft_layer.lora_A["default"].weight.copy_(module.lora_A)
                peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    x = ids() if kind == "qwen2" else torch.randn(5, 2)
    with torch.no_grad():
        ours = model(x).logits if kind == "qwen2" else model(x)
        theirs = lora(x).logits if kind == "qwen2" else lora(x)
    assert torch.equal(ours, theirs)
    assert model.routing_trace()  # routes were computed, they just have no effect


def test_no_language_channels_ignore_instruction():
    """Prop. D.7(a): tau_lang = lambda_ctx = 0 makes the output independent of the instruction."""
    model = queryable(tiny_qwen2())
    randomize_adapter(model)
    x = ids()
    with torch.no_grad():
        outputs = [model(x, instruction=torch.randn(3, 384) * 5).logits for _ in range(2)]
        plain = model(x).logits
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], plain)


def test_instruction_changes_the_route_when_channels_are_on():
    model = queryable(tiny_qwen2(), tau_lang=2.0, lambda_ctx=1.0)
    x = ids()
    with torch.no_grad():
        model(x, instruction=torch.randn(1, 384))
        a = model.routing_trace()[0]["alpha"]
        model(x, instruction=torch.randn(1, 384))
        b = model.routing_trace()[0]["alpha"]
    assert not torch.allclose(a, b)


def test_zero_instruction_is_no_instruction():
    """A zero embedding adds nothing to the query and gives a uniform prior: the plain route."""
    model = queryable(tiny_qwen2(), tau_lang=2.0, lambda_ctx=1.0)
    randomize_adapter(model)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x, instruction=torch.zeros(3, 384)).logits, model(x).logits)


def test_large_tau_routes_to_prior_argmax():
    """Prop. D.7(c): as tau_lang grows, every block routes all mass to the prior's argmax atom."""
    model = queryable(tiny_qwen2(), tau_lang=1e4, lambda_ctx=0.0)
    e = torch.randn(3, 384)
    with torch.no_grad():
        model(ids(), instruction=e)
        favourite = model.router.language_log_prior(e).argmax(-1)
        for block in model.routing_trace():
            alpha = block["alpha"]
            torch.testing.assert_close(alpha[torch.arange(3), favourite], torch.ones(3))
        S = model.state.routes[1].operator
        torch.testing.assert_close(S, model.router.atoms[favourite])


@pytest.mark.parametrize("tau", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("k", [3, 8])
def test_constant_state_logits_give_tempered_prior(tau, k):
    """Prop. D.7(d): with constant state logits the route is the tempered prior on the active set."""
    router = AtomRouter(QueryableConfig(r=4, num_atoms=8, top_k=k, d_k=16, tau_lang=tau))
    with torch.no_grad():
        log_p = router.language_log_prior(torch.randn(2, 384))
        logits = router.logits(torch.zeros(2, 16), log_p)  # RMSNorm(0) = 0: every zeta is 0
    alpha, active = top_k_softmax(logits, k)
    tempered = torch.exp(tau * log_p).gather(-1, active)
    torch.testing.assert_close(alpha.gather(-1, active), tempered / tempered.sum(-1, keepdim=True))
    if k == 8 and tau == 1.0:  # the full prior itself
        torch.testing.assert_close(alpha, log_p.exp())


def test_route_norm_bounded_by_atoms():
    """Prop. D.8: ||S_b|| <= max_m ||C_m|| (spectral norm) on random inputs and instructions."""
    model = queryable(tiny_qwen2(), num_blocks=4, tau_lang=1.0, lambda_ctx=1.0)
    with torch.no_grad():
        model.router.atoms.mul_(torch.rand(8, 1, 1) * 3)  # atoms of unequal norms
        bound = torch.linalg.matrix_norm(model.router.atoms, ord=2).max()
        for seed in range(5):
            model(ids(seed=seed), instruction=torch.randn(3, 384))
            for block in model.routing_trace():
                assert (block["operator_norm"] <= bound + 1e-5).all()


def test_depth_summary_bounded_by_block_means():
    """Prop. D.9: ||u|| <= max_i ||sbar_i||."""
    router = AtomRouter(QueryableConfig(r=4, d_k=16))
    for _ in range(20):
        means = torch.randn(5, 3, 4) * torch.rand(5, 3, 1) * 10
        u, beta = router.depth_summary(torch.randn(5, 16), means)
        torch.testing.assert_close(beta.sum(-1), torch.ones(5))
        assert (u.norm(dim=-1) <= means.norm(dim=-1).max(-1).values + 1e-5).all()


def test_depth_summary_of_one_block_is_that_block():
    """With one completed block the softmax over one logit is exactly 1: u = sbar_0."""
    router = AtomRouter(QueryableConfig(r=4, d_k=16))
    means = torch.randn(5, 1, 4)
    u, beta = router.depth_summary(torch.randn(5, 16), means)
    assert torch.equal(u, means[:, 0]) and torch.equal(beta, torch.ones(5, 1))
    logits = torch.randn(5, 1)  # whatever the attention logit, its softmax is 1
    assert torch.equal(torch.softmax(logits, dim=-1), beta)


def test_route_maximises_utility_minus_kl_to_tempered_prior():
    """Thm 5.1: on the active set, alpha = argmax_a <a, zeta> - KL(a || prior^tau), unique."""
    torch.manual_seed(3)
    zeta, log_p, tau, k = torch.randn(8, dtype=torch.float64), torch.log_softmax(
        torch.randn(8, dtype=torch.float64), -1), 1.7, 4
    alpha, active = top_k_softmax(zeta + tau * log_p, k)
    z, lp = zeta[active], log_p[active]
    tempered = torch.softmax(tau * lp, -1)

    def objective(a):
        return (a * z).sum() - (a * (a.log() - tempered.log())).sum()

    # A numerical optimiser over the simplex (softmax parametrisation) finds the same point.
    theta = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = -objective(torch.softmax(theta, -1))
        loss.backward()
        return loss

    opt.step(closure)
    best = torch.softmax(theta, -1).detach()
    torch.testing.assert_close(alpha[active], best, atol=1e-6, rtol=1e-6)
    # ... and every other point of the simplex scores lower.
    for _ in range(200):
        other = torch.distributions.Dirichlet(torch.ones(k, dtype=torch.float64)).sample()
        assert objective(other) < objective(alpha[active])
    assert (alpha.sum() - 1).abs() < 1e-12 and (alpha > 0).sum() == k


def test_top_k_equal_num_atoms_is_dense_softmax():
    logits = torch.randn(4, 8)
    alpha, _ = top_k_softmax(logits, 8)
    torch.testing.assert_close(alpha, torch.softmax(logits, -1))
    model = queryable(tiny_qwen2(), top_k=8)
    with torch.no_grad():
        model(ids())
        assert (model.routing_trace()[0]["alpha"] > 0).all()


def test_block_gradient_factorises():
    """Thm 5.3: dL/dS_b = sum_{l in block} g_l r_l s_l^T, r_l = dL/dt_l = (alpha/r) B_l^T dL/dy_l."""
    model = queryable(tiny_qwen2(), num_blocks=2)
    randomize_adapter(model)
    layers = [m for m in model.modules() if isinstance(m, QueryableLinear)]
    inputs, output_grads = {}, {}

    def keep(layer):
        def hook(module, args, output):
            inputs[layer] = args[0].detach()
            output.register_hook(lambda g: output_grads.__setitem__(layer, g.detach()))
        return hook

    for layer in layers:
        layer.register_forward_hook(keep(layer))
    model.train()
    out = model(ids())
    for route in model.state.routes.values():
        route.operator.retain_grad()
    out.logits.pow(2).mean().backward()
    for block, route in model.state.routes.items():
        expected = torch.zeros_like(route.operator)
        for layer in (m for m in layers if m.block == block):
            s = inputs[layer] @ layer.lora_A.T  # (batch, tokens, r)
            r = layer.scaling * output_grads[layer] @ layer.lora_B  # (batch, tokens, r)
            expected += layer.gate.detach() * torch.einsum("bti,btj->bij", r, s)
        torch.testing.assert_close(route.operator.grad, expected, atol=1e-6, rtol=1e-4)


def test_route_matches_a_per_example_loop_of_the_papers_equations():
    """One block's route (eq. 3, 26-32, Alg. 2) written as a loop over examples and atoms with
    plain vector ops, against the batched route: the operator, weights, depth weights and mixers."""
    torch.manual_seed(0)
    config = QueryableConfig(r=4, alpha=6.0, num_atoms=8, top_k=3, num_blocks=3, d_k=16, T_attn=0.7, T_dep=1.3)
    router = AtomRouter(config, block_sizes=[2, 1, 2])
    with torch.no_grad():
        router.gate_logits.normal_()
        entry, means = torch.randn(5, 4), torch.randn(5, 2, 4)  # block 2: two completed blocks
        route = router.route(2, entry, means, None, None)

        def rms(v):
            return v / torch.sqrt((v * v).mean() + 1e-6)

        for n in range(5):
            q0 = router.query_cur.weight @ entry[n] + router.block_prior[2]
            qd = rms(router.depth_query.weight @ q0)
            scores = torch.stack([rms(router.depth_key.weight @ means[n, i]) @ qd for i in range(2)])
            beta = torch.softmax(scores / (16 ** 0.5 * 1.3), dim=0)
            q = q0 + router.query_dep.weight @ (beta[0] * means[n, 0] + beta[1] * means[n, 1])
            zeta = torch.stack([rms(q) @ rms(router.atom_keys[m]) for m in range(8)]) / (16 ** 0.5 * 0.7)
            top = zeta.topk(3).indices
            alpha = torch.zeros(8)
            alpha[top] = torch.softmax(zeta[top], dim=0)
            S = sum(alpha[m] * router.atoms[m] for m in range(8))
            torch.testing.assert_close(route.beta[n], beta)
            torch.testing.assert_close(route.alpha[n], alpha)
            torch.testing.assert_close(route.operator[n], S)
            for slot, p in enumerate((3, 4)):  # block 2's projections are the 4th and 5th
                g = torch.sigmoid(router.gate_logits[p])
                # the mixers carry the LoRA scale alpha/r = 6/4
                torch.testing.assert_close(route.mixers_t[slot][n], 1.5 * (torch.eye(4) + g * S).T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_rms_norm_is_torchs(dtype):
    """The router's CPU spelling of RMSNorm (spelled out for speed) against ``F.rms_norm``: the
    same values and dtype, with and without a weight, and the same gradient up to rounding."""
    torch.manual_seed(0)
    x = (3 * torch.randn(5, 3, 16)).to(dtype).requires_grad_()
    weight = torch.full((16,), 0.3, dtype=dtype)
    for w in (None, weight):
        ours, theirs = rms_norm(x, w), F.rms_norm(x, (16,), w, eps=1e-6)
        assert ours.dtype == dtype
        assert torch.equal(ours, theirs)
        grad = torch.randn_like(ours)
        torch.testing.assert_close(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(theirs, x, grad)[0])
    assert torch.equal(rms_norm(torch.zeros(2, 4)), torch.zeros(2, 4))


class _Attention(nn.Module):
    """Q, K and V of one input, as an attention reads them; with ``k_scale``, K reads another
    tensor (a model whose state projections do not share their input)."""

    def __init__(self, width: int, k_scale: float | None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.k_scale = k_scale

    def forward(self, x):
        k_in = x if self.k_scale is None else self.k_scale * x
        return x + self.q_proj(x) + self.k_proj(k_in) + self.v_proj(x)


class _Layers(nn.Module):
    def __init__(self, k_scale: float | None = None):
        super().__init__()
        self.layers = nn.ModuleList([_Attention(6, k_scale) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize(("k_scale", "dropout"), [(None, 0.0), (3.0, 0.0), (None, 0.5)])
def test_unit_state_and_updates_follow_eq_15_16_as_a_loop(k_scale, dropout):
    """Eq. 15-16 and the routed update as loops over examples, tokens and projections: the unit
    state is the mean over Q, K, V of ``A^p`` applied to the token-averaged unit input ``x``
    (eq. 15 has one ``x`` per layer; the first state projection's input, which is all the route
    can have seen when that projection needs it), and each projection gives
    ``W0 x + b + (alpha/r) B (s + g S_b s)``, ``s = A x``, on its own input. Q, K, V of one
    input share a GEMM; K of another input (k_scale) makes its own; under training-time
    dropout the state sees the input without it."""
    model = queryable(_Layers(k_scale), alpha=6.0, num_blocks=2, dropout=dropout)
    randomize_adapter(model)
    with torch.no_grad():
        model.router.gate_logits.normal_()
    model.train(dropout > 0)
    seen = {}
    layers = [m for m in model.modules() if isinstance(m, QueryableLinear)]
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod, (args[0], out)))
             for layer in layers]
    x = torch.randn(3, 5, 6)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for unit in range(2):
        projections = layers[3 * unit:3 * unit + 3]
        unit_input = seen[projections[0]][0]
        expected = torch.stack([sum(p.lora_A @ unit_input[n].mean(0) for p in projections) / 3 for n in range(3)])
        torch.testing.assert_close(model.state.unit_states[unit], expected)
    if dropout:
        return  # the outputs carry dropout's random masks
    for layer in layers:
        x_in, out = seen[layer]
        S = model.state.routes[layer.block].operator
        g = torch.sigmoid(model.router.gate_logits[layer.index])
        base = layer.base_layer
        for n in range(3):
            for t in range(5):
                s = layer.lora_A @ x_in[n, t]
                y = base.weight @ x_in[n, t] + base.bias + 1.5 * layer.lora_B @ (s + g * S[n] @ s)
                torch.testing.assert_close(out[n, t], y)
