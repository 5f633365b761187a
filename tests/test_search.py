"""Sweeps for real: local Ray, Optuna in SQLite (and PostgreSQL where a server runs)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from qlsearch.cli import main
from qlsearch.search import INTERRUPTED, open_study, run_sweep
from qlsearch.study import parse_study

ray = pytest.importorskip("ray")

TINY = {
    "objectives": ["val_mse", "trainable_params"],
    "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
    "train": {"epochs": 2, "pretrain_epochs": 1, "batch_size": 200},
    "space": {"queryable": {"r": [2, 4], "num_atoms": [2, 4], "top_k": [1, 2, 4], "num_blocks": 2,
                            "d_k": 8}},
    "profile": True,
    "resources": {"cpus_per_trial": 1, "max_concurrent": 2},
}


@pytest.fixture(scope="module")
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def tiny(tmp_path, name: str, **changes):
    return parse_study({**TINY, "name": name, "cache_dir": str(tmp_path / "cache"), **changes})


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def _ran(trials: list) -> list:
    """The trials that ran: a sampled repeat of a configuration the study has is told PRUNED
    ("repeat: ...") and never runs; an unrun configuration takes its place (test_budgets.py)."""
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert all(t.user_attrs["failure"].startswith("repeat: trial ") for t in pruned)
    return [t for t in trials if t.state != optuna.trial.TrialState.PRUNED]


def test_sweep_runs_end_to_end_and_front_is_non_dominated(tmp_path, ray_session, capsys):
    study = tiny(tmp_path, "tiny", num_trials=3, sampler="grid",
                 baselines=[{"method": "lora", "knobs": {"r": 4}},
                            {"method": "lora", "knobs": {"r": 2, "lr": 1e30}, "label": "lora-diverges"},
                            {"method": "queryable", "knobs": {"num_blocks": 99}, "label": "queryable-broken"}])
    summary = run_sweep(study, root=tmp_path / "runs", verbose=False)
    assert summary["started"] == 6
    ot = optuna.load_study(study_name="tiny", storage=study.storage_url(tmp_path / "runs"))
    trials = ot.get_trials()
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)
    by_label = {t.user_attrs.get("baseline"): t for t in trials}
    by_number = {t.number: t for t in trials}
    assert by_label["lora"].state == optuna.trial.TrialState.COMPLETE
    # the failing configurations are recorded with their reasons; the sweep went on
    assert by_label["lora-diverges"].state == optuna.trial.TrialState.FAIL
    assert "diverged" in by_label["lora-diverges"].user_attrs["failure"]
    assert "num_blocks" in by_label["queryable-broken"].user_attrs["failure"]
    searched = [t for t in _ran(trials) if not t.user_attrs.get("baseline")]
    assert len(searched) == 3
    for t in searched:  # k <= M was never violated
        knobs = t.user_attrs["knobs"]
        assert knobs["top_k"] <= knobs["num_atoms"]
    assert len({tuple(sorted(t.user_attrs["knobs"].items())) for t in searched}) == 3  # no repeats
    front = ot.best_trials
    assert front
    for a in front:
        assert not any(dominates(b.values, a.values) for b in front if b is not a)
    records = list((tmp_path / "runs" / "tiny" / "trials").glob("*/seed0.json"))
    assert len(records) == 6
    assert 0 <= summary["overhead_fraction"] < 1 and summary["trial_seconds"] > 0
    parts = [summary[k] for k in ("storage_seconds", "ray_start_seconds", "workers_start_seconds")]
    assert all(p >= 0 for p in parts)  # the rest of the overhead is scheduling:
    assert summary["scheduling_seconds"] == pytest.approx(summary["overhead_seconds"] - sum(parts))
    # `qlsearch status` shows the same trials and front
    assert main(["status", "tiny", "--root", str(tmp_path / "runs"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["front"] == [t.number for t in front]
    assert status["counts"] == {"COMPLETE": 4, "FAIL": 2}
    assert status["sweeps"][0]["overhead_fraction"] == summary["overhead_fraction"]
    # every completed trial carries its configuration's quiet latency, in the record and in status
    for row in status["trials"]:
        if row["state"] == "COMPLETE":
            record = json.loads((Path(by_number[row["number"]].user_attrs["record_dir"]) / "seed0.json").read_text())
            assert row["forward_ratio"] == record["profile"]["forward_ratio"] > 0
            assert row["latency"]["unit"] == "ms per forward of a batch of 200" and row["latency"]["quiet"]
            assert row["latency"]["forward_ms"] == record["profile"]["forward_ms"]
    # one measurement per configuration that attached: the four completed and the diverging one
    assert len(list((tmp_path / "runs" / "tiny" / "latency").glob("*.json"))) == 5


def test_seeds_each_keep_their_value_and_a_finished_study_runs_nothing_again(tmp_path, ray_session, capsys):
    study = tiny(tmp_path, "done", num_trials=1, seeds=[0, 1])
    run_sweep(study, root=tmp_path / "runs", verbose=False)
    again = run_sweep(study, root=tmp_path / "runs", verbose=False)
    assert again["started"] == 0
    ot, _ = open_study(study, tmp_path / "runs")
    assert len(ot.trials) == 1
    assert main(["status", "done", "--root", str(tmp_path / "runs"), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [o["metric"] for o in status["objectives"]] == ["val_mse", "trainable_params"]
    assert status["reported"] == ["test_mse"]  # beside val_mse, never optimised
    (row,) = status["trials"]
    records = [json.loads(p.read_text()) for p in sorted(Path(ot.trials[0].user_attrs["record_dir"]).glob("seed*.json"))]
    assert row["seeds"] == [0, 1] and len(records) == 2
    for name in ("val_mse", "test_mse"):  # one value per seed, the objective their mean
        assert row["seed_values"][name] == [r["metrics"][name] for r in records]
        mean = (row["values"] | row["reported"])[name]
        assert mean == pytest.approx(sum(row["seed_values"][name]) / 2)
        assert row["std"][name] == pytest.approx(abs(row["seed_values"][name][0] - row["seed_values"][name][1]) / 2 ** 0.5)
    assert status["budget"] == {"queryable": {"searched": True, "configurations": 1, "completed": 1, "seeds": 2}}
    assert main(["status", "done", "--root", str(tmp_path / "runs")]) == 0
    text = capsys.readouterr().out
    assert "reported beside them: test_mse" in text and " ± " in text and "queryable 1 searched; 2 seeds each" in text


STUDY_FILE = """
name = "resume"
objectives = ["val_mse", "trainable_params"]
num_trials = 4
seeds = [0, 1]
cache_dir = "{cache}"
[task]
kind = "synthetic"
name = "sin_cos"
backbone = "mlp"
[train]
epochs = 15
pretrain_epochs = 1
batch_size = 200
[space.queryable]
r = [2, 4]
num_atoms = [2, 4]
top_k = [1, 2]
num_blocks = 2
d_k = 8
[resources]
max_concurrent = 1
[drivers]
heartbeat_seconds = 1
grace_seconds = 5
"""


def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path, ray_session):
    """SIGKILL the sweep's driver after a trial finished, resume, count trials in the storage."""
    path = tmp_path / "resume.toml"
    path.write_text(STUDY_FILE.format(cache=tmp_path / "cache"))
    root = tmp_path / "runs"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    log = tmp_path / "driver.log"  # the driver's own words, shown if it fails
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qlsearch.cli", "sweep", str(path), "--root", str(root), "--num-cpus", "1"],
            env=env, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    from qlsearch.study import load_study

    study = load_study(path)
    storage = study.storage_url(root)
    deadline = time.time() + 600  # a loaded machine starts Ray and pre-trains slowly; the loop ends at once
    finished, trials = [], []
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            try:
                trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
            except Exception:  # noqa: BLE001  (the study may not exist yet)
                continue
            finished = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
            if finished and any(t.state == optuna.trial.TrialState.RUNNING for t in trials):
                break
        assert finished, (f"no trial finished (driver exit code {proc.poll()}; trials "
                          f"{[(t.state.name, t.user_attrs.get('failure')) for t in trials]}); its log ends:\n"
                          + log.read_text(errors="replace")[-4000:])
    finally:
        with contextlib.suppress(ProcessLookupError):  # (gone already when the driver failed)
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        proc.wait()
    before = {t.number: t.values for t in finished}

    with pytest.raises(SystemExit):  # an existing study is only continued on request
        main(["sweep", str(path), "--root", str(root)])
    assert main(["sweep", str(path), "--root", str(root), "--resume", "--quiet"]) == 0
    trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    interrupted = [t for t in trials if t.user_attrs.get("failure") == INTERRUPTED]
    assert len(complete) == 4  # every trial of the study finished once ...
    assert {t.number: t.values for t in complete if t.number in before} == before  # ... none lost
    retried = [t for t in complete if "retry_of" in t.user_attrs]
    # every interrupted trial runs again, once: its configuration, or (killed before the
    # sampler chose one) its budget slot, sampled afresh; its driver's heartbeats stopped
    assert interrupted
    assert sorted(t.user_attrs["retry_of"] for t in retried) == sorted(t.number for t in interrupted)
    assert all(t.state == optuna.trial.TrialState.FAIL for t in interrupted)
    # a half-finished seed set is run again on every seed
    assert all(t.user_attrs["seeds"] == [0, 1] and len(t.user_attrs["val_mse_seeds"]) == 2 for t in complete)


