"""Several drivers on one study, resume refusals, ``--more`` and reading while a sweep writes.

The quick tests use SQLite and no Ray. The sweeps run real ``qlsearch sweep`` processes
against the real PostgreSQL server (``QLSEARCH_TEST_POSTGRES_URL``; ``.ci/run`` starts one)
and are marked slow; ``.ci/run`` runs them.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from qlsearch._drivers import (
    INTERRUPTED,
    Driver,
    check_file,
    reap_stale,
    settle_version,
    storage_lock,
)
from qlsearch.cli import main
from qlsearch.search import StudySearch, open_study, prepare
from qlsearch.study import load_study

State = optuna.trial.TrialState

STUDY = """
name = "{name}"
objectives = ["val_mse", "trainable_params"]
num_trials = {num_trials}
sampler = "{sampler}"
cache_dir = "{cache}"
{storage}
[task]
kind = "synthetic"
name = "sin_cos"
backbone = "mlp"
[train]
epochs = {epochs}
pretrain_epochs = 1
batch_size = 200
[space.queryable]
r = {r}
num_atoms = [2, 4]
top_k = [1, 2]
num_blocks = 2
d_k = 8
[[baselines]]
method = "lora"
knobs = {{r = {lora_r}}}
[resources]
max_concurrent = 1
[drivers]
heartbeat_seconds = 1
grace_seconds = {grace}
"""


def write_study(path: Path, name: str, *, num_trials=4, sampler="grid", r="[2, 4]", lora_r=4, epochs=2,
                storage: str | None = None, grace=4) -> Path:
    """A tiny study; ``grace``: seconds without a heartbeat before a trial is stale (a live
    driver on a busy machine must never look gone)."""
    path.write_text(STUDY.format(name=name, num_trials=num_trials, sampler=sampler, r=r, lora_r=lora_r,
                                 epochs=epochs, cache=path.parent / "cache", grace=grace,
                                 storage=f'storage = "{storage}"' if storage else ""))
    return path


def postgres_url() -> str:
    url = os.environ.get("QLSEARCH_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set QLSEARCH_TEST_POSTGRES_URL (.ci/run starts one)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    return url


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.time_ns() % 10**9}"


@pytest.fixture
def pg_study():
    """``(url, name)``: a fresh study name on the PostgreSQL server, deleted afterwards
    (other tests share the server)."""
    url = postgres_url()
    names = []

    def fresh(prefix: str) -> str:
        names.append(unique(prefix))
        return names[-1]

    yield url, fresh
    for name in names:
        try:
            optuna.delete_study(study_name=name, storage=url)
        except KeyError:
            pass


def knobs_key(t) -> tuple:
    return (t.user_attrs.get("baseline"), t.user_attrs.get("method"), json.dumps(t.user_attrs.get("knobs"), sort_keys=True))


# ---- file versions: what --resume refuses, what --more accepts ------------------------


def test_resume_refuses_a_changed_space_baseline_or_objective_naming_each(tmp_path, capsys):
    root = tmp_path / "runs"
    path = write_study(tmp_path / "s.toml", "versions")
    study = load_study(path)
    ot, storage = open_study(study, root)
    with storage_lock(storage, study.name):
        assert settle_version(ot, study, more=False) == 1
        prepare(ot, study)
    stored = {t.number: t.user_attrs for t in ot.get_trials()}
    assert check_file(ot, study, more=False) == []
    write_study(path, "versions", r="[2, 4, 8]", lora_r=8)
    text = path.read_text().replace('"trainable_params"]', '"forward_ms"]')
    path.write_text(text)
    changed = load_study(path)
    problems = check_file(ot, changed, more=False)
    assert problems[1:] == ['baselines.lora.knobs.r: stored 4, file 8',
                            'objectives: stored ["val_mse", "trainable_params"], file ["val_mse", "forward_ms"]',
                            'space.queryable.r: stored [2, 4], file [2, 4, 8]']
    # --more accepts the space and the baselines, never the objectives
    assert check_file(ot, changed, more=True)[1:] == [problems[2]]
    # the command refuses before anything runs, every difference on its own line, and the
    # stored study is untouched (no new trial, no new version)
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(path), "--root", str(root), "--resume"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "space.queryable.r: stored [2, 4], file [2, 4, 8]\n" in err and "--more N accepts" in err
    assert {t.number: t.user_attrs for t in ot.get_trials()} == stored
    assert len(ot.user_attrs["file_versions"]) == 1
    with pytest.raises(SystemExit):
        main(["sweep", str(path), "--root", str(root), "--more", "0"])
    assert "--more: got 0; allowed: an integer >= 1" in capsys.readouterr().err


def test_more_with_a_widened_space_records_a_new_version_and_enqueues_only_new_points(tmp_path):
    root = tmp_path / "runs"
    path = write_study(tmp_path / "s.toml", "grow", num_trials=8)  # the whole grid: 2 r x 4 (M, k) ...
    study = load_study(path)
    ot, storage = open_study(study, root)
    with storage_lock(storage, study.name):
        settle_version(ot, study, more=False)
        waiting = prepare(ot, study)
    # ... r in {2, 4} x (M=2: k in {1, 2}; M=4: k in {1, 2}) = 8 points, and the baseline
    assert waiting == 8 + 1
    old = {knobs_key(t) for t in ot.get_trials()}
    write_study(path, "grow", num_trials=8, r="[2, 4, 8]")
    wider = load_study(path)
    with storage_lock(storage, study.name):
        assert settle_version(ot, wider, more=True) == 2
        assert prepare(ot, wider, more=3) == 8 + 1 + 3  # three more, all of them new points
    new = [t for t in ot.get_trials() if knobs_key(t) not in old]
    assert len(new) == 3 and all(t.user_attrs["knobs"]["r"] == 8 for t in new)
    (v1, v2) = ot.user_attrs["file_versions"]
    assert v2["changes"] == ["space.queryable.r: stored [2, 4], file [2, 4, 8]"]
    assert v1["fingerprints"]["space"] != v2["fingerprints"]["space"]
    assert v1["fingerprints"]["objectives"] == v2["fingerprints"]["objectives"]


@pytest.mark.parametrize("where", ["sqlite", "postgresql"])
def test_the_storage_lock_lets_one_driver_in_at_a_time(tmp_path, where):
    import threading

    url = postgres_url() if where == "postgresql" else f"sqlite:///{tmp_path / 'lock.db'}"
    name = unique("lock")
    spans = []
    optuna.storages.RDBStorage(url)  # the schema, once

    def driver() -> None:  # each with its own storage, as two processes would have
        storage = optuna.storages.RDBStorage(url)
        with storage_lock(storage, name):
            entered = time.monotonic()
            time.sleep(0.3)
            spans.append((entered, time.monotonic()))

    threads = [threading.Thread(target=driver) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # never two inside


# ---- leases: a trial is stale when its driver is gone ------------------------------------


def study_search(tmp_path: Path, name: str, **study_file) -> tuple[optuna.Study, object, StudySearch]:
    """A tiny TPE study (``write_study``) opened and prepared, and a searcher on it whose
    driver beats every second: the Optuna study, its storage and the searcher."""
    study = load_study(write_study(tmp_path / "s.toml", name, sampler="tpe", **study_file))
    ot, storage = open_study(study, tmp_path / "runs")
    prepare(ot, study)
    search = StudySearch.for_study(study, storage, seed=0, unstored_dir=tmp_path / "unstored",
                                   driver=Driver(1, version=1))
    return ot, storage, search


def test_a_stale_trial_is_run_again_once_and_a_late_result_lands_in_its_retry(tmp_path):
    ot, storage, slow = study_search(tmp_path, "leases", num_trials=3)
    assert slow.suggest("tune-a") == {"method": "lora", "knobs": {"r": 4}, "baseline": "lora"}  # enqueued first
    lost = slow._ot_trials["tune-a"]
    alive = Driver(1, version=1)
    kept = alive.claim(ot)  # a budget slot, kept alive by its driver's heartbeats
    slow.driver.live.clear()  # the first driver stops beating (a stall past the grace period)
    time.sleep(5.5)  # past the grace period (4 s)
    # two drivers look at the same moment: one of them fails it and enqueues its retry
    other = optuna.load_study(study_name="leases", storage=storage)
    assert sorted(reap_stale(ot) + reap_stale(other)) == [lost.number]
    trials = {t.number: t for t in ot.get_trials()}
    assert trials[lost.number].state == State.FAIL and trials[lost.number].user_attrs["failure"] == INTERRUPTED
    assert trials[kept.number].state == State.RUNNING
    (retry,) = [t for t in trials.values() if t.user_attrs.get("retry_of") == lost.number]
    assert retry.state == State.WAITING  # the baseline of the study file, again
    assert retry.user_attrs == {"baseline": "lora", "method": "lora", "knobs": {"r": 4}, "retry_of": lost.number}
    # the stalled driver finishes after all: no crash, its result goes to the unclaimed retry
    slow.on_trial_complete("tune-a", {"status": "completed", "val_mse": 0.25, "trainable_params": 96.0})
    retry = ot._storage.get_trial(retry._trial_id)
    assert retry.state == State.COMPLETE and retry.values == [0.25, 96.0]
    assert ot._storage.get_trial(lost._trial_id).state == State.FAIL
    alive.stop()


def test_a_retry_slot_whose_sample_repeats_a_configuration_stays_that_trials_retry(tmp_path):
    """A trial interrupted before its configuration was chosen is retried as a fresh slot. When
    that slot's sample repeats a configuration the study has, the unrun configuration queued in
    its place is still the interrupted trial's retry (a resumed sweep found none once)."""
    ot, _, search = study_search(tmp_path, "lineage", num_trials=4)
    assert search.suggest("tune-a")["baseline"] == "lora"  # enqueued first
    sampled = search.suggest("tune-b")
    assert sampled["method"] == "queryable"
    ot.enqueue_trial({}, user_attrs={"retry_of": 7})  # what retry_attrs gives a trial with no configuration
    search._ot_trials["tune-c"] = search.driver.claim(ot, retry_of=7)
    assert search._replaced_repeat("tune-c", sampled)  # the slot drew tune-b's configuration again
    (replacement,) = [t for t in ot.get_trials(states=[State.WAITING]) if t.user_attrs.get("fixed")]
    assert replacement.user_attrs["retry_of"] == 7
    assert replacement.user_attrs["method"] == "queryable" and replacement.user_attrs["knobs"] != sampled["knobs"]
    search.driver.stop()


