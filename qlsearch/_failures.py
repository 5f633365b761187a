"""A trial whose worker died (its process, or the whole node): the reason, in words.

Tune hands the searcher only ``error=True`` when a trial's worker fails; the
exception itself reaches the callbacks, after the searcher. ``WorkerFailures``
gives it to ``StudySearch``, which ends the Optuna trial FAIL with that reason
(``node died: ...`` when the node the trial last ran on has left the cluster).
Whether such a trial is retried first is the study's ``max_retries`` (Tune's
``FailureConfig``): a retry starts the configuration afresh, on whichever node has room.
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


class WorkerFailures(Callback):
    """Tells ``search`` (a ``StudySearch``) why a trial's worker failed, once Tune gave up on it;
    ``run_dir`` is the sweep's run folder (trial records under ``trials/<trial id>``)."""

    def __init__(self, search, run_dir: str | Path):
        self.search = search
        self.run_dir = Path(run_dir)
        self.reasons: dict[str, str] = {}  # trial id -> reason, also for TrialLines' line

    def on_trial_error(self, iteration, trials, trial, **info):
        record_dir = self.run_dir / "trials" / trial.trial_id
        tried = read_attempts(record_dir)  # none: it died before its first attempt began
        node = tried[-1]["node"] if tried else None
        self.reasons[trial.trial_id] = failure_reason(stored_error(trial), node)
        self.search.fail(trial.trial_id, {"failure": self.reasons[trial.trial_id], "node": node,
                                          "attempts": len(tried), "record_dir": str(record_dir)})
