"""A trial whose worker died: counted by distinct workers, and handed on when Tune gave up early.

Tune (2.60) can count one lost worker twice: a trial handed a reused worker that died while
idle fails when Tune sees the worker gone, and again when the worker's ``reset`` call fails,
while the trial waits for its retry; Tune then ends it as an error with its retries unused
(qlsearch/_failures.py). These tests give ``WorkerFailures`` that sequence with Tune's own
``Trial`` (its ``handle_error`` writes the error that the callback reads) and a real study.
"""

from __future__ import annotations

import dataclasses

import optuna
import pytest

ray = pytest.importorskip("ray")

from ray.exceptions import ActorUnavailableError  # noqa: E402

from qlsearch._failures import WorkerFailures  # noqa: E402
from tests.test_drivers import study_search  # noqa: E402
from tests.test_search import ray_session  # noqa: E402,F401  (one local Ray for the module)

State = optuna.trial.TrialState


def lost(actor: int) -> ActorUnavailableError:
    """What Tune stores when a trial's worker (actor number ``actor``) is gone."""
    return ActorUnavailableError("The actor is temporarily unavailable: RpcError: Socket closed",
                                 bytes([actor]) * 16)


def tune_trial(tmp_path, trial_id: str):
    """Tune's own ``Trial``, with the storage a sweep gives it (its error files under tmp_path)."""
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    trial = Trial("__fake", trial_id=trial_id, stub=True,
                  storage=StorageContext(storage_path=str(tmp_path / "ray"), experiment_dir_name="tune"))
    trial.init_local_path()
    return trial


def searcher_and_failures(tmp_path, name: str, max_retries: int):
    ot, _, search = study_search(tmp_path, name, num_trials=3)
    search.study = dataclasses.replace(search.study, max_retries=max_retries)
    return ot, search, WorkerFailures(search, tmp_path / "runs" / name)


def fail_as_tune_does(trial, failures, search, errors: list) -> None:
    """Tune's calls for a trial whose failures are ``errors``: each but the last is recovered
    (a retry), the last one ends it (the searcher told first, then the callbacks)."""
    for error in errors[:-1]:
        trial.handle_error(error)
        failures.on_trial_recover(0, [], trial)
    trial.handle_error(errors[-1])
    search.on_trial_complete(trial.trial_id, error=True)
    failures.on_trial_error(0, [], trial)


@pytest.mark.usefixtures("ray_session")
def test_one_worker_counted_twice_hands_the_trial_on_to_the_next_tune_trial(tmp_path):
    ot, search, failures = searcher_and_failures(tmp_path, "counted-twice", max_retries=1)
    trial = tune_trial(tmp_path, "tune-a")
    config = search.suggest("tune-a")
    budget = len(ot.get_trials())
    ot_trial = search._ot_trials["tune-a"]
    number = ot_trial.number
    fail_as_tune_does(trial, failures, search, [lost(7), lost(7)])
    assert trial.run_metadata.num_failures == 2  # Tune's count, above max_retries = 1
    assert failures.handed_on == {"tune-a"} and failures.reasons["tune-a"].startswith("worker died: ")
    assert ot._storage.get_trial(ot_trial._trial_id).state == State.RUNNING  # and still this driver's
    assert ot_trial._trial_id in search.driver.live
    # the next Tune trial runs the same Optuna trial, afresh; the study gains no trial
    assert search.suggest("tune-b") == config and search._ot_trials["tune-b"].number == number
    search.on_trial_complete("tune-b", {"status": "completed", "val_mse": 0.5, "trainable_params": 10.0})
    (done,) = [t for t in ot.get_trials() if t.number == number]
    assert done.state == State.COMPLETE and done.user_attrs["tune_trial_id"] == "tune-b"
    assert len(ot.get_trials()) == budget  # none added
    search.driver.stop()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize(("max_retries", "actors"), [(1, [7, 8]), (0, [7])], ids=["two-lost", "no-retries"])