# ---- real drivers on the real PostgreSQL server -------------------------------------------


def _driver(path: Path, root: Path, *extra: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}  # its own Ray
    return subprocess.Popen(
        [sys.executable, "-m", "qlsearch.cli", "sweep", str(path), "--root", str(root), "--num-cpus", "1",
         "--quiet", *extra], env=env, start_new_session=True, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _check_snapshot(status: dict, previous: dict) -> dict:
    """A status snapshot is consistent in itself, and nothing finished goes backwards."""
    rows = {t["number"]: t for t in status["trials"]}
    states = [t["state"] for t in rows.values()]
    assert status["counts"] == {s: states.count(s) for s in set(states)}
    assert set(status["front"]) <= {n for n, t in rows.items() if t["state"] == "COMPLETE"}
    for t in rows.values():
        assert (t["values"] is not None) == (t["state"] == "COMPLETE")
        if t["state"] == "COMPLETE":
            assert t["seeds"] == [0] and t["knobs"] is not None
    finished = {n for n, t in rows.items() if t["state"] in ("COMPLETE", "FAIL")}
    assert previous.get("finished", set()) <= finished
    for n in previous.get("finished", set()):
        assert rows[n]["state"] == previous["states"][n]
    return {"finished": finished, "states": {n: rows[n]["state"] for n in finished}}


def _kill_mid_trial(driver: subprocess.Popen, ot) -> list[int] | None:
    """SIGKILL ``driver`` (and the Ray it started) if it runs a trial with a configuration
    while another driver has run trials too; the numbers of the trials it left RUNNING, or
    None (it runs on). The driver is stopped first and the states read after: a trial that
    finishes between a read and the kill would otherwise count as interrupted."""
    if driver.poll() is not None:
        return None
    os.killpg(driver.pid, signal.SIGSTOP)
    time.sleep(0.2)  # a commit it sent before stopping lands
    trials = ot.get_trials()
    drivers = {t.user_attrs.get("driver") for t in trials if t.user_attrs.get("driver")}
    mine = [t.number for t in trials if t.state == State.RUNNING
            and t.user_attrs.get("driver", "").endswith(f":{driver.pid}") and t.user_attrs.get("knobs")]
    if len(drivers) == 2 and mine and any(t.state == State.COMPLETE for t in trials):
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        return mine
    os.killpg(driver.pid, signal.SIGCONT)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_two_drivers_share_one_study_and_a_killed_ones_trials_run_again(tmp_path, sampler, capsys, pg_study):
    """Two ``qlsearch sweep`` processes on one PostgreSQL study; the first is killed with
    SIGKILL mid-trial. Reading (status, report) while they write never fails."""
    url, fresh = pg_study
    name = fresh(f"two-{sampler}")
    budget = 6
    path = write_study(tmp_path / "s.toml", name, num_trials=budget, sampler=sampler, storage=url,
                       epochs=3 if sampler == "grid" else 2, grace=10)
    if sampler == "tpe":  # a range: the sampler cannot draw one configuration twice
        path.write_text(path.read_text().replace("d_k = 8", "d_k = 8\nlr = {low = 1e-4, high = 1e-2, log = true}"))
    root = tmp_path / "runs"
    first = _driver(path, root, "--resume", log=tmp_path / "first.log")
    time.sleep(2)
    second = _driver(path, root, "--resume", log=tmp_path / "second.log")
    snapshot: dict = {}
    killed_running = None
    deadline = time.time() + 600
    reports = 0
    storage = optuna.storages.RDBStorage(url)  # one pool for the test's own reads
    try:
        while time.time() < deadline and second.poll() is None:
            time.sleep(1)
            try:
                ot = optuna.load_study(study_name=name, storage=storage)
            except KeyError:
                continue
            if killed_running is None:  # kill the first driver while it runs a trial and the second runs too
                killed_running = _kill_mid_trial(first, ot)
            assert main(["status", str(path), "--root", str(root), "--json"]) == 0
            gc.collect()  # the command's storage, and its connections, as its process exit would
            snapshot = _check_snapshot(json.loads(capsys.readouterr().out), snapshot)
            if reports < 1 and killed_running:
                assert main(["report", str(path), "--root", str(root), "--out", str(tmp_path / "reports")]) == 0
                capsys.readouterr()  # the page's path
                reports += 1
        assert second.wait(timeout=max(1, deadline - time.time())) == 0, (tmp_path / "second.log").read_text()
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert killed_running, "the first driver never ran a trial while the second ran too"
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert all(t.state.is_finished() for t in trials)
    interrupted = [t for t in trials if t.user_attrs.get("failure") == INTERRUPTED]
    assert sorted(t.number for t in interrupted) == killed_running
    # every interrupted trial was run again exactly once, and finished
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["retry_of"] for t in retries) == killed_running
    assert all(t.state == State.COMPLETE for t in retries)
    searched = [t for t in trials if not t.user_attrs.get("baseline") and t not in interrupted]
    assert len(searched) == budget and all(t.state == State.COMPLETE for t in searched)  # the budget, exactly
    assert len({knobs_key(t) for t in searched}) == budget  # no configuration run twice
    assert [t.user_attrs["baseline"] for t in trials if t.user_attrs.get("baseline") and t not in interrupted] == ["lora"]
    drivers = {t.user_attrs["driver"] for t in trials}
    assert len(drivers) == 2  # both drivers ran trials
    assert reports == 1


