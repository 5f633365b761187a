"""The profile benchmark: every field for every method, exact ratios to LoRA, parameter
formulas, and clear CLI errors. Nothing timed is asserted: timings are only checked
to exist and be positive."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from qlsearch.adapters.queryable import QueryableConfig, parameter_count
from qlsearch.cli import main
from qlsearch.profiling import (
    FROZEN,
    MethodProfile,
    ProfileSettings,
    format_markdown,
    machine_tag,
    profile_methods,
)
from qlsearch.profiling._subjects import build_base, build_subjects
from qlsearch.profiling._timing import Clock, timed_rounds, warm_up

HIDDEN, INTER, KV, LAYERS = 32, 64, 16, 4  # KV = num_key_value_heads (2) x head_dim (8)
METHODS = ("lora", "dora", "queryable", "instr-queryable")
QUERYABLE = {"num_atoms": 8, "top_k": 2, "num_blocks": 2}
# one thread: a test run beside other work must not oversubscribe the cores
FAST = {"batch": 2, "seq": 4, "new_tokens": 3, "repeats": 2, "warmup": 1, "threads": 1, **QUERYABLE}
# (d_in, d_out) of q, k, v, o, gate, up, down in one layer
SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN),
          (HIDDEN, INTER), (HIDDEN, INTER), (INTER, HIDDEN)] * LAYERS


def write_config(path, cls=Qwen2Config) -> str:
    cls(vocab_size=96, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> str:
    return write_config(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def result(qwen):
    return profile_methods(ProfileSettings(qwen, methods=METHODS, **FAST))


def test_every_method_has_every_field(result):
    fields = {f.name for f in dataclasses.fields(MethodProfile)}
    data = json.loads(json.dumps(result.as_dict()))
    # LoRA merged is LoRA's extra row on a float32 model (every precision is the same there)
    assert list(data["methods"]) == [FROZEN, "lora", "lora@merged", *METHODS[1:]]
    for name, row in data["methods"].items():
        assert set(row) == fields, name
    assert {"cpu", "torch", "torch_threads", "gpu"} <= set(data["machine"])
    assert data["settings"]["methods"] == list(data["methods"])
    assert data["settings"]["timer"] == "time.perf_counter"


def test_lora_ratios_are_exactly_one_and_all_ratios_positive(result):
    lora = result.methods["lora"]
    assert lora.forward_ratio == lora.decode_ratio == lora.train_ratio == 1.0
    for name, m in result.methods.items():
        assert m.forward_ms > 0 and m.forward_ratio > 0 and m.prefill_ms > 0, name
        assert m.decode_tokens_per_s is None or m.decode_ratio > 0, name
        spread = m.forward_ms_spread
        assert spread["min"] <= spread["q25"] <= m.forward_ms <= spread["q75"] <= spread["max"]
        if name not in (FROZEN, "lora@merged"):  # nothing trainable in either
            assert m.train_step_ms > 0 and m.train_ratio > 0, name


def test_overhead_is_measured_against_the_frozen_model(result):
    frozen = result.methods[FROZEN]
    assert frozen.overhead_ms == 0.0 and frozen.train_step_ms is None  # nothing to train
    for m in result.methods.values():
        assert m.overhead_ms == m.forward_ms - frozen.forward_ms


def test_parameter_counts_follow_the_formulas(result):
    base = result.methods[FROZEN].total_params
    lora = sum(8 * (d_in + d_out) for d_in, d_out in SHAPES)
    dora = lora + sum(d_out for _, d_out in SHAPES)  # one magnitude per output row
    queryable = parameter_count(QueryableConfig(r=8, **QUERYABLE), SHAPES)
    instructed = parameter_count(QueryableConfig(r=8, tau_lang=1.0, lambda_ctx=1.0, **QUERYABLE), SHAPES)
    expected = {FROZEN: 0, "lora": lora, "lora@merged": 0, "dora": dora, "queryable": queryable,
                "instr-queryable": instructed}
    for name, m in result.methods.items():
        assert m.trainable_params == expected[name], name
        assert m.total_params == base + expected[name], name
        assert m.adapter_bytes == 4 * expected[name]  # float32


def test_peak_memory_is_null_on_cpu_not_invented(result):
    assert all(m.peak_memory_bytes is None for m in result.methods.values())
    assert result.settings["peak_memory"].startswith("null")


def test_llama_counts_and_skipped_phases_are_null(tmp_path):
    path = write_config(tmp_path, LlamaConfig)
    out = profile_methods(ProfileSettings(path, methods=("lora",), skip=frozenset({"decode", "train"}),
                                          r=4, **{**FAST, "repeats": 1}))
    lora = out.methods["lora"]
    assert lora.trainable_params == sum(4 * (d_in + d_out) for d_in, d_out in SHAPES)
    assert lora.decode_tokens_per_s is lora.decode_ratio is lora.prefill_ms is None
    assert lora.train_step_ms is lora.train_ratio is lora.train_step_ms_spread is None


def test_adapted_copies_share_the_frozen_weights_and_leave_the_base_alone(qwen):
    settings = ProfileSettings(qwen, methods=("lora", "queryable"), **FAST)
    base = build_base(settings)
    before = {n: p.data_ptr() for n, p in base.named_parameters()}
    subjects = build_subjects(base, settings)
    assert {n: p.data_ptr() for n, p in base.named_parameters()} == before
    assert not any("lora" in n for n, _ in base.named_parameters())
    shared = set(before.values())
    for s in subjects[1:]:
        frozen = {p.data_ptr() for p in s.model.parameters() if not p.requires_grad}
        if s.name == "lora@merged":  # the merged linears are its own copies; the rest is shared
            copied = {n for n in before if n.endswith(".weight") and n.rsplit(".", 2)[-2] in s.targets}
            assert frozen & shared == {before[n] for n in before if n not in copied}
            assert len(frozen - shared) == len(copied)
        else:
            assert frozen == shared, s.name


def test_rounds_call_each_method_once_and_no_method_always_follows_the_same_one():
    order: list[str] = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abcd"}
    warm_up(calls, rounds=1)
    assert order == list("abcd")
    order.clear()
    samples = timed_rounds(calls, Clock("cpu"), repeats=12)
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert all(sorted(r) == list("abcd") for r in rounds)
    assert all(len(x) == 12 for x in samples.values())
    before = {name: {r[r.index(name) - 1] for r in rounds if r.index(name) > 0} for name in "abcd"}
    assert all(len(b) >= 2 for b in before.values()), before  # a rotated fixed order gives 1 each
    order.clear()
    timed_rounds(calls, Clock("cpu"), repeats=12)
    assert [order[i:i + 4] for i in range(0, len(order), 4)] == rounds  # reproducible


def test_machine_tag_is_a_file_name():
    tag = machine_tag({"cpu": "Intel(R) Xeon(R) CPU @ 2.20GHz", "torch_threads": 2, "gpu": None})
    assert tag == "cpu-intel-xeon-cpu-2.20ghz-2t"
    assert machine_tag({"gpu": {"name": "NVIDIA H100 80GB HBM3"}}) == "cuda-nvidia-h100-80gb-hbm3"


def test_cli_prints_json_and_writes_json_and_markdown(qwen, tmp_path, capsys):
    argv = ["profile", "--model", qwen, "--methods", "lora", "--batch", "1", "--seq", "2",
            "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--num-blocks", "2",
            "--skip", "train", "--threads", "1", "--json", "--out", str(tmp_path), "--tag", "here"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed["methods"]) == [FROZEN, "lora", "lora@merged"]
    assert json.loads((tmp_path / "here.json").read_text())["methods"].keys() == printed["methods"].keys()
    markdown = (tmp_path / "here.md").read_text()
    assert "| lora |" in markdown and "| frozen |" in markdown


@pytest.mark.parametrize(("args", "option", "allowed"), [
    (["--methods", "lora,qeryable"], "--methods", "queryable"),
    (["--dtype", "fp8"], "--dtype", "bfloat16"),
    (["--precision", "fp32"], "--precision", "choose from 'mixed', 'model'"),
    (["--skip", "forward"], "--skip", "decode, train"),
    (["--repeats", "0"], "--repeats", "an integer >= 1"),
    (["--num-blocks", "9"], "--num-blocks", "allowed"),
    pytest.param(["--device", "cuda"], "--device", "cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_cli_input_exits_2_naming_the_option(qwen, capsys, args, option, allowed):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--model", qwen, "--repeats", "1", "--warmup", "0", "--threads", "1", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert option in err and allowed in err and "Traceback" not in err


@pytest.mark.slow
def test_compiled_models_do_not_recompile_while_timed(qwen):
    """Under --compile the samples must time the compiled graphs, not the compiler."""
    out = profile_methods(ProfileSettings(qwen, methods=("lora", "queryable"), compile=True,
                                          skip=frozenset({"decode"}), **{**FAST, "warmup": 3}))
    assert out.settings["compiles_while_timing"] == 0
    assert out.settings["compiled_phases"] == ["forward", "train"]  # decode skipped
    # compiling is timed apart: each model's first forward (and training step) of the warm-up
    for name, m in out.methods.items():
        assert m.forward_compile_s > 0, name
        if name in ("lora", "queryable"):  # the others have nothing to train
            assert m.train_compile_s > 0, name
        else:
            assert m.train_compile_s is None, name
    assert "Compiling, the first forward of each model (warm-up, not timed): frozen " in format_markdown(out)


@pytest.mark.slow
def test_compiled_decoding_uses_the_static_cache_and_does_not_recompile_while_timed(qwen):
    """Under --compile every method decodes with transformers' static cache and its compiled
    decode step (inductor, on this CPU too); the samples time the compiled steps."""
    out = profile_methods(ProfileSettings(qwen, methods=("lora", "queryable"), compile=True,
                                          skip=frozenset({"train", "flops"}), **{**FAST, "warmup": 2}))
    assert out.settings["compiles_while_timing"] == 0
    assert out.settings["compiled_phases"] == ["forward", "decode"]  # train skipped
    assert out.settings["decode_cache"].startswith("static")
    for name, m in out.methods.items():  # (a rate may be None: 2 repeats of 2 decode steps can be all noise)
        assert m.decode_compile_s > 0 and m.prefill_ms > 0, name
    assert "queryable " in format_markdown(out) and "(generate " in format_markdown(out)


def test_compile_times_are_null_without_compiling(result):
    assert all(m.forward_compile_s is None and m.train_compile_s is None and m.decode_compile_s is None
               for m in result.methods.values())
    assert "Compiling" not in format_markdown(result)


def test_an_in_place_gemm_counts_its_flops():
    """``C.addmm_(A, B)`` with A (4 x 3), B (3 x 5): 4 * 5 dot products of length 3, 2 FLOPs per
    multiply-add, as the counter scores ``addmm``."""
    from qlsearch.profiling._flops import count_flops

    counted = count_flops(lambda: torch.zeros(4, 5).addmm_(torch.ones(4, 3), torch.ones(3, 5)))
    assert counted["matmul_flops"] == 2 * 4 * 5 * 3


def test_the_markdown_states_queryables_implementation_advantage(result):
    text = format_markdown(result)
    assert "Implementation, queryable: its layers run one GEMM" in text
    assert "Implementation, instr-queryable:" in text and "Implementation, lora" not in text


def test_flops_count_attention_and_the_routing_arithmetic(result):
    """Eager attention for the count (SDPA on CPU scores 0); the routing's softmax, top-k and
    norms are counted, so the queryable adapter costs more FLOPs than LoRA, the frozen model fewer."""
    flops = {name: m.flops for name, m in result.methods.items()}
    assert result.methods["lora"].flops_ratio == 1.0
    assert flops[FROZEN] < flops["lora"] < flops["queryable"]


def test_trace_writes_a_chrome_trace_per_method(qwen, tmp_path):
    settings = ProfileSettings(qwen, methods=("lora", "queryable"), batch=1, seq=2, repeats=1,
                               warmup=0, threads=1, skip=frozenset({"decode", "train", "flops"}),
                               trace=str(tmp_path / "traces"), **QUERYABLE)
    profile_methods(settings)
    for name in (FROZEN, "lora", "queryable"):
        (trace,) = (tmp_path / "traces" / name).glob("*.pt.trace.json")
        assert json.loads(trace.read_text())["traceEvents"]


def test_bf16_rows_state_precision_targets_and_form(qwen):
    """Every row says how it stores and computes, what it adapts and the form it was timed in;
    LoRA also appears merged, under PEFT's own default, and under the other policy."""
    methods = ("lora", "dora", "replora", "hyra", "doran", "moelora", "queryable", "instr-queryable")
    out = profile_methods(ProfileSettings(qwen, methods=methods, dtype="bfloat16",
                                          skip=frozenset({"decode", "train", "flops"}), **{**FAST, "repeats": 1}))
    rows = out.methods
    assert list(rows) == [FROZEN, "lora", "lora@merged", "lora@peft-default", "lora@model", *methods[1:]]
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, m in rows.items():
        if name == FROZEN:
            assert (m.adapter_dtype, m.compute_dtype, m.targets, m.form) == (None, "bfloat16", [], "frozen")
            continue
        assert m.targets == seven, name
        expected = {"lora@peft-default": ("float32", "float32"), "lora@model": ("bfloat16", "bfloat16")}
        assert (m.adapter_dtype, m.compute_dtype) == expected.get(name, ("float32", "bfloat16")), name
    forms = {name: m.form for name, m in rows.items()}
    assert forms == {FROZEN: "frozen", "lora": "unmerged", "lora@merged": "merged",
                     "lora@peft-default": "unmerged", "lora@model": "unmerged", "dora": "unmerged",
                     "replora": "folded", "hyra": "folded", "doran": "folded", "moelora": "routed",
                     "queryable": "routed", "instr-queryable": "routed"}
    assert out.settings["precision"] == "mixed"


