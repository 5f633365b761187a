"""PEFT's own methods behind the registry: what only they do (their common contract is in
test_adapter_contract.py)."""

from __future__ import annotations

import pytest
import torch

from qlsearch.adapters import attach
from tests.conftest import BUILDERS, VOCAB, tiny_mlp

LILY = {"r": 4, "num_B": 2}


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


def test_lily_output_depends_on_batch_mates():
    """PEFT's Lily averages its router over batch and tokens: documented, not hidden."""
    model = attach(BUILDERS["qwen2"](), "lily", **LILY).eval()
    perturb(model)
    x = torch.randint(0, VOCAB, (4, 6))
    together = output(model, x)
    alone = output(model, x[:1])
    assert not torch.allclose(alone[0], together[0], atol=1e-6)


def test_unknown_knob_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"lily: unknown knob\(s\) \['alpha'\]; allowed: .*num_B"):
        attach(tiny_mlp(), "lily", alpha=3)
