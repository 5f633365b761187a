"""MoE-LoRA (Luo et al. 2024): top-k routed LoRA experts with load-balance and contrastive losses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlsearch.adapters import auxiliary_loss
from qlsearch.adapters.moelora import (
    MoELoRAConfig,
    MoELoRALinear,
    MoELoRAModel,
    attach,
    expert_contrastive_loss,
    load_balance_loss,
    parameter_count,
)
from tests.conftest import BUILDERS, VOCAB, tiny_mlp
from tests.test_adapter_contract import output, perturb

KNOBS = {"r": 4, "num_experts": 4, "top_k": 2, "load_balance_weight": 0.01, "contrastive_weight": 0.01}
MLP = {"target_modules": ["2", "4", "6", "8"]}  # the 16 -> 16 linears


def base_of(kind: str, seed: int = 0) -> nn.Module:
    """The same frozen weights for the same seed; dropout off, so train mode is deterministic."""
    torch.manual_seed(seed)
    model = tiny_mlp() if kind == "mlp" else BUILDERS[kind]()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def inputs(kind: str, batch: int = 3, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(batch, 2, generator=gen)
    return torch.randint(1, VOCAB, (batch, 8), generator=gen)


def adapted(kind: str, **knobs) -> MoELoRAModel:
    return attach(base_of(kind), **{**KNOBS, **knobs}, **(MLP if kind == "mlp" else {}))


@pytest.mark.parametrize("kind", ["qwen2", "bert", "mlp"])
def test_only_the_experts_and_gates_train_and_their_count_is_the_formula(kind):
    model = adapted(kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B") or n.endswith(".gate.weight")
                             for n in trainable)
    assert model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())
    per_layer = {"qwen2": 7, "llama": 7, "bert": 6}  # every linear of a transformer layer
    assert len(model.adapted) == (4 * per_layer[kind] if kind != "mlp" else 4)


def test_output_is_the_renormalised_top_k_mixture_of_experts():
    """``y = W0 x + (alpha/r) sum_{i in topk} G(x)_i B_i A_i x`` with G renormalised over the top k."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(12, 10), MoELoRAConfig(r=3, num_experts=5, top_k=2))
    perturb(layer)
    x = torch.randn(2, 7, 12)
    probs = torch.softmax(x @ layer.gate.weight.T, -1)
    expected = layer.base_layer(x)
    for b in range(2):
        for t in range(7):
            p, top = probs[b, t].topk(2)
            for w, i in zip(p / p.sum(), top.tolist(), strict=True):
                expected[b, t] += layer.config.scaling * w * (layer.lora_B[i] @ layer.lora_A[i] @ x[b, t])
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-4)
    assert layer.last_top.shape == (2, 7, 2)


@pytest.mark.parametrize("kind", ["qwen2", "bert", "mlp"])
def test_auxiliary_loss_is_finite_positive_and_reaches_the_gates(kind):
    model = adapted(kind).train()
    output(model, inputs(kind, batch=4))
    aux = auxiliary_loss(model)
    assert torch.is_tensor(aux) and torch.isfinite(aux) and aux > 0
    aux.backward()
    gates = [m.gate.weight.grad for m in model.modules() if isinstance(m, MoELoRALinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in gates)
    lora_A = [m.lora_A.grad for m in model.modules() if isinstance(m, MoELoRALinear)]
    assert all(g is not None and g.abs().sum() > 0 for g in lora_A)  # the contrastive term


def test_auxiliary_loss_is_training_only_and_off_at_zero_weights():
    model = adapted("qwen2").eval()
    output(model, inputs("qwen2"))
    assert auxiliary_loss(model) == 0.0
    model = adapted("qwen2", load_balance_weight=0.0, contrastive_weight=0.0).train()
    output(model, inputs("qwen2"))
    assert auxiliary_loss(model) == 0.0


def test_load_balance_is_one_under_uniform_gates_and_higher_when_collapsed():
    E, k = 4, 2
    uniform = torch.full((64, E), 1 / E)
    top = torch.stack([torch.arange(64) % E, (torch.arange(64) + 1) % E], -1)
    torch.testing.assert_close(load_balance_loss(uniform, top), torch.tensor(1.0))
    collapsed = torch.tensor([[0.7, 0.3, 0.0, 0.0]]).expand(64, E)
    assert load_balance_loss(collapsed, torch.tensor([[0, 1]]).expand(64, k)) > 1.5


def test_contrastive_loss_is_lower_when_each_expert_has_its_own_direction():
    gen = torch.Generator().manual_seed(0)
    experts = torch.arange(4).repeat(16)
    separated = torch.eye(4)[experts] + 0.05 * torch.randn(64, 4, generator=gen)
    mixed = torch.randn(64, 4, generator=gen)
    low, high = (expert_contrastive_loss(c, experts, 0.1) for c in (separated, mixed))
    assert 0 < low < high
    assert expert_contrastive_loss(torch.randn(3, 4), torch.arange(3), 0.1) == 0  # no positives


def test_routing_per_token_keeps_batch_invariance_in_training_mode():
    """Only the auxiliary statistics are batch-level: outputs stay per example while training."""
    model = adapted("qwen2").train()
    perturb(model)
    x = inputs("qwen2", batch=4)
    with torch.no_grad():
        together = output(model, x)
        alone = torch.cat([output(model, x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_parameter_count_matches_table_6_at_the_qwen_shape():
    shapes = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)] * 24
    assert parameter_count(MoELoRAConfig(r=8, num_experts=4), shapes) == 18_579_456  # the paper's Table 6


@pytest.mark.parametrize(("field", "value"), [
    ("r", 0), ("alpha", -1.0), ("dropout", 1.0), ("num_experts", 0), ("top_k", 5),
    ("load_balance_weight", -0.1), ("contrastive_weight", float("nan")),
    ("contrastive_temperature", 0.0), ("contrastive_tokens", 0), ("target_modules", []),
])
def test_bad_knobs_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: got"):
        MoELoRAConfig(**{field: value})


def test_attach_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown field"):
        attach(tiny_mlp(), experts=4)
    with pytest.raises(ValueError, match="^target_modules"):
        attach(tiny_mlp(), target_modules=["nope"])


def test_auxiliary_term_is_a_per_layer_mean_and_a_small_fraction_of_the_task_loss_at_init():
    """Luo et al.'s auxiliary losses are per router; averaged over layers (as Switch/Mixtral do),
    the term is ~0.01 x 1 + 0.01 x log(M - 1) whatever the depth. At initialisation it stays
    below 5 % of the task loss (~log 96 = 4.6 here: about 2 %); summed over the 28 adapted
    layers it would be about 65 %."""
    ids = inputs("qwen2", batch=4)
    terms = {}
    for targets in (["q_proj"], None):  # 4 adapted layers, then all 28
        model = attach(base_of("qwen2"), **{**KNOBS, "target_modules": targets}).train()
        task = model(input_ids=ids, labels=ids).loss
        terms[str(targets)] = aux = auxiliary_loss(model)
        assert 0 < aux < 0.05 * task
    # 7x the layers, about the same term (a sum would grow ~7x)
    assert terms["None"] < 2 * terms["['q_proj']"]
