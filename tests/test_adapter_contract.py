"""The contract every registered adapter keeps, on tiny Qwen2, Llama, BERT and a plain MLP.

One table of ``(method, knobs for tiny models)``, in the style of PEFT's
``tests/test_custom_models.py``; what only one method promises (formulas,
Table 6 counts, folding, tau, heads, auxiliary losses) is in its own test file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from torch import nn

from qlsearch.adapters import attach, auxiliary_loss, list_methods
from tests.conftest import BUILDERS, VOCAB, tiny_mlp

_QUERYABLE = {"r": 4, "num_atoms": 8, "top_k": 3, "num_blocks": 2, "d_k": 16, "seed": 0}

TEST_CASES = [
    ("lora", {"r": 4}),
    ("dora", {"r": 4}),
    ("lily", {"r": 4, "num_B": 2}),
    # sub-vectors must divide every adapted width (16, 32, 64 here)
    ("vblora", {"r": 4, "vector_length": 16, "num_vectors": 32}),
    ("replora", {"r": 4, "hidden": 8, "seed": 0}),
    ("hyra", {"r": 4, "embed_dim": 8, "hidden_dim": 4, "seed": 0}),
    ("doran", {"r": 4, "hidden": 8, "seed": 0}),
    ("moelora", {"r": 4, "num_experts": 4, "top_k": 2, "seed": 0}),
    ("queryable", _QUERYABLE),
    ("instr-queryable", _QUERYABLE),
]
KINDS = ["qwen2", "llama", "bert", "mlp"]
#: The MLP's 16 -> 16 linears (its first and last are 2 -> 16 and 16 -> 1); HyRA splits them into heads.
MLP_KNOBS = {"target_modules": ["2", "4", "6", "8"]}
MLP_EXTRA = {"hyra": {"num_heads": 4}}

#: Methods whose output is not the frozen model's at init: VB-LoRA's factors come from a
#: random bank; DoRAN scales each row by ||W0|| / (||W0|| + tau) (tested in test_doran.py).
NOT_IDENTITY_AT_INIT = {"vblora", "doran"}
#: PEFT's Lily averages its router over the batch (documented in test_peft_baselines.py).
BATCH_DEPENDENT = {"lily"}

cases = pytest.mark.parametrize(("method", "knobs"), TEST_CASES, ids=[m for m, _ in TEST_CASES])
kinds = pytest.mark.parametrize("kind", KINDS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tensors this small gain nothing from intra-op threads, and lose much to their hand-offs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_table_covers_every_registered_method():
    assert sorted(m for m, _ in TEST_CASES) == sorted(m.name for m in list_methods())


def base_of(kind: str) -> nn.Module:
    """A tiny frozen model without dropout, so a training-mode forward is deterministic."""
    model = tiny_mlp() if kind == "mlp" else BUILDERS[kind]()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def inputs(kind: str, batch: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(batch, 2, generator=gen)
    return torch.randint(1, VOCAB, (batch, 6), generator=gen)


def adapt(base: nn.Module, kind: str, method: str, knobs: dict) -> nn.Module:
    extra = {**MLP_KNOBS, **MLP_EXTRA.get(method, {})} if kind == "mlp" else {}
    return attach(base, method, **knobs, **extra)


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def perturb(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Move every adapter parameter (B-like factors start at zero) so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * std)


@cases
@kinds
def test_only_adapter_parameters_are_trainable(method, knobs, kind):
    base = base_of(kind)
    frozen = list(base.parameters())
    model = adapt(base, kind, method, knobs)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable
    assert not any(p.requires_grad for p in frozen)
    assert not {id(p) for p in trainable} & {id(p) for p in frozen}


@cases
@kinds
def test_output_equals_the_frozen_model_at_init(method, knobs, kind):
    if method in NOT_IDENTITY_AT_INIT:
        pytest.skip(f"{method} does not promise the frozen model's output at init")
    base = base_of(kind)
    x = inputs(kind)
    with torch.no_grad():
        before = output(base, x)
        after = output(adapt(base, kind, method, knobs).eval(), x)
    torch.testing.assert_close(after, before)


@cases
@kinds
def test_save_then_load_gives_identical_outputs(method, knobs, kind, tmp_path):
    base = base_of(kind)
    pristine = copy.deepcopy(base)  # the same frozen weights, not yet adapted
    model = adapt(base, kind, method, knobs).eval()
    perturb(model)
    x = inputs(kind)
    with torch.no_grad():
        expected = output(model, x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a different adapter init, which the checkpoint must overwrite
    if isinstance(model, PeftModel):
        loaded = PeftModel.from_pretrained(pristine, tmp_path)
    else:
        loaded = type(model).from_pretrained(pristine, tmp_path)
    with torch.no_grad():
        assert torch.equal(output(loaded.eval(), x), expected)


@cases
@kinds
def test_batch_invariance(method, knobs, kind):
    """An example's output does not depend on its batch-mates."""
    if method in BATCH_DEPENDENT:
        pytest.skip(f"{method}'s output depends on its batch-mates")
    model = adapt(base_of(kind), kind, method, knobs).eval()
    perturb(model)
    x = inputs(kind, batch=4)
    with torch.no_grad():
        together = output(model, x)
        alone = torch.cat([output(model, x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@cases
@kinds
def test_a_few_adamw_steps_lower_a_toy_regression_loss(method, knobs, kind):
    model = adapt(base_of(kind), kind, method, knobs)
    teacher = copy.deepcopy(model).eval()
    perturb(teacher, std=0.3, seed=5)
    x = inputs(kind, batch=4)
    with torch.no_grad():
        target = output(teacher, x)  # reachable: the same model with other adapter weights
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(8):
        loss = nn.functional.mse_loss(output(model, x), target) + auxiliary_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