def test_every_ratio_is_also_given_to_the_frozen_model(result):
    frozen = result.methods[FROZEN]
    assert frozen.forward_ratio_frozen == frozen.flops_ratio_frozen == 1.0
    for name, m in result.methods.items():
        assert m.forward_ratio_frozen == pytest.approx(m.forward_ms / frozen.forward_ms), name
        assert m.flops_ratio_frozen == pytest.approx(m.flops / frozen.flops), name
        # two repeats: noise can leave a decode rate null (t(N) - t(1) <= 0); then so is its ratio
        if m.decode_tokens_per_s is None or frozen.decode_tokens_per_s is None:
            assert m.decode_ratio_frozen is None, name
        else:
            assert m.decode_ratio_frozen == pytest.approx(
                m.decode_tokens_per_s / frozen.decode_tokens_per_s), name


def test_the_frozen_model_has_no_training_step_in_its_peak_memory(qwen):
    """On CUDA the peak-memory step once built an AdamW over the frozen model's (no) parameters."""
    from qlsearch.profiling._subjects import peak_phases

    settings = ProfileSettings(qwen, methods=("lora",), **FAST)
    frozen, lora, merged = build_subjects(build_base(settings), settings)
    assert merged.name == "lora@merged"
    with pytest.raises(ValueError, match="empty parameter list"):
        torch.optim.AdamW(frozen.trainable)  # what the old code did
    assert peak_phases(frozen, train=True) == ("forward",)
    assert peak_phases(lora, train=True) == ("forward", "train")
    assert peak_phases(lora, train=False) == ("forward",)
    assert peak_phases(merged, train=True) == ("forward",)  # merged: nothing left to train
