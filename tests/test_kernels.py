"""The kernel count: what counts (from the ops' own definitions), PEFT LoRA's per-layer ops,
and the launch-bound targets of issue 15 as counts (exact, so they cannot flake)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlsearch.profiling import FROZEN, ProfileSettings, profile_methods
from qlsearch.profiling._kernels import KernelCounter, count_kernels


def test_views_and_allocations_count_nothing_and_every_kernel_counts_once():
    x = torch.randn(4, 6)
    with torch.inference_mode(), KernelCounter() as counter:
        x.t()
        x.view(2, 12)
        x.reshape(24)  # contiguous: a view
        x.unsqueeze(0).expand(3, 4, 6)
        torch.empty(5)
        x.t().reshape(24)  # not viewable: one copy
        torch.nn.functional.linear(x, torch.ones(3, 6), torch.ones(3))  # one GEMM with the bias: addmm
        torch.zeros(4, 4).addmm_(x, x.t())  # in place: it writes, so it launches
    assert counter.counts == {"clone": 1, "ones": 2, "addmm": 1, "zeros": 1, "addmm_": 1}


def test_a_linear_layers_backward_counts_the_ops_of_its_gradients():
    """y = x W^T + b, loss = sum(y): forward addmm and sum; backward the loss's gradient (one fill),
    dL/dx and dL/dW (one GEMM each) and dL/db (one column sum)."""
    layer = nn.Linear(6, 3)
    x = torch.randn(4, 6, requires_grad=True)
    with KernelCounter() as counter:
        layer(x).sum().backward()
    assert counter.counts == {"addmm": 1, "sum": 2, "ones_like": 1, "mm": 2}


def test_peft_lora_adds_its_four_ops_per_adapted_linear(tmp_path):
    """PEFT LoRA's forward adds ``lora_B(lora_A(x)) * scaling`` to the frozen linear's output
    (dropout off: an identity): two GEMMs, a multiply and an add per adapted linear."""
    from transformers import Qwen2Config

    Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(tmp_path)
    out = profile_methods(ProfileSettings(str(tmp_path), methods=("lora",), batch=1, seq=4, repeats=1,
                                          warmup=0, threads=1, skip=frozenset({"decode", "train"})))
    frozen, lora = out.methods[FROZEN], out.methods["lora"]
    assert lora.kernels - frozen.kernels == 4 * 7 * 3  # q, k, v, o, gate, up, down in 3 layers
    assert lora.kernels_ratio == lora.train_kernels_ratio == 1.0
    assert frozen.train_kernels is None  # nothing to train
    assert count_kernels(lambda: None) == 0


@pytest.fixture(scope="module")
def launch_bound():
    """The launch-bound config (24 layers, 4 blocks) in bf16 under the common precision policy:
    the GPU check's setting, where an H200 step is bound by launches."""
    return profile_methods(ProfileSettings("benchmarks/configs/launch-bound", dtype="bfloat16",
                                           methods=("lora", "queryable", "instr-queryable"),
                                           batch=2, seq=8, repeats=1, warmup=0, threads=1,
                                           skip=frozenset({"decode", "train"})))


@pytest.mark.parametrize("method", ["queryable", "instr-queryable"])
def test_routing_launches_within_issue_15s_targets(launch_bound, method):
    """Issue 15's GPU targets, as kernels on the config that stands for a launch-bound GPU:
    forward <= 1.00x PEFT LoRA, training step <= 1.05x (before the stacked Q/K/V GEMM and the
    scale on the mixer, the training step counted 1.18x, and an H200 measured 1.19-1.22x)."""
    m = launch_bound.methods[method]
    assert m.kernels_ratio <= 1.00
    assert m.train_kernels_ratio <= 1.05
