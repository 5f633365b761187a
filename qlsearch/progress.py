"""A concise line per finished trial, and the time the sweep spent running trials."""

from __future__ import annotations

import time

from ray.tune import Callback

from qlsearch._failures import first_line, stored_error
from qlsearch.status import format_value as _fmt


class TrialLines(Callback):
    """Prints ``[n] method knobs -> objectives (time)`` as trials end, and records when
    trials ran, so the sweep's overhead (time with no trial running) can be measured."""

    def __init__(self, objectives: list[str], verbose: bool = True, reasons: dict[str, str] | None = None,
                 handed_on: set[str] | None = None):
        self.objectives = objectives
        self.verbose = verbose
        self.reasons = {} if reasons is None else reasons  # failed workers' (WorkerFailures.reasons)
        self.handed_on = set() if handed_on is None else handed_on  # (WorkerFailures.handed_on)
        self.spans: dict[str, list[float]] = {}
        self.finished = 0

    def on_trial_start(self, iteration, trials, trial, **info):
        self.spans[trial.trial_id] = [time.time(), time.time()]

    def _end(self, trial, failed: bool) -> None:
        span = self.spans.setdefault(trial.trial_id, [time.time(), time.time()])
        span[1] = time.time()
        if failed and trial.trial_id in self.handed_on:  # its configuration is not finished
            if self.verbose:
                print(f"[retry] trial {trial.trial_id} lost its worker ({self.reasons.get(trial.trial_id)}); "
                      "its configuration runs again as a new trial", flush=True)
            return
        self.finished += 1
        if not self.verbose:
            return
        result = trial.last_result or {}
        config = trial.config or {}
        who = config.get("baseline") or config.get("method", "?")
        knobs = " ".join(f"{k}={_fmt(v)}" for k, v in sorted((config.get("knobs") or {}).items()))
        if failed:  # the worker (or its node) died: last_result may be an earlier attempt's
            outcome = f"FAILED: {self.reasons.get(trial.trial_id, 'its worker died (see Ray logs)')}"
        elif result.get("status") != "completed":
            outcome = f"FAILED: {result.get('failure')}"
        else:
            outcome = "  ".join(f"{m}={_fmt(result.get(m))}" for m in self.objectives)
        print(f"[{self.finished}] {who} {knobs} -> {outcome} ({span[1] - span[0]:.1f}s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, failed=True)

    def on_trial_recover(self, iteration, trials, trial, **info):
        if self.verbose:  # FailureConfig: Tune runs it again, afresh, wherever there is room
            error = stored_error(trial)
            print(f"[retry] trial {trial.trial_id} lost its worker ({first_line(str(error))}); "
                  "running it again", flush=True)

    def first_start(self) -> float | None:
        """When the first trial started (None: none did)."""
        return min((start for start, _ in self.spans.values()), default=None)

    def busy_seconds(self) -> float:
        """Length of the union of the trials' run spans (time with at least one trial running)."""
        total, end = 0.0, float("-inf")
        for start, stop in sorted(self.spans.values()):
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total