@pytest.mark.slow
def test_more_extends_a_finished_study_and_status_says_which_version_ran_what(tmp_path, capsys, pg_study):
    url, fresh = pg_study
    name = fresh("more")
    root = tmp_path / "runs"
    path = write_study(tmp_path / "s.toml", name, num_trials=2, sampler="grid", storage=url, grace=10)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "local"}

    def sweep(*extra: str) -> None:
        done = subprocess.run([sys.executable, "-m", "qlsearch.cli", "sweep", str(path), "--root", str(root),
                               "--num-cpus", "1", "--quiet", *extra], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]

    sweep()
    sweep("--more", "2")  # the same file: two more grid points, the baseline not again
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert len(trials) == 2 + 1 + 2 and all(t.state == State.COMPLETE for t in trials)
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1
    assert len({knobs_key(t) for t in trials}) == 5
    first = {knobs_key(t) for t in trials}
    write_study(path, name, num_trials=2, sampler="grid", storage=url, r="[2, 4, 8]", grace=10)  # a wider space
    done = subprocess.run([sys.executable, "-m", "qlsearch.cli", "sweep", str(path), "--root", str(root), "--resume"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "space.queryable.r: stored [2, 4], file [2, 4, 8]" in done.stderr
    sweep("--more", "3")
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    new = [t for t in trials if knobs_key(t) not in first]
    assert len(trials) == 8 and len(new) == 3 and all(t.state == State.COMPLETE for t in trials)
    assert {t.user_attrs["file_version"] for t in new} == {2}
    assert {t.user_attrs["file_version"] for t in trials if t not in new} == {1}
    assert main(["status", str(path), "--root", str(root)]) == 0
    text = capsys.readouterr().out
    old_numbers = sorted(t.number for t in trials if t not in new)
    assert "file version 1 " in text and f"trials {old_numbers[0]}-{old_numbers[-1]}\n" in text
    assert "space.queryable.r: stored [2, 4], file [2, 4, 8]" in text
    # the report says it too, and counts the added trials in the budget
    assert main(["report", str(path), "--root", str(root), "--out", str(tmp_path / "reports")]) == 0
    page = (tmp_path / "reports" / name / "index.html").read_text()
    assert "file version 2 " in page and "+ 5 added with --more" in page