def test_a_trial_that_lost_more_workers_than_its_retries_ends_failed(tmp_path, max_retries, actors):
    """Two workers lost with one retry, or one lost with none: Tune's count is right, and
    the trial ends FAIL with the reason."""
    ot, search, failures = searcher_and_failures(tmp_path, f"lost-{max_retries}", max_retries=max_retries)
    trial = tune_trial(tmp_path, "tune-a")
    search.suggest("tune-a")
    number = search._ot_trials["tune-a"].number
    fail_as_tune_does(trial, failures, search, [lost(a) for a in actors])
    assert failures.handed_on == set()
    (failed,) = [t for t in ot.get_trials() if t.number == number]
    assert failed.state == State.FAIL and failed.user_attrs["failure"].startswith("worker died: ")
    search.driver.stop()


@pytest.mark.usefixtures("ray_session")
def test_a_trial_is_handed_on_once_and_one_no_tune_trial_took_ends_failed(tmp_path):
    ot, search, failures = searcher_and_failures(tmp_path, "once", max_retries=1)
    search.suggest("tune-a")
    number = search._ot_trials["tune-a"].number
    fail_as_tune_does(tune_trial(tmp_path, "tune-a"), failures, search, [lost(7), lost(7)])
    search.suggest("tune-b")  # the same Optuna trial, handed on
    fail_as_tune_does(tune_trial(tmp_path, "tune-b"), failures, search, [lost(9), lost(9)])
    assert failures.handed_on == {"tune-a"}  # not twice: tune-b's failure ends it
    (failed,) = [t for t in ot.get_trials() if t.number == number]
    assert failed.state == State.FAIL and failed.user_attrs["tune_trial_id"] == "tune-b"
    # handed on, then the sweep ended before a Tune trial took it: FAIL, with its reason
    search.suggest("tune-c")
    other = search._ot_trials["tune-c"].number
    fail_as_tune_does(tune_trial(tmp_path, "tune-c"), failures, search, [lost(3), lost(3)])
    assert "tune-c" in failures.handed_on
    search.fail_unexplained()
    (stranded,) = [t for t in ot.get_trials() if t.number == other]
    assert stranded.state == State.FAIL and stranded.user_attrs["failure"] == failures.reasons["tune-c"]
    search.driver.stop()


def test_losses_are_counted_by_worker():
    from ray.exceptions import ActorDiedError

    failures = WorkerFailures(search=None, run_dir=".")
    assert failures.worker_lost("t", lost(7)) == 1
    assert failures.worker_lost("t", lost(7)) == 1  # the same worker, seen twice
    assert failures.worker_lost("t", ActorDiedError()) == 2  # Ray did not say which: counted apart
    assert failures.worker_lost("t", ActorDiedError()) == 3
    assert failures.worker_lost("t", ValueError("raised inside the trial")) == 3  # no worker lost
    assert failures.worker_lost("u", lost(7)) == 1  # per trial


@pytest.mark.usefixtures("ray_session")
def test_the_searcher_finishes_only_once_none_of_its_trials_can_be_handed_on(tmp_path):
    """With the queue empty, the last trials still running: ``suggest`` says "not now" (None),
    not FINISHED, so a trial handed on after that still finds a Tune trial to run it."""
    from qlsearch._drivers import FINISHED

    ot, search, failures = searcher_and_failures(tmp_path, "last", max_retries=1)
    running = []
    while isinstance(config := search.suggest(f"tune-{len(running)}"), dict):  # the whole queue
        running.append((f"tune-{len(running)}", config))
    assert config is None and len(running) == len(ot.get_trials())
    last_id, last_config = running.pop()
    fail_as_tune_does(tune_trial(tmp_path, last_id), failures, search, [lost(7), lost(7)])
    assert search.suggest("tune-again") == last_config
    for trial_id, _ in [*running, ("tune-again", None)]:
        search.on_trial_complete(trial_id, {"status": "completed", "val_mse": 0.5, "trainable_params": 10.0})
    search.driver._idle_until = 0.0  # past the driver's pause between two looks at the queue
    assert search.suggest("tune-end") == FINISHED
    assert all(t.state == State.COMPLETE for t in ot.get_trials())
    search.driver.stop()
