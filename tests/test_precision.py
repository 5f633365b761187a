"""One precision policy for every method: float32 weights and optimizer state, compute in the
model's dtype (qlsearch.adapters._precision)."""

from __future__ import annotations

import pytest
import torch

from qlsearch.adapters import attach, auxiliary_loss
from qlsearch.adapters._precision import PRECISIONS, canonical_name, inference_form, precision_of
from qlsearch.profiling._settings import PRECISIONS as CLI_PRECISIONS
from tests.conftest import VOCAB, tiny_qwen2
from tests.test_adapter_contract import TEST_CASES, cases


def bf16_model(method: str, knobs: dict, precision: str = "mixed"):
    torch.manual_seed(0)
    base = tiny_qwen2(attention_dropout=0.0).to(torch.bfloat16)
    return attach(base, method, precision=precision, **knobs).train()


def step_fn(model, method: str, lr: float):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)  # no decay: only gradients move weights
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 8), generator=gen)
    extra = {"instruction": torch.randn(4, 384, generator=gen)} if method == "instr-queryable" else {}

    def step() -> None:
        optimizer.zero_grad()
        out = model(input_ids=ids, labels=ids, **extra)
        (out.loss + auxiliary_loss(model)).backward()
        optimizer.step()

    return step


def test_the_cli_lists_the_same_policies():
    assert CLI_PRECISIONS == PRECISIONS


def unchanged_by_one_step(model, method: str) -> list[str]:
    """Trainable tensors (canonical names) that the second AdamW step at lr 1e-4 leaves equal."""
    step = step_fn(model, method, lr=1e-4)
    step()  # B = 0 at init: only after a first step do the tensors behind B get a gradient
    trainable = {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    step()
    return [n for n, p in trainable.items() if torch.equal(p, before[n])]


@cases
def test_one_bf16_step_changes_every_trainable_tensor(method, knobs):
    """On a bf16 model every method stores float32 weights, computes in bf16, and one AdamW step
    at lr 1e-4 (below half a bf16 ulp of most weights) moves every trainable tensor: router
    atoms, keys and gates, generated factors' networks, magnitudes, experts' gates."""
    model = bf16_model(method, knobs)
    assert precision_of(model) == {"adapter_dtype": "float32", "compute_dtype": "bfloat16"}
    unchanged = unchanged_by_one_step(model, method)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
               for p in model.parameters() if p.requires_grad)
    if method == "lily":
        # Lily's B experts start equal (zero) and Adam's first steps move them alike, so some
        # routers get a gradient of ~1e-10 and do not move: Lily's own, the same in float32
        torch.manual_seed(0)
        fp32 = attach(tiny_qwen2(attention_dropout=0.0), method, **knobs).train()
        assert set(unchanged) <= set(unchanged_by_one_step(fp32, method))
        assert all("lily_router" in n for n in unchanged), unchanged
    else:
        assert not unchanged, unchanged


def test_bf16_storage_rounds_small_updates_away_and_float32_keeps_them():
    """Why the policy: with atoms stored in bf16 an update of ~1e-4 is below half an ulp of
    most entries (|w| 2^-9) and is lost; the float32 master keeps every one."""
    knobs = dict(TEST_CASES)["queryable"]
    moved = {}
    for precision in PRECISIONS:
        model = bf16_model("queryable", knobs, precision)
        step = step_fn(model, "queryable", lr=1e-4)
        step()
        atoms = next(p for n, p in model.named_parameters() if "atoms" in n)
        before = atoms.detach().clone()
        step()
        has_grad = atoms.grad != 0
        moved[precision] = float((atoms != before)[has_grad].float().mean())
    assert moved["mixed"] == 1.0
    assert moved["model"] < 0.5


def test_the_model_policy_stores_weights_in_the_model_dtype():
    model = bf16_model("queryable", dict(TEST_CASES)["queryable"], "model")
    assert precision_of(model) == {"adapter_dtype": "bfloat16", "compute_dtype": "bfloat16"}


def test_an_unknown_policy_names_the_allowed_ones():
    with pytest.raises(ValueError, match="precision: got 'fp8'; allowed: mixed, model"):
        attach(tiny_qwen2(), "lora", precision="fp8")


@pytest.mark.parametrize("method", ["replora", "doran", "hyra", "queryable", "lora"])
def test_the_inference_form_gives_the_training_forms_outputs(method):
    """Folding generated factors and caching the casts is exact: same outputs, then training
    goes on unfolded. The queryable form applies ``I + g S_b`` as ``s + g s S_b^T`` with ``g``
    a fixed number, the same function rounded in another order: its logits may differ by
    a few bf16 roundings of their size, no more."""
    model = bf16_model(method, dict(TEST_CASES)[method])
    step_fn(model, method, lr=1e-2)()  # B != 0, so the adapter changes the output
    model.eval()
    ids = torch.randint(1, VOCAB, (2, 5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with inference_form(model):
            got = model(input_ids=ids).logits
    rounding = 4 * torch.finfo(torch.bfloat16).eps * float(expected.abs().max()) if method == "queryable" else 0.0
    torch.testing.assert_close(got, expected, atol=rounding, rtol=0.0)
    model.train()
    step_fn(model, method, lr=1e-2)()  # unfolded again: training works
