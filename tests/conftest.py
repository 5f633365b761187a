"""Tiny models built from configs: nothing is downloaded in tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    LlamaConfig,
    Qwen2Config,
)

VOCAB = 96


def tiny_qwen2(**overrides) -> nn.Module:
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      **overrides)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_llama(**overrides) -> nn.Module:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      **overrides)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def tiny_bert() -> nn.Module:
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertModel(cfg).eval()


def tiny_mlp(width: int = 16, depth: int = 6) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(2, width), nn.GELU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.GELU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers).eval()


BUILDERS = {"qwen2": tiny_qwen2, "llama": tiny_llama, "bert": tiny_bert}


def randomize_adapter(model: nn.Module, std: float = 0.2, seed: int = 0) -> None:
    """Give B (zero at init) random values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B") or name.endswith("lora_B.default.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
