"""The command line: one clear line for bad input (exit 2), real work otherwise."""

from __future__ import annotations

import json

import pytest
from transformers import Qwen2Config

from qlsearch.cli import main


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_params_table_as_json(tmp_path, capsys):
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "params", "--model", str(tmp_path), "--r", "4", "--methods", "lora,queryable",
                       "--json")
    rows = {row["method"]: row for row in json.loads(out)}
    # q, k, v, o, gate, up, down: r (d_in + d_out) each, 4 layers
    per_layer = (64 + 64) + (64 + 32) + (64 + 32) + (64 + 64) + (64 + 128) + (64 + 128) + (128 + 64)
    assert code == 0 and rows["lora"]["trainable"] == 4 * 4 * per_layer


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["params", "--model", "/no/such/model"], "--model: cannot read a config"),
     (["params", "--model", "x", "--methods", "lora,qlora"], "unknown adapter 'qlora'"),
     (["status", "nothing-here", "--root", "/tmp/qlsearch-no-root"], "no study 'nothing-here'"),
     (["trial", "/no/such/trial.toml"], "/no/such/trial.toml"),
     (["sweep", "/no/such/study.toml"], "does not exist")],
)
def test_bad_input_is_one_clear_line(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


def test_trial_command_writes_the_record(tmp_path, capsys):
    trial = tmp_path / "t.toml"
    trial.write_text(f"""
method = "lora"
knobs = {{r = 2}}
profile = false
cache_dir = "{tmp_path / 'cache'}"
[task]
kind = "synthetic"
name = "matyas"
backbone = "mlp"
[train]
epochs = 2
pretrain_epochs = 1
batch_size = 200
""")
    code, out, err = run(capsys, "trial", str(trial), "--out", str(tmp_path / "record.json"))
    summary = json.loads(out)
    assert code == 0 and summary["status"] == "completed" and "epoch 2:" in err
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["config"]["method"] == "lora" and record["metrics"]["best_test_mse"] >= 0
