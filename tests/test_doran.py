"""DoRAN on tiny Qwen2, Llama, BERT and a plain MLP: the statements its docstrings make."""

from __future__ import annotations

import copy

import pytest
import torch

from qlsearch.adapters.doran import (
    METHOD,
    DoRANConfig,
    DoRANLinear,
    DoRANModel,
    attach,
    parameter_count,
)
from tests.test_replora import base, inputs, run

KNOBS = {"r": 4, "hidden": 8, "seed": 0}
MLP_TARGETS = {"target_modules": ["0", "2", "4"]}


def knobs_for(kind: str, **knobs) -> dict:
    return {**KNOBS, **(MLP_TARGETS if kind == "mlp" else {}), **knobs}


def randomize(model: DoRANModel, seed: int = 3) -> DoRANModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move B off zero and tau off its init so the adapter changes the output
        for layer in model.adapted_layers().values():
            layer.head_B.weight.copy_(torch.randn(layer.head_B.weight.shape, generator=gen) * 0.3)
            layer.tau_logit.fill_(-1.0)
    return model.eval()


def set_tau_to_zero(model: DoRANModel) -> None:
    with torch.no_grad():
        for layer in model.adapted_layers().values():
            layer.tau_logit.fill_(-200.0)  # softplus(-200) underflows to 0: DoRA
    assert all(layer.tau.item() == 0.0 for layer in model.adapted_layers().values())


@pytest.mark.parametrize("kind", ["qwen2", "llama", "bert", "mlp"])
def test_tau_zero_limit_is_dora_which_is_the_frozen_model_at_init(kind):
    model_base = base(kind)
    x = inputs(kind)
    before = run(model_base, x)
    model = attach(model_base, **knobs_for(kind))
    set_tau_to_zero(model)
    torch.testing.assert_close(run(model, x), before, atol=1e-5, rtol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("shared.") or any(
        k in n for k in ("seed_", "head_", "magnitude", "tau_logit")) for n in trainable)
    assert model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())


def test_with_tau_the_init_output_is_the_base_scaled_by_norm_over_norm_plus_tau():
    """Not the frozen model exactly: each adapted row is scaled by ||W0|| / (||W0|| + tau)."""
    model = attach(base("mlp"), **knobs_for("mlp", tau_init=0.5))
    layer = model.base_model.get_submodule("0")
    h = torch.randn(5, 2)
    W0, b = layer.base_layer.weight, layer.base_layer.bias
    norm = W0.norm(dim=1)
    with torch.no_grad():
        torch.testing.assert_close(layer(h), (h @ W0.T) * norm / (norm + 0.5) + b)
    torch.testing.assert_close(layer.tau, torch.tensor(0.5))


@pytest.mark.parametrize("kind", ["qwen2", "mlp"])
def test_magnitude_norm_plus_tau_keeps_the_frozen_output_at_init(kind):
    model_base = base(kind)
    x = inputs(kind)
    before = run(model_base, x)
    model = attach(model_base, **knobs_for(kind, magnitude_init="norm_plus_tau", tau_init=0.1))
    torch.testing.assert_close(run(model, x), before, atol=1e-5, rtol=1e-5)


def test_tau_zero_equals_peft_dora_with_the_same_factors():
    import peft

    plain = base("mlp")
    dora_base = copy.deepcopy(plain)
    model = randomize(attach(plain, **knobs_for("mlp")))
    set_tau_to_zero(model)
    factors = model.fold()
    dora = peft.get_peft_model(dora_base, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["0", "2", "4"],
                                                            use_dora=True)).eval()
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = dora.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
            layer.lora_magnitude_vector["default"].weight.copy_(model.base_model.get_submodule(name).magnitude)
    x = inputs("mlp", batch=6)
    torch.testing.assert_close(run(model, x), run(dora, x), atol=1e-5, rtol=1e-5)


def test_first_layer_is_shared_by_q_and_v_of_a_block():
    model = attach(base("llama"), **KNOBS)
    for shared, names in zip(model.shared, model.units, strict=True):
        assert [n.rsplit(".", 1)[-1] for n in names] == ["q_proj", "v_proj"]
        assert all(model.base_model.get_submodule(n)._shared[0] is shared for n in names)


@pytest.mark.parametrize("kind", ["qwen2", "mlp"])
def test_folding_and_merging_keep_the_outputs(kind):
    model = randomize(attach(base(kind), **knobs_for(kind)))
    x = inputs(kind)
    before = run(model, x)
    merged = model.merged_weights()
    model.fold()
    torch.testing.assert_close(run(model, x), before, atol=1e-6, rtol=1e-6)
    layer = model.base_model.get_submodule(model.adapted[0])
    h = torch.randn(5, layer.base_layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(layer(h), h @ merged[model.adapted[0]].T + layer.base_layer.bias)


def test_adamw_steps_move_tau_and_keep_it_positive():
    model = attach(base("mlp"), **knobs_for("mlp")).train()
    x = inputs("mlp", batch=4)
    with torch.no_grad():
        target = run(model, x) + 0.5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer = next(iter(model.adapted_layers().values()))
    assert layer.tau.item() != pytest.approx(1e-3, rel=1e-6) and layer.tau.item() > 0


def test_a_checkpoint_loads_only_into_its_own_method(tmp_path):
    from qlsearch.adapters.replora import RepLoRAModel

    attach(base("mlp"), **knobs_for("mlp")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="^method: .* holds 'doran', not 'replora'"):
        RepLoRAModel.from_pretrained(base("mlp"), tmp_path)
    assert isinstance(DoRANModel.from_pretrained(base("mlp"), tmp_path), DoRANModel)


def test_parameter_count_at_the_qwen_shape():
    cfg = DoRANConfig(r=8, hidden=32)
    qv = [[(896, 896), (896, 128)]] * 24
    assert parameter_count(cfg, qv) == 579_840 + 24 * (896 + 128 + 2) == 604_464
    every = [[(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)]] * 24
    assert parameter_count(cfg, every) == 4_399_104 + 168 * 528 + 24 * 576 + 24 * (12_672 + 7)


@pytest.mark.parametrize("knob, value", [("r", 0), ("hidden", 0), ("tau_init", 0.0), ("tau_init", float("inf")),
                                         ("magnitude_init", "ones"), ("activation", "swish"),
                                         ("dropout", -0.1), ("target_modules", ["nothing_here"]), ("noise", 1)])
def test_bad_knobs_raise_a_value_error_naming_the_field(knob, value):
    with pytest.raises(ValueError, match=knob):
        attach(base("mlp"), **{**MLP_TARGETS, knob: value})


def test_registry_entry_lists_every_knob():
    assert METHOD.name == "doran" and set(METHOD.knobs) == set(DoRANConfig().to_dict())
    assert isinstance(METHOD.attach(base("mlp"), **MLP_TARGETS).base_model.get_submodule("2"), DoRANLinear)
