"""A trial whose worker died (its process, or the whole node): the reason, in words.

Tune hands the searcher only ``error=True`` when a trial's worker fails; the
exception itself reaches the callbacks, after the searcher. ``WorkerFailures``
gives it to ``StudySearch``, which ends the Optuna trial FAIL with that reason
(``node died: ...`` when the node the trial last ran on has left the cluster).
Whether such a trial is retried first is the study's ``max_retries`` (Tune's
``FailureConfig``): a retry starts the configuration afresh, on whichever node has room.

Tune (2.60) can count one lost worker twice. A trial handed a reused worker that died
while idle (its node died between trials) fails twice: once when Tune sees the worker
gone, and again when the worker's ``reset`` call fails. The second failure comes while
the trial waits for its retry, and Tune then ends it as an error with its retries unused.
``WorkerFailures`` counts the distinct workers each trial lost, by actor id. When Tune
gives up on a trial that lost no more workers than ``max_retries`` allows, its Optuna
trial is handed on (``StudySearch.hand_on``) to the next Tune trial, which runs it
afresh. Each Optuna trial is handed on at most once.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ray.tune import Callback

from qlsearch.trial import read_attempts

#: The failure recorded when Tune gives no exception for a failed trial.
WORKER_RAISED = "the trial's worker raised; see the Ray Tune logs"

#: How long to wait for Ray to declare a lost worker's node dead (its health checks
#: take a few seconds) before calling it a worker's death on a live node.
NODE_DEATH_WAIT_S = 20.0


def first_line(text: str) -> str:
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


def stored_error(trial) -> BaseException | str | None:
    """The exception Tune stored for ``trial`` (its text where it could not be unpickled)."""
    import cloudpickle

    for path, read in ((trial.pickled_error_file, lambda f: cloudpickle.load(f)),
                       (trial.error_file, lambda f: f.read().decode(errors="replace"))):
        if path and os.path.exists(path):
            try:
                with open(path, "rb") as fh:
                    return read(fh)
            except Exception:  # noqa: BLE001  (an unreadable error file must not crash the sweep)
                continue
    return None


def node_gone(node_id: str, wait_s: float = NODE_DEATH_WAIT_S) -> bool:
    """Whether Ray lists ``node_id`` as dead (or not at all) within ``wait_s`` seconds."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        if node_id not in alive:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


def failure_reason(error: BaseException | str | None, node: dict | None) -> str:
    """``node died: ...`` for a worker lost with its node (``node``: where the trial ran),
    ``worker died: ...`` for a worker process lost on a live node, ``<Type>: ...`` otherwise."""
    from ray.exceptions import RayActorError

    if error is None:
        return WORKER_RAISED
    if not isinstance(error, RayActorError):  # an error raised inside the trial's task
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        return first_line(text)
    if node and node.get("node_id") and node_gone(node["node_id"]):
        return (f"node died: Ray node {node['node_id'][:12]} on {node['host']} ({node['ip']}) left the "
                f"cluster while the trial ran there ({first_line(str(error))})")
    return f"worker died: {first_line(str(error))}"


def lost_worker(error: BaseException | str | None) -> str | None:
    """The actor id of the worker whose loss ``error`` reports ("" where Ray does not say
    which worker it was); None when ``error`` is not a lost worker."""
    from ray.exceptions import RayActorError

    return (error.actor_id or "") if isinstance(error, RayActorError) else None


class WorkerFailures(Callback):
    """Tells ``search`` (a ``StudySearch``) why a trial's worker failed, once Tune gave up on it;
    ``run_dir`` is the sweep's run folder (trial records under ``trials/<trial id>``).
    A trial that Tune gave up on for one lost worker counted twice is handed on instead
    (see the module docstring); ``handed_on`` lists those trial ids."""

    def __init__(self, search, run_dir: str | Path):
        self.search = search
        self.run_dir = Path(run_dir)
        self.reasons: dict[str, str] = {}  # trial id -> reason, also for TrialLines' line
        self.lost: dict[str, set[str]] = {}  # trial id -> actor ids of the workers it lost
        self.handed_on: set[str] = set()

    def worker_lost(self, trial_id: str, error: BaseException | str | None) -> int:
        """Note ``error`` (a failure of ``trial_id``); returns how many distinct workers it lost."""
        lost = self.lost.setdefault(trial_id, set())
        if (actor := lost_worker(error)) is not None:
            lost.add(actor or f"unnamed {len(lost)}")  # losses that cannot be told apart count apart
        return len(lost)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.worker_lost(trial.trial_id, stored_error(trial))

    def on_trial_error(self, iteration, trials, trial, **info):
        record_dir = self.run_dir / "trials" / trial.trial_id
        tried = read_attempts(record_dir)  # none: it died before its first attempt began
        node = tried[-1]["node"] if tried else None
        error = stored_error(trial)
        self.reasons[trial.trial_id] = failure_reason(error, node)
        lost = self.worker_lost(trial.trial_id, error)
        if lost_worker(error) is not None and lost <= self.search.study.max_retries \
                and self.search.hand_on(trial.trial_id, self.reasons[trial.trial_id]):
            self.handed_on.add(trial.trial_id)
            return
        self.search.fail(trial.trial_id, {"failure": self.reasons[trial.trial_id], "node": node,
                                          "attempts": len(tried), "record_dir": str(record_dir)})
