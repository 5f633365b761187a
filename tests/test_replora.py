"""RepLoRA on tiny Qwen2, Llama, BERT and a plain MLP: the statements its docstrings make."""

from __future__ import annotations

import pytest
import torch

from qlsearch.adapters.replora import METHOD, RepLoRALinear, RepLoRAModel, attach, parameter_count
from tests.conftest import BUILDERS, VOCAB, tiny_mlp

KNOBS = {"r": 4, "hidden": 8, "seed": 0}
MLP_TARGETS = {"target_modules": ["0", "2", "4"]}


def base(kind: str):
    return tiny_mlp() if kind == "mlp" else BUILDERS[kind]()


def inputs(kind: str, batch: int = 3):
    gen = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(batch, 2, generator=gen)
    return torch.randint(1, VOCAB, (batch, 6), generator=gen)


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else (
        out.logits if hasattr(out, "logits") else out.last_hidden_state)


def adapted(kind: str, **knobs) -> RepLoRAModel:
    model = attach(base(kind), **{**KNOBS, **(MLP_TARGETS if kind == "mlp" else {}), **knobs})
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # move B off zero so the adapter changes the output
        for layer in model.adapted_layers().values():
            layer.head_B.weight.copy_(torch.randn(layer.head_B.weight.shape, generator=gen) * 0.3)
    return model.eval()


@pytest.mark.parametrize("kind", ["qwen2", "bert", "mlp"])
def test_only_seeds_heads_and_shared_layers_train_and_their_count_is_the_formula(kind):
    model = attach(base(kind), **KNOBS, **(MLP_TARGETS if kind == "mlp" else {}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("shared.") or any(k in n for k in ("seed_", "head_"))
                             for n in trainable)
    assert len(model.adapted) == (8 if kind != "mlp" else 3)  # q, v in each of 4 layers
    assert model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())


def test_first_layer_is_shared_by_q_and_v_of_a_layer():
    model = adapted("qwen2")
    assert [len(u) for u in model.units] == [2, 2, 2, 2]
    for shared, names in zip(model.shared, model.units, strict=True):
        layers = [model.base_model.get_submodule(n) for n in names]
        assert all(layer._shared[0] is shared for layer in layers)
        assert layers[0].head_A is not layers[1].head_A


@pytest.mark.parametrize("kind", ["qwen2", "mlp"])
def test_folding_gives_plain_lora_with_identical_outputs(kind):
    model = adapted(kind)
    x = inputs(kind)
    before = run(model, x)
    factors = model.fold()
    torch.testing.assert_close(run(model, x), before, rtol=0, atol=0)
    # the folded factors are plain LoRA: W0 x + b + (alpha/r) B A x
    name = model.adapted[0]
    layer = model.base_model.get_submodule(name)
    A, B = factors[name]
    h = torch.randn(5, layer.base_layer.in_features)
    with torch.no_grad():
        plain = layer.base_layer(h) + model.config.scaling * h @ A.T @ B.T
        torch.testing.assert_close(layer(h), plain)
    model.train()
    with pytest.raises(RuntimeError, match="unfold"):
        model(x)
    model.unfold()
    model(x)


def test_parameter_count_at_the_qwen_shape():
    from qlsearch.adapters.replora import RepLoRAConfig

    cfg = RepLoRAConfig(r=8, hidden=32)
    qv = [[(896, 896), (896, 128)]] * 24
    assert parameter_count(cfg, qv) == 8 * (1792 + 1024) * 24 + 48 * 528 + 24 * 576 == 579_840
    every = [[(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)]] * 24
    assert parameter_count(cfg, every) == 4_399_104 + 168 * 528 + 24 * 576  # LoRA's Table 6 row + MLPs


@pytest.mark.parametrize("knob, value", [("r", 0), ("hidden", -1), ("alpha", 0), ("dropout", 1.0),
                                         ("activation", "swish"), ("target_modules", []),
                                         ("target_modules", ["nothing_here"]), ("rank", 4)])
def test_bad_knobs_raise_a_value_error_naming_the_field(knob, value):
    with pytest.raises(ValueError, match=knob):
        attach(base("qwen2"), **{knob: value})


def test_registry_entry_lists_every_knob():
    from qlsearch.adapters.replora import RepLoRAConfig

    assert METHOD.name == "replora" and set(METHOD.knobs) == set(RepLoRAConfig().to_dict())
    assert isinstance(METHOD.attach(base("mlp"), **MLP_TARGETS).base_model.get_submodule("0"), RepLoRALinear)