def test_postgresql_storage(tmp_path, ray_session):
    """A small sweep against a PostgreSQL server (``.ci/run`` starts one and sets the URL)."""
    url = os.environ.get("QLSEARCH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set QLSEARCH_TEST_POSTGRES_URL (.ci/run starts one)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    name = f"pg{int(time.time())}"
    study = tiny(tmp_path, name, num_trials=1, storage=url,
                 baselines=[{"method": "lora", "knobs": {"r": 2}}])
    run_sweep(study, root=tmp_path / "runs", verbose=False)
    ot = optuna.load_study(study_name=name, storage=url)
    assert len(ot.trials) == 2 and all(t.state.is_finished() for t in ot.trials)
    assert Path(tmp_path / "runs" / name).exists()


def test_equal_budgets_enqueue_the_same_number_of_slots_per_method(tmp_path):
    """trials_per_method: every searched method gets that many configurations, also on resume."""
    from qlsearch.search import StudySpace, prepare

    study = tiny(tmp_path, "budget", trials_per_method=3, space={
        "queryable": {"r": [2, 4], "num_atoms": [2, 4], "top_k": [1, 2], "lr": {"low": 1e-3, "high": 1e-2}},
        "lora": {"r": [2, 4, 8], "lr": {"low": 1e-3, "high": 1e-2}}})
    ot, _ = open_study(study, tmp_path / "runs")
    assert prepare(ot, study) == 6
    waiting = ot.get_trials(deepcopy=False)
    assert sorted(t.user_attrs["method"] for t in waiting) == ["lora"] * 3 + ["queryable"] * 3
    space = StudySpace(study)
    trial = ot.ask()  # the first slot: its method is fixed, the sampler picks the knobs (lr included)
    config = space(trial)
    assert config["method"] == waiting[0].user_attrs["method"] and "lr" in config["knobs"]
    ot.tell(trial, [0.1, 10.0])
    assert prepare(ot, study) == 5  # nothing enqueued twice: 5 slots still waiting
    assert len(ot.get_trials(deepcopy=False)) == 6


def test_asha_sweep_with_seeds_ends_every_trial_complete_or_stopped(tmp_path, ray_session):
    study = tiny(tmp_path, "asha-sweep", num_trials=4, seeds=[0, 1], scheduler="asha",
                 train={"epochs": 4, "pretrain_epochs": 1, "batch_size": 200})
    run_sweep(study, root=tmp_path / "runs", verbose=False)
    trials = _ran(optuna.load_study(study_name="asha-sweep", storage=study.storage_url(tmp_path / "runs")).get_trials())
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    for t in trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert t.user_attrs["seeds"] == [0, 1] and len(t.user_attrs["val_mse_seeds"]) == 2
        else:  # stopped part-way through its seeds: never a point of the front
            assert t.user_attrs["failure"] == "stopped early by the scheduler"


def test_asha_sees_the_validation_objective_of_each_seed_in_turn(tmp_path):
    """With seeds, ASHA is told the running best validation loss of the seed being trained;
    a new seed starts afresh (its epochs restart), and the other objectives are NaN."""
    from qlsearch.search import _asha_progress

    study = tiny(tmp_path, "asha", num_trials=1, seeds=[0, 1], scheduler="asha")
    reports = []
    progress = _asha_progress(study, reports.append)
    for epoch, val in [(1, 0.5), (2, 0.3), (3, 0.4), (1, 0.9), (2, 0.8)]:  # seed 0, then seed 1
        progress(epoch, {"train": 1.0, "val": val, "test": 0.0})
    assert [r["val_mse"] for r in reports] == [0.5, 0.3, 0.3, 0.9, 0.8]
    assert all(r["trainable_params"] != r["trainable_params"] and r["status"] == "running" for r in reports)
