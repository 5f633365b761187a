"""Synthetic backbones, their pre-training cache, and HF model loading."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from qlsearch import backbones
from qlsearch.backbones import (
    SYNTHETIC_TARGETS,
    build_backbone,
    load_hf_model,
    pretrain,
    pretrained_backbone,
)
from qlsearch.tasks import make_splits

TINY = {"transformer": {"depth": 2, "width": 16, "num_heads": 2}, "mlp": {"depth": 4, "width": 16}}


def _small_splits(seed: int = 0):
    return make_splits("sin_cos", seed=seed, source_n=400, target_n=60, target_train_n=20)


def test_default_sizes_are_the_papers():
    transformer, mlp = build_backbone("transformer"), build_backbone("mlp")
    assert (len(transformer.layers), transformer.config.width) == (8, 256)
    assert (len(mlp.layers), mlp.config.width) == (32, 32)
    assert transformer.config.num_attention_heads == 8


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_scalar_output(name):
    model = build_backbone(name, **TINY[name])
    assert model(torch.rand(5, 2) * 2 - 1).shape == (5, 1)


def test_transformer_linears_found_by_name():
    model = build_backbone("transformer", **TINY["transformer"])
    assert isinstance(model.layers, nn.ModuleList)
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            assert isinstance(model.get_submodule(f"layers.{i}.{name}"), nn.Linear)
    suffixes = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("layers.")}
    assert suffixes == set(SYNTHETIC_TARGETS["transformer"])


def test_mlp_layers_hold_one_linear_each():
    model = build_backbone("mlp", **TINY["mlp"])
    assert isinstance(model.layers, nn.ModuleList)
    linears = [n for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)]
    assert linears == [f"{i}.linear" for i in range(4)]
    assert SYNTHETIC_TARGETS["mlp"] == ["linear"]


def test_unknown_backbone_names_the_allowed_ones():
    with pytest.raises(ValueError, match="transformer, mlp"):
        build_backbone("resnet")


@pytest.mark.parametrize("name", ["transformer", "mlp"])
def test_a_few_pretraining_epochs_lower_the_mse(name):
    model = build_backbone(name, **TINY[name])
    metrics = pretrain(model, _small_splits(), epochs=3, lr=3e-3, batch_size=64, seed=0)
    assert metrics["source_test_mse"] < metrics["initial_source_test_mse"]
    assert not model.training


def test_pretrained_backbone_is_cached(tmp_path, monkeypatch):
    calls = []
    real = backbones.pretrain

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(backbones, "pretrain", counting)
    monkeypatch.setattr(backbones, "make_splits", lambda function, seed: _small_splits(seed))
    kwargs = dict(function="sin_cos", backbone="mlp", seed=0, cache_dir=tmp_path, epochs=1, **TINY["mlp"])
    first = pretrained_backbone(**kwargs)
    (weights,) = tmp_path.glob("*.safetensors")
    mtime = weights.stat().st_mtime_ns
    second = pretrained_backbone(**kwargs)
    assert len(calls) == 1 and weights.stat().st_mtime_ns == mtime
    x = torch.rand(8, 2)
    assert torch.equal(first(x), second(x))
    record = json.loads(weights.with_suffix(".json").read_text())
    assert record["function"] == "sin_cos" and record["version"] == backbones.CACHE_VERSION
    assert "source_test_mse" in record["metrics"]

    pretrained_backbone(**{**kwargs, "seed": 1})  # another key trains again
    pretrained_backbone(**{**kwargs, "lr": 1e-3})
    assert len(calls) == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3


def test_load_hf_model_from_a_config_only_folder(tmp_path):
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    model = load_hf_model(tmp_path)
    assert next(model.parameters()).dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)
    again = load_hf_model(tmp_path)  # random weights, but seeded
    assert torch.equal(next(model.parameters()), next(again.parameters()))

    model.save_pretrained(tmp_path / "saved")  # a folder with weights → from_pretrained
    loaded = load_hf_model(tmp_path / "saved", dtype="float32")
    assert torch.equal(next(model.parameters()), next(loaded.parameters()))


def test_load_hf_model_offline_miss_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="cannot load model 'no-such-org/no-such-model'"):
        load_hf_model("no-such-org/no-such-model")


@pytest.mark.parametrize("name", ["transformer", "mlp"])
@pytest.mark.parametrize(("method", "knobs"), [("lora", {}), ("queryable", {"num_blocks": 2})])
def test_adapters_attach_to_the_backbones(name, method, knobs):
    from qlsearch.adapters import attach

    backbone = build_backbone(name, **TINY[name])
    frozen = {id(p) for p in backbone.parameters()}
    model = attach(backbone, method, r=4, target_modules=SYNTHETIC_TARGETS[name], **knobs)
    model(torch.rand(3, 2)).sum().backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and not any(id(p) in frozen for p in trainable)
