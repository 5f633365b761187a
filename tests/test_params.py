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
