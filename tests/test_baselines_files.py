"""The declarative baseline files agree with the registry and with the paper."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from qlsearch.adapters import list_methods
from qlsearch.baselines import BASELINES_DIR, baseline, paper_table, paper_tables

METHODS = list_methods()

#: Columns of each paper table, and which of them are numeric.
TABLES = {
    1: ("table01_synthetic_train_mse", ["function", "method", "mean", "std"], ["mean", "std"]),
    2: ("table02_synthetic_test_mse", ["function", "method", "mean", "std"], ["mean", "std"]),
    3: ("table03_general", ["task", "model", "method", "metric", "value"], ["value"]),
    4: ("table04_math", ["task", "model", "method", "metric", "value"], ["value"]),
    5: ("table05_inference", ["measurement", "method", "value"], ["value"]),
    6: (
        "table06_parameters",
        ["method", "trainable_params", "routing", "instruction"],
        ["trainable_params"],
    ),
    7: (
        "table07_arc",
        ["method", "train_acc_mean", "train_acc_std", "eval_acc_mean", "eval_acc_std"],
        ["train_acc_mean", "train_acc_std", "eval_acc_mean", "eval_acc_std"],
    ),
    8: (
        "table08_instruction_ablation",
        ["ablation", "best_eval_acc", "mean_eval_sec", "latency_per_sample"],
        ["best_eval_acc", "mean_eval_sec", "latency_per_sample"],
    ),
    9: ("table09_deep_train_mse", ["function", "method", "mean", "std"], ["mean"]),
    10: ("table10_deep_test_mse", ["function", "method", "mean", "std"], ["mean"]),
    11: ("table11_small_models", ["task", "model", "method", "metric", "value"], ["value"]),
}
ROWS = {1: 54, 2: 54, 3: 35, 4: 35, 5: 28, 6: 11, 7: 5, 8: 7, 9: 63, 10: 63, 11: 117}
#: Method names the registry lacks, as the tables spell them.
EXTRA_METHODS = {"text-to-lora", "doc-to-lora", "soap_full_ft"}


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.name)
def test_every_method_has_a_toml_with_the_registry_defaults(method):
    entry = baseline(method.name)
    assert entry["name"] == method.name
    for key in ("summary", "parameter_formula"):
        assert isinstance(entry[key], str) and entry[key].strip(), key
    citation = entry["citation"]
    assert citation.get("authors") and citation.get("title") and citation.get("year"), citation
    assumptions = entry["assumptions"]
    assert isinstance(assumptions, list) and assumptions and all(a.strip() for a in assumptions)
    defaults = entry["defaults"]
    assert set(defaults) <= set(method.knobs), (
        f"knobs the registry lacks: {set(defaults) - set(method.knobs)}"
    )
    expected = {k: v for k, v in method.knobs.items() if v is not None}
    # None-valued knobs may be left out, or spelled as what None resolves to
    assert {k: defaults.get(k) for k in expected} == expected


def test_unknown_baseline_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed:.*lora"):
        baseline("loar")
    with pytest.raises(ValueError, match="unknown method"):
        baseline("../pyproject")


def test_every_toml_belongs_to_a_registered_method():
    names = {m.name for m in METHODS}
    assert {p.stem for p in BASELINES_DIR.glob("*.toml")} <= names


def test_the_paper_folder_holds_exactly_tables_1_to_11():
    assert {n: p.stem for n, p in paper_tables().items()} == {n: t[0] for n, t in TABLES.items()}
    assert (BASELINES_DIR / "paper" / "README.md").is_file()


@pytest.mark.parametrize("number", sorted(TABLES))
def test_paper_table_columns_and_numbers(number):
    name, columns, numeric = TABLES[number]
    df = paper_table(number)
    assert list(df.columns) == columns
    assert len(df) == ROWS[number]
    for col in numeric:
        assert pd.api.types.is_numeric_dtype(df[col]), col
        assert df[col].notna().all(), col
    text = [c for c in columns if c not in numeric and c != "std"]
    assert df[text].notna().all().all()
    key = [
        c
        for c in columns
        if c in ("function", "task", "model", "method", "measurement", "ablation", "metric")
    ]
    assert not df.duplicated(key).any()
    registry = {m.name for m in METHODS}
    if "method" in df:
        assert set(df["method"]) <= registry | EXTRA_METHODS
    assert df.equals(paper_table(name)) and df.equals(paper_table(f"{name}.csv"))


def test_paper_table_rejects_unknown_tables():
    for bad in (0, 12, "table06_params", "nope"):
        with pytest.raises(ValueError, match="allowed: 1 "):
            paper_table(bad)


def _cell(number, column, **where):
    df = paper_table(number)
    for k, v in where.items():
        df = df[df[k] == v]
    assert len(df) == 1, where
    return df[column].iloc[0]


def test_spot_checks_against_the_paper():
    assert _cell(6, "trainable_params", method="lora") == 4399104
    assert _cell(6, "trainable_params", method="instr-queryable") == 4456936
    assert _cell(6, "routing", method="replora") == "Shared static"
    assert _cell(1, "mean", function="dropwave", method="queryable") == 0.2527
    assert _cell(1, "std", function="dropwave", method="queryable") == 0.1777
    assert _cell(1, "mean", function="levy", method="dora") == 0.01388
    assert _cell(2, "mean", function="styblinski_tang", method="hyra") == 30586.1356
    assert _cell(3, "value", task="gpqa_diamond", method="instr-queryable") == 0.323
    assert (
        _cell(4, "value", task="math", model="mistralai/Mistral-7B-v0.1", method="instr-queryable")
        == 0.158
    )
    assert _cell(5, "value", measurement="forward_prefill_latency_ms", method="queryable") == 42.3
    assert _cell(5, "value", measurement="forward_overhead_vs_lora_pct", method="dora") == -8.4
    assert _cell(7, "eval_acc_mean", method="lily") == 0.6406
    assert _cell(8, "best_eval_acc", ablation="correct_instruction") == 0.3125
    assert math.isinf(_cell(9, "mean", function="styblinski_tang", method="hyra"))
    assert _cell(9, "mean", function="dropwave", method="soap_full_ft") == 0.582
    assert _cell(10, "mean", function="rastrigin", method="replora") == 108.48
    assert (
        _cell(
            11, "value", task="arc_challenge", model="ibm-granite/granite-4.0-350m", method="lora"
        )
        == 48.4
    )


def test_table11_matches_the_papers_own_summary():
    """§4.2: queryable variants equal or exceed LoRA in 34 of 39 (task, model) cases."""
    wide = paper_table(11).pivot(index=["task", "model"], columns="method", values="value")
    assert len(wide) == 39
    assert (wide[["queryable", "instr-queryable"]].max(axis=1) >= wide["lora"]).sum() == 34


def test_queryable_toml_count_matches_the_formula():
    from qlsearch.adapters.queryable import QueryableConfig, parameter_count

    qwen = [
        (896, 896),
        (896, 128),
        (896, 128),
        (896, 896),
        (896, 4864),
        (896, 4864),
        (4864, 896),
    ] * 24
    for name, config in (("queryable", QueryableConfig()),
                         ("instr-queryable", QueryableConfig(tau_lang=1.0, lambda_ctx=1.0))):
        entry = baseline(name)
        assert entry["params_qwen2_5_0_5b_r8"] == parameter_count(config, qwen)
        assert entry["params_table_6"] == _cell(6, "trainable_params", method=name)
