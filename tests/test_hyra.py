"""HyRA: a hypernetwork shared by a projection's heads generates each head's factors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlsearch.adapters.hyra import HyRAConfig, HyRALinear, HyRAModel, attach, parameter_count
from tests.conftest import BUILDERS, tiny_mlp
from tests.test_adapter_contract import perturb

KNOBS = {"r": 4, "embed_dim": 8, "hidden_dim": 4, "seed": None}
MLP = {"target_modules": ["2", "4", "6", "8"], "num_heads": 4}  # the 16 -> 16 linears


def base_of(kind: str, seed: int = 0) -> nn.Module:
    """The same frozen weights for the same seed."""
    torch.manual_seed(seed)
    return tiny_mlp() if kind == "mlp" else BUILDERS[kind]()


def adapted(kind: str, **knobs) -> HyRAModel:
    return attach(base_of(kind), **{**KNOBS, **knobs}, **(MLP if kind == "mlp" else {}))


@pytest.mark.parametrize("kind", ["qwen2", "bert", "mlp"])
def test_only_the_hypernetworks_train_and_their_count_is_the_formula(kind):
    model = adapted(kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".hypernet." in n for n in trainable)
    assert model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())
    assert len(model.adapted) == (16 if kind != "mlp" else 4)  # q, k, v, o of 4 layers


def test_default_targets_are_the_attention_projections():
    qwen = adapted("qwen2")
    assert {n.rsplit(".", 1)[-1] for n in qwen.adapted} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    bert = adapted("bert")
    assert {n.split(".", 3)[-1] for n in bert.adapted} == {
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"}


def test_heads_are_out_features_over_the_head_width_with_a_tiling_fallback():
    from qlsearch.adapters.hyra.model import head_count

    assert head_count(4864, 64) == 76 and head_count(128, 64) == 2 and head_count(896, 64) == 14
    assert head_count(100, 64) == 1  # narrower than two heads
    assert head_count(1000, 64) == 10  # 15 does not divide 1000; 10 heads of 100 rows do


def test_head_counts_come_from_the_model_config():
    model = adapted("qwen2")  # 4 query heads, 2 key/value heads, hidden 32
    heads = {n.rsplit(".", 1)[-1]: h for n, (_, _, h) in zip(model.adapted, model.adapted_shapes(), strict=True)}
    assert heads == {"q_proj": 4, "k_proj": 2, "v_proj": 2, "o_proj": 4}
    assert all(m.hypernet.d_head == 8 for m in model.modules() if isinstance(m, HyRALinear))


def test_update_stacks_each_heads_BA_along_the_output_rows():
    model = adapted("qwen2")
    perturb(model)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    A, B = layer.hypernet()
    delta = layer.delta_weight()
    d_head = layer.hypernet.d_head
    for h in range(layer.num_heads):
        torch.testing.assert_close(delta[h * d_head:(h + 1) * d_head], layer.scaling * B[h] @ A[h])
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ delta.T, atol=1e-5, rtol=1e-4)


def test_heads_share_one_hypernetwork_but_get_distinct_factors():
    model = adapted("qwen2")
    perturb(model)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    A, B = layer.hypernet()
    assert layer.hypernet.head_embeddings.shape[0] == layer.num_heads
    assert not torch.allclose(A[0], A[1]) and not torch.allclose(B[0], B[1])


def test_parameter_count_at_the_qwen_shape():
    cfg = HyRAConfig(r=8)  # d_e = 16, d_h = 8
    shapes = [(896, 896, 14), (896, 128, 2), (896, 128, 2), (896, 896, 14)] * 24
    q = 14 * 16 + 17 * 8 + 9 * 8 * (896 + 64)
    kv = 2 * 16 + 17 * 8 + 9 * 8 * (896 + 64)
    assert parameter_count(cfg, shapes) == 24 * (2 * q + 2 * kv) == 6_660_864


@pytest.mark.parametrize(("field", "value"), [
    ("r", 0), ("alpha", 0.0), ("dropout", 1.0), ("embed_dim", 0), ("hidden_dim", 1.5),
    ("num_heads", 0), ("target_modules", []),
])
def test_bad_knobs_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: got"):
        HyRAConfig(**{field: value})


def test_attach_errors_name_the_field():
    with pytest.raises(ValueError, match="unknown field"):
        attach(tiny_mlp(), rank=4)
    # a plain MLP has no attention heads: one head per linear (the documented fallback)
    assert attach(tiny_mlp(), target_modules=["2"]).adapted_shapes() == [(16, 16, 1)]
    with pytest.raises(ValueError, match="^num_heads: got 3"):
        attach(tiny_mlp(), target_modules=["2"], num_heads=3)  # 16 rows do not split into 3 heads
    with pytest.raises(ValueError, match="^target_modules"):
        attach(tiny_mlp(), num_heads=2)  # no attention projection by default
