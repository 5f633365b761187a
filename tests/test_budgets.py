"""Budgets a user can predict, and GPUs that are there or said to be missing.

A budget is capped at the number of distinct configurations where that is finite
(counted here by brute force over the space, independently of ``MethodSpace.size``);
a sampled configuration the study already has is never run again; a study that asks
for GPUs where Ray sees none fails, unless it allows the CPU fallback, which is then
recorded and shown.
"""

from __future__ import annotations

import itertools
import json

import optuna
import pytest

from qlsearch.cli import main
from qlsearch.study import parse_study

ray = pytest.importorskip("ray")
from tests.test_search import ray_session  # noqa: E402,F401  (one local Ray for the module)

TASK = {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"}
TRAIN = {"epochs": 1, "pretrain_epochs": 1, "batch_size": 200}


def study(**changes):
    data = {"name": "budget", "objectives": ["val_mse", "trainable_params"], "task": TASK, "train": TRAIN,
            "space": {"queryable": {"r": [2, 4], "num_atoms": [2, 4], "top_k": [1, 2, 4]}}}
    return parse_study({**data, **changes})


def brute_force(values: dict[str, list]) -> int:
    """Configurations of ``values`` (one list per knob) with top_k <= num_atoms."""
    names = list(values)
    return sum(1 for combo in itertools.product(*values.values())
               if (k := dict(zip(names, combo, strict=True))).get("top_k", 0) <= k.get("num_atoms", 16))


def test_a_budget_is_capped_at_the_distinct_configurations():
    big = study(num_trials=10**12)
    distinct = brute_force({"r": [2, 4], "num_atoms": [2, 4], "top_k": [1, 2, 4]})
    assert distinct == 10
    budget = big.budget()
    assert (budget.total, budget.asked) == (distinct, 10**12)
    assert budget.note.startswith(f"budget {10**12} capped at {distinct} distinct configurations")
    assert study(num_trials=4).budget() == type(budget)(4, {}, 4, "")  # below the cap: as asked
    # a baseline inside the space is one of its configurations: it is not run twice
    inside = study(num_trials=100, baselines=[{"method": "queryable", "knobs": {"r": 2, "num_atoms": 2, "top_k": 1}}])
    assert inside.budget().total == distinct - 1
    outside = study(num_trials=100, baselines=[{"method": "queryable", "knobs": {"r": 8}}])
    assert outside.budget().total == distinct


def test_ranges_count_when_they_are_finite_and_per_method_budgets_are_capped_each():
    ints = study(num_trials=50, space={"queryable": {"r": {"low": 2, "high": 8, "step": 2}, "top_k": [1, 2]},
                                       "lora": {"r": {"low": 1, "high": 3}}})
    assert ints.budget().total == brute_force({"r": [2, 4, 6, 8], "top_k": [1, 2]}) + 3 == 11
    continuous = study(num_trials=50, space={"queryable": {"tau_lang": {"low": 0.1, "high": 1.0}}})
    assert continuous.budget().total == 50 and not continuous.budget().note
    per_method = parse_study({"name": "per", "objectives": ["val_mse"], "task": TASK, "trials_per_method": 5,
                              "space": {"queryable": {"r": [2, 4, 8]}, "lora": {"r": [2, 4, 8, 16, 32, 64]}}})
    budget = per_method.budget()
    assert budget.per_method == {"queryable": 3, "lora": 5} and budget.total == 8
    assert "capped at 8" in budget.note


def write(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\nobjectives = ["val_mse"]\ncache_dir = "{tmp_path / "cache"}"\n'
                    f'{body}\n[task]\nkind = "synthetic"\nname = "sin_cos"\nbackbone = "mlp"\n'
                    "[train]\nepochs = 1\npretrain_epochs = 1\nbatch_size = 200\n")
    return path


def sweep(capsys, path, root):
    try:
        code = main(["sweep", str(path), "--root", str(root), "--quiet"])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr()


def swept(capsys, tmp_path, name: str, body: str):
    """Sweep study ``name`` (``write``'s file with ``body``) to the end; its Optuna study and
    its COMPLETE trials."""
    code, out = sweep(capsys, write(tmp_path, name, body), tmp_path / "runs")
    assert code == 0, out.err
    ot = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'runs' / name / 'study.db'}")
    return ot, [t for t in ot.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.usefixtures("ray_session")
def test_trials_never_repeat_a_configuration(tmp_path, capsys):
    """TPE's random start-up over 4 configurations repeats some; each repeat is replaced by one
    the study has not run, so the 4 trials cover the space."""
    ot, complete = swept(capsys, tmp_path, "norepeat", 'num_trials = 4\nprofile = false\n[space.lora]\n'
                         "r = [1, 2, 3, 4]\n[resources]\nmax_concurrent = 1")
    assert sorted(t.user_attrs["knobs"]["r"] for t in complete) == [1, 2, 3, 4]
    repeats = ot.get_trials(states=[optuna.trial.TrialState.PRUNED])
    assert repeats, "the seeded sampler repeated no configuration: this test proves nothing"
    for t in repeats:  # never run: no record
        assert t.user_attrs["failure"].startswith("repeat: trial ") and "record_dir" not in t.user_attrs


@pytest.mark.usefixtures("ray_session")
def test_a_shared_budget_moves_a_repeat_to_a_method_with_configurations_left(tmp_path, capsys):
    """With one budget for every method (num_trials), the sampler picks the method too: once
    LoRA's single configuration has run, sampling LoRA again must not run it twice while
    DoRA's configurations wait. The 6 trials cover the 6 configurations."""
    ot, complete = swept(capsys, tmp_path, "shared", 'num_trials = 6\nprofile = false\n[space.lora]\nr = [1]\n'
                         "[space.dora]\nr = [1, 2, 3, 4, 5]\n[resources]\nmax_concurrent = 1")
    ran = sorted((t.user_attrs["method"], t.user_attrs["knobs"]["r"]) for t in complete)
    assert ran == [*(("dora", r) for r in range(1, 6)), ("lora", 1)]
    moved = [t for t in ot.get_trials(states=[optuna.trial.TrialState.PRUNED]) if t.user_attrs["method"] == "lora"]
    assert moved, "the seeded sampler never drew LoRA twice: this test proves nothing"


@pytest.mark.usefixtures("ray_session")
def test_gpus_asked_where_ray_sees_none(tmp_path, capsys):
    if ray.cluster_resources().get("GPU"):
        pytest.skip("this machine has a GPU")
    root = tmp_path / "runs"
    refused = write(tmp_path, "gpus", "num_trials = 1\n[space.lora]\nr = 2\n[resources]\ngpus_per_trial = 1")
    code, out = sweep(capsys, refused, root)
    assert code == 2
    assert out.err.splitlines()[-1] == (f"qlsearch sweep: error: {refused}: resources.gpus_per_trial: got 1, but Ray "
                                        "sees no GPU in this cluster; allowed: 0, a cluster with GPUs, or "
                                        "resources.cpu_fallback = true to run on CPU")
    # allowed to fall back: a single-point space asked for 5 trials runs once, and every place says so
    allowed = write(tmp_path, "fallback", "num_trials = 5\nprofile = false\n[space.lora]\nr = 2\n"
                                          "[resources]\ngpus_per_trial = 0.5\ncpu_fallback = true")
    code, out = sweep(capsys, allowed, root)
    assert code == 0, out.err
    assert "warning: fallback: budget 5 capped at 1 distinct configurations" in out.err
    ot = optuna.load_study(study_name="fallback", storage=f"sqlite:///{root / 'fallback' / 'study.db'}")
    (trial,) = ot.get_trials()
    reason = "resources.gpus_per_trial = 0.5 but Ray saw no GPU: ran on CPU (resources.cpu_fallback = true)"
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert ot.user_attrs["cpu_fallback"] == trial.user_attrs["cpu_fallback"] == reason
    (seed0,) = (root / "fallback" / "trials").glob("*/seed0.json")
    record = json.loads(seed0.read_text())
    assert record["cpu_fallback"] == reason
    assert main(["status", "fallback", "--root", str(root)]) == 0
    text = capsys.readouterr().out
    assert f"resources: {reason}" in text and "note: budget 5 capped at 1 distinct configurations" in text
    assert main(["report", str(allowed), "--root", str(root), "--out", str(tmp_path / "reports")]) == 0
    page = (tmp_path / "reports" / "fallback" / "index.html").read_text()
    assert "budget 5 capped at 1 distinct configurations" in page and reason in page
