"""``qlsearch profile --model mlp|transformer``: the synthetic backbones profiled like an HF
config, every linear in their layers adapted; they do not generate, so decode is null."""

from __future__ import annotations

import json

import pytest

from qlsearch.adapters.queryable import QueryableConfig, parameter_count
from qlsearch.cli import main
from qlsearch.profiling import FROZEN

# (d_in, d_out) of each adapted linear: the deep MLP's 32 layers of width 32 (the first from
# 2 coordinates); the transformer's 8 layers of q, k, v, o (256 -> 256), up (256 -> 1024), down.
SHAPES = {"mlp": [(2, 32)] + [(32, 32)] * 31,
          "transformer": [(256, 256)] * 4 * 8 + [(256, 1024), (1024, 256)] * 8}
KNOBS = {"num_atoms": 8, "top_k": 2, "num_blocks": 2}


@pytest.mark.parametrize("model", ["mlp", "transformer"])
def test_profile_runs_on_a_synthetic_backbone(model, capsys):
    argv = ["profile", "--model", model, "--methods", "lora,queryable", "--batch", "4",
            "--repeats", "2", "--warmup", "1", "--threads", "1", "--num-atoms", "8",
            "--top-k", "2", "--num-blocks", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["methods"]
    assert list(rows) == [FROZEN, "lora", "lora@merged", "queryable"]
    lora = sum(8 * (d_in + d_out) for d_in, d_out in SHAPES[model])
    queryable = parameter_count(QueryableConfig(r=8, **KNOBS), SHAPES[model])
    assert rows["lora"]["trainable_params"] == lora
    assert rows["queryable"]["trainable_params"] == queryable
    for name, row in rows.items():
        assert row["forward_ratio"] > 0 and row["forward_ratio_frozen"] > 0, name
        assert row["decode_tokens_per_s"] is row["decode_ratio_frozen"] is None, name  # no generate
        assert row["flops"] > 0, name
        if name not in (FROZEN, "lora@merged"):  # nothing trainable in either
            assert row["train_step_ms"] > 0, name
    assert rows["lora"]["forward_ratio"] == 1.0
    assert out["settings"]["target_modules"] == (["linear"] if model == "mlp" else
                                                 ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
