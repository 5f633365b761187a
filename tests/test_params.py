"""Table 6 style parameter counts on the meta device (no weights allocated, nothing downloaded)."""

from __future__ import annotations

import pytest
from transformers import Qwen2Config

from qlsearch.adapters.queryable import QueryableConfig, parameter_count
from qlsearch.params import format_table, parameter_table


@pytest.fixture(scope="module")
def qwen05b(tmp_path_factory):
    """The Qwen2.5-0.5B architecture (shapes only)."""
    path = tmp_path_factory.mktemp("qwen2.5-0.5b")
    Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True).save_pretrained(path)
    return str(path)


def test_lora_matches_the_papers_table6_at_qwen05b(qwen05b):
    rows = {row.method: row for row in parameter_table(qwen05b, ["lora", "dora", "queryable"], r=8)}
    assert rows["lora"].trainable == 4_399_104  # Table 6
    # DoRA adds one magnitude per output row of every adapted projection
    assert rows["dora"].trainable - rows["lora"].trainable == 24 * (896 + 128 + 128 + 896 + 4864 + 4864 + 896)
    shapes = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)] * 24
    assert rows["queryable"].trainable == parameter_count(QueryableConfig(r=8), shapes)
    assert rows["queryable"].routing == "Yes" and rows["queryable"].instruction == "No"
    assert rows["lora"].total == rows["lora"].trainable + 494_032_768  # the frozen 0.5B model


def test_table_lists_every_method(qwen05b):
    text = format_table(parameter_table(qwen05b, ["lora", "instr-queryable"], r=4))
    assert "instr-queryable" in text and "Yes" in text and "Trainable params" in text


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--model: cannot read a config"):
        parameter_table(str(tmp_path / "missing"), ["lora"])


QWEN05B = "benchmarks/configs/qwen2.5-0.5b"
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: (d_in, d_out) of the seven projections of one Qwen2.5-0.5B layer; 24 layers; head width 64
LAYER = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)]


def _expected(method: str, r: int = 8) -> int:
    """Each method's count from its own formula (PEFT's layer shapes for PEFT's methods)."""
    from qlsearch.adapters import doran, hyra, moelora, replora

    shapes = LAYER * 24
    lora = sum(r * (d_in + d_out) for d_in, d_out in shapes)
    if method == "lora":
        return lora
    if method == "dora":
        return lora + sum(d_out for _, d_out in shapes)
    if method == "lily":  # A per layer (stride_A = 1); one B bank (num_B = 2) per target; router per layer
        return sum(d_in * r for d_in, _ in shapes) + sum(d_out * 2 * r for _, d_out in LAYER) + len(shapes) * r * 2
    if method == "vblora":  # bank 256 x 64; logits r x (d / 64) x 256 for A and B
        return 256 * 64 + sum(r * 256 * (d_in + d_out) // 64 for d_in, d_out in shapes)
    if method == "replora":
        return replora.parameter_count(replora.RepLoRAConfig(r=r), [LAYER] * 24)
    if method == "doran":
        return doran.parameter_count(doran.DoRANConfig(r=r), [LAYER] * 24)
    if method == "hyra":  # heads = out_features / 64 on every linear
        return hyra.parameter_count(hyra.HyRAConfig(r=r), [(i, o, o // 64) for i, o in shapes])
    if method == "moelora":
        return moelora.parameter_count(moelora.MoELoRAConfig(r=r), shapes)
    instructed = method == "instr-queryable"
    return parameter_count(QueryableConfig(r=r, tau_lang=float(instructed), lambda_ctx=float(instructed)), shapes)


@pytest.mark.parametrize("method", ["lora", "dora", "lily", "vblora", "replora", "hyra", "doran", "moelora",
                                    "queryable", "instr-queryable"])
def test_every_method_adapts_all_seven_projections_at_qwen05b(method):
    """On the meta device, every built-in method adapts q, k, v, o, gate, up and down of all 24
    layers (HyRA too: 76 heads of 64 on the 4864-wide gate/up), and counts what its formula says."""
    (row,) = parameter_table(QWEN05B, [method], r=8)
    assert row.targets == SEVEN
    assert row.trainable == _expected(method)


def test_a_method_that_cannot_adapt_a_target_says_so(qwen05b):
    with pytest.raises(ValueError, match="--target-modules: hyra cannot adapt"):
        parameter_table(qwen05b, ["hyra"], target_modules=["gate_proj"], num_heads=14)  # 14 does not divide 4864
