"""PEFT's own methods behind the registry: LoRA, DoRA, Lily, VB-LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from qlsearch.adapters import attach
from tests.conftest import BUILDERS, VOCAB, tiny_mlp

# tiny models have 32/64-wide layers: VB-LoRA's sub-vectors must divide them
KNOBS = {"lora": {"r": 4}, "dora": {"r": 4}, "lily": {"r": 4, "num_B": 2},
         "vblora": {"r": 4, "vector_length": 16, "num_vectors": 32}}
MLP_TARGETS = ["2", "4", "6", "8"]  # 16 -> 16 linears


def output(model, x):
    with torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("method", sorted(KNOBS))
@pytest.mark.parametrize("kind", ["qwen2", "llama", "bert", "mlp"])
def test_attach_trains_only_the_adapter_and_keeps_the_base_output(method, kind):
    base = tiny_mlp() if kind == "mlp" else BUILDERS[kind]()
    x = torch.randn(3, 2) if kind == "mlp" else torch.randint(0, VOCAB, (3, 6))
    before = output(base, x)
    extra = {"target_modules": MLP_TARGETS} if kind == "mlp" else {}
    model = attach(base, method, **KNOBS[method], **extra)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(method.replace("dora", "lora") in n.lower() for n in trainable)
    if method != "vblora":  # VB-LoRA's factors come from a random bank: not zero at init
        torch.testing.assert_close(output(model, x), before)


@pytest.mark.parametrize("method", sorted(KNOBS))
def test_save_load_and_a_few_steps_lower_the_loss(method, tmp_path):
    torch.manual_seed(0)
    base = tiny_mlp()
    pristine = copy.deepcopy(base)
    model = attach(base, method, **KNOBS[method], target_modules=MLP_TARGETS)
    x = torch.rand(128, 2) * 4 - 2
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(pristine, tmp_path)
    assert torch.equal(output(loaded.eval(), x), output(model.eval(), x))


@pytest.mark.parametrize("method", ["lora", "dora", "vblora"])
def test_batch_invariance(method):
    model = attach(BUILDERS["qwen2"](), method, **KNOBS[method]).eval()
    perturb(model)
    x = torch.randint(0, VOCAB, (4, 6))
    together = output(model, x)
    for i in range(4):
        torch.testing.assert_close(output(model, x[i:i + 1])[0], together[i], atol=1e-5, rtol=1e-5)


def test_lily_output_depends_on_batch_mates():
    """PEFT's Lily averages its router over batch and tokens: documented, not hidden."""
    model = attach(BUILDERS["qwen2"](), "lily", **KNOBS["lily"]).eval()
    perturb(model)
    x = torch.randint(0, VOCAB, (4, 6))
    together = output(model, x)
    alone = output(model, x[:1])
    assert not torch.allclose(alone[0], together[0], atol=1e-6)


def test_unknown_knob_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"lily: unknown knob\(s\) \['alpha'\]; allowed: .*num_B"):
        attach(tiny_mlp(), "lily", alpha=3)
