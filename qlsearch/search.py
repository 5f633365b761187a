"""A sweep: Ray Tune runs the trials, Optuna samples them and keeps the multi-objective study.

* The Optuna study lives in an RDB storage (a SQLite file under ``runs/<study>/``
  by default, any SQLAlchemy URL such as PostgreSQL to share it between
  machines); it is the source of truth. Every Optuna write happens in the
  driver (``StudySearch``), which keeps SQLite safe.
* Baselines are enqueued into the same study (``enqueue_trial`` with the
  baseline in ``user_attrs``), so fronts compare like with like.
* One Optuna trial = one configuration run on every seed of the study; its
  objectives are the means over seeds, and its user attrs keep every seed's
  value (``<metric>_seeds``), the standard deviation (``<metric>_std``) and the
  ``test_*`` twin of each ``val_*`` objective, reported beside it. A trial that
  diverges, runs out of memory or raises is told to Optuna as FAIL with its
  reason in ``user_attrs["failure"]``; the sweep goes on.
* Equal budgets: with ``trials_per_method`` every searched method gets that many
  slots, enqueued as trials that name the method and let the sampler choose its
  knobs (``StudySpace``).
* Storage outages (qlsearch/_storage.py): every storage call is retried for the study's
  ``storage_retry_seconds``; a result that still cannot be stored is kept on disk
  (``<run>/unstored/<trial number>.json``, beside its records), the sweep starts no new
  trial and ends with one line naming the storage and the cause, and the next sweep
  (``--resume``) stores those results first. A finished trial is never told FAIL for it.
* Secrets: the storage URL (its password) stays in the driver's memory. What Tune pickles
  (the searcher's checkpoints, ``tuner.pkl``) and what the workers receive leave it out.
* Several drivers, resume, growth (qlsearch/_drivers.py): everything that runs is
  enqueued (under a storage lock) and a driver runs only trials it claimed from the
  queue, kept alive by its heartbeats; finished trials (COMPLETE/FAIL) are never run
  again; a trial whose driver is gone (no heartbeat for the grace period) is marked
  FAIL ("interrupted") and its configuration enqueued again. ``more`` adds trials to
  the budget; each trial records the study-file version it ran under.
* Half-finished seed sets: a configuration's objectives exist only once all of
  its seeds finished. A trial interrupted mid-way is run again on *every* seed
  (the seeds it had finished are deterministic, so they come out the same; their
  records stay in the interrupted trial's folder), and a trial that ASHA stops
  early, whichever seed it was on, ends FAIL ("stopped early") and never enters
  the front. ASHA sees the primary objective of the seed being trained, seed
  after seed, so its rungs compare configurations at the same seed and epoch.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import statistics
import time
from dataclasses import replace
from pathlib import Path

import optuna
from ray.tune.search.optuna import OptunaSearch

from qlsearch._drivers import (
    FINISHED,
    INTERRUPTED,
    Driver,
    changed_knobs,
    fingerprint,
    reap_stale,
    settle_version,
    storage_lock,
)
from qlsearch._failures import WORKER_RAISED, WorkerFailures
from qlsearch._registry import plugin_modules
from qlsearch._storage import (
    StorageUnavailable,
    check_storage,
    hide_password,
    keep_unstored,
    open_storage,
    record_outcome,
    resubmit_unstored,
    set_user_attrs,
)
from qlsearch.study import LISTABLE, MethodSpace, Param, Study
from qlsearch.trial import TrialConfig, record_attempt, run_trial, write_record

#: The reason a sampled trial that repeats a configuration of the study is not run (status
#: leaves these out of a method's budget).
REPEAT = "repeat: trial {number} ran this configuration; not run again, an unrun one was queued instead"

__all__ = ["INTERRUPTED", "StudySearch", "StudySpace", "open_study", "prepare", "run_sweep"]


# ---- sampling ----------------------------------------------------------------------


def _suggest(trial, name: str, param: Param, bound: int | None):
    """One knob; a constrained knob (``top_k``) only takes values ``<= bound``.

    Constrained categorical knobs get one Optuna parameter per bound value
    (``queryable.top_k|num_atoms=4``): a categorical distribution cannot change
    its choices between trials, and invalid combinations must never be sampled.
    """
    if param.choices is not None:
        choices = [c for c in param.choices if bound is None or c <= bound]
        if bound is not None and len(choices) != len(param.choices):
            name = f"{name}|<={bound}"
        return trial.suggest_categorical(name, choices)
    high = param.high if bound is None else min(param.high, bound)
    if param.is_int:
        return trial.suggest_int(name, int(param.low), int(high), log=param.log, step=int(param.step or 1))
    return trial.suggest_float(name, param.low, high, log=param.log, step=param.step)


def _versioned(name: str, definition, renamed: frozenset) -> str:
    """``name``, or ``name@<fingerprint>`` when the study file changed its definition since
    the first version (Optuna keeps one distribution per parameter name)."""
    return f"{name}@{fingerprint(definition)[:6]}" if name in renamed else name


def sample_knobs(trial, space: MethodSpace, renamed: frozenset = frozenset()) -> dict:
    from qlsearch._drivers import _param_definition

    knobs = dict(space.fixed)
    for param in space.params:  # bounds come before the knobs they bound
        bound_name = space.bound_of(param)
        name = _versioned(f"{space.method}.{param.name}", _param_definition(param), renamed)
        knobs[param.name] = _suggest(trial, name, param, knobs.get(bound_name) if bound_name else None)
    return knobs


class StudySpace:
    """Optuna's define-by-run space: a baseline's fixed settings, or a sampled method and knobs.

    A class, not a closure: Tune pickles the searcher (and so the space) into its
    experiment checkpoints.
    """

    def __init__(self, study: Study, renamed: frozenset = frozenset()):
        self.spaces = {s.method: s for s in study.spaces}
        self.renamed = renamed  # knobs whose definition changed since the first file version

    def __call__(self, trial) -> dict:
        attrs = trial.user_attrs
        if attrs.get("baseline") or attrs.get("fixed"):  # a baseline, a grid point, or a retry
            return {"method": attrs["method"], "knobs": attrs["knobs"], "baseline": attrs.get("baseline")}
        methods = list(self.spaces)
        if attrs.get("method") in self.spaces:  # a method's budget slot: the sampler picks its knobs
            method = attrs["method"]
        else:
            method = (methods[0] if len(methods) == 1 else
                      trial.suggest_categorical(_versioned("method", methods, self.renamed), methods))
        return {"method": method, "knobs": sample_knobs(trial, self.spaces[method], self.renamed), "baseline": None}


# ---- one Tune trial: every seed of one configuration --------------------------------


def reported_metrics(study: Study) -> list[str]:
    """The objectives, then the ``test_*`` twin of each ``val_*`` objective (reported beside it)."""
    from qlsearch.metrics import reported_beside

    names = [m.name for m in study.objectives]
    return names + reported_beside(names)


def aggregate(records: list[dict], metrics: list[str]) -> dict:
    """Per metric: the mean over seeds, its standard deviation (``_std``) and every seed's
    value in seed order (``_seeds``); NaN when a seed lacks it or it is not finite."""
    from qlsearch.metrics import metric_value

    result: dict = {}
    for name in metrics:
        values = [metric_value(r, name) for r in records]
        if any(v is None or not math.isfinite(v) for v in values):
            result[name] = float("nan")
            continue
        result[name] = statistics.fmean(values)
        result[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        result[f"{name}_seeds"] = values
    return result


def _asha_progress(study: Study, report):
    """``progress(epoch, losses)`` that reports the primary objective as it stands in the
    seed being trained (the others as NaN) so the scheduler can stop the trial early."""
    objectives = [m.name for m in study.objectives]
    primary = objectives[0]
    split = "val" if primary.startswith("val_") else "test"
    running_best = primary.startswith(("val_", "best_"))  # the value an evaluation would select
    best = {"epoch": math.inf, "value": math.inf}

    def progress(epoch: int, losses: dict[str, float]) -> None:
        if epoch < best["epoch"]:  # a new seed starts
            best["value"] = math.inf
        best.update(epoch=epoch, value=min(best["value"], losses[split]))
        value = best["value"] if running_best else losses[split]
        report({**dict.fromkeys(objectives, float("nan")), primary: value, "status": "running"})

    return progress


def run_configuration(config: dict, study: Study, record_dir: str, report=None,
                      latency_cache: str | None = None, cpu_fallback: str | None = None) -> dict:
    """Run ``config`` on every seed; returns the result Tune reports (objectives = means).

    ``latency`` in the result is the configuration's quiet latency measurement
    (qlsearch/profiling/_latency.py): one per configuration, shared by its seeds,
    kept under ``latency_cache`` (the study's ``<run>/latency``) so reruns reuse it.

    With ``report`` (the ASHA scheduler), every evaluation also reports the primary
    objective so far, the other objectives as NaN, so the scheduler can stop it early.
    ``cpu_fallback`` (why it runs on CPU although GPUs were asked) goes into every record.
    """
    import torch

    torch.set_num_threads(max(1, int(study.resources.cpus_per_trial)))
    objectives = [m.name for m in study.objectives]
    progress = _asha_progress(study, report) if report is not None else None
    knobs, train = study.settings(config["knobs"])
    records, failure = [], None
    attempts = record_attempt(record_dir)
    started = time.time()
    for seed in study.seeds:
        trial = TrialConfig(method=config["method"], knobs=dict(knobs), task=study.task,
                            train=train, seed=seed, profile=study.profile,
                            cache_dir=str(study.cache_path()), latency_cache=latency_cache)
        record = run_trial(trial, progress=progress)
        record["baseline"] = config.get("baseline")
        if cpu_fallback:
            record["cpu_fallback"] = cpu_fallback
        records.append(record)
        write_record(record, Path(record_dir) / f"seed{seed}.json")
        if record["status"] != "completed":
            failure = f"seed {seed}: {record['failure']}"
            break  # the configuration failed: the other seeds would not rescue its objectives
    result = {"status": "failed" if failure else "completed", "failure": failure,
              "record_dir": record_dir, "trial_seconds": time.time() - started,
              "node": attempts[-1]["node"], "attempts": len(attempts),
              "latency": next((r["profile"]["latency"] for r in records if "latency" in r["profile"]), None),
              "seeds": [r["seed"] for r in records], "cpu_fallback": cpu_fallback,
              **aggregate(records, reported_metrics(study))}
    if failure:
        result.update(dict.fromkeys(objectives, float("nan")))
    return result


def _trainable(config: dict, study: Study, run_dir: str, cpu_fallback: str | None = None):
    from ray import tune

    record_dir = Path(run_dir) / "trials" / tune.get_context().get_trial_id()
    report = tune.report if study.scheduler == "asha" else None
    tune.report(run_configuration(config, study, str(record_dir), report,
                                  latency_cache=str(Path(run_dir) / "latency"), cpu_fallback=cpu_fallback))


# ---- the searcher: all Optuna writes, in the driver ----------------------------------


def _nested(result: dict, name: str) -> dict | None:
    """``result[name]`` as the trial reported it: Tune hands the searcher a flattened
    result (``latency/forward_ratio_spread/q25``), so the dict is rebuilt from its keys."""
    if isinstance(result.get(name), dict):
        return result[name]
    found: dict = {}
    for key, value in result.items():
        if key.startswith(f"{name}/"):
            *parents, leaf = key.split("/")[1:]
            node = found
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return found or None


class StudySearch(OptunaSearch):
    """``OptunaSearch`` that records each trial's configuration and outcome as user attrs,
    and never leaves an Optuna trial RUNNING: anything but a completed trial with finite
    objectives is told as FAIL, with its reason. A trial whose worker failed is told when
    its reason arrives (``fail``, from ``WorkerFailures``, which Tune calls just after), or,
    when Tune gave up on it too early, handed on to the next Tune trial (``hand_on``).

    It runs only trials its ``Driver`` claimed from the study's queue (never one that
    ``ask`` would create), so several drivers share one study.

    When the storage stays unreachable (``StorageUnavailable``, after its retries) it
    keeps each result in ``unstored_dir``, suggests nothing more, and holds the error in
    ``outage`` for the driver to report.

    It relies on ``OptunaSearch``'s ``_ot_trials``/``_ot_study``/``_completed_trials``;
    tests/test_search.py checks this against the installed Ray.
    """

    #: what Tune must not pickle: the storage and everything that holds it (its URL has the password)
    _UNPICKLED = ("_storage", "_ot_study", "_ot_trials", "_handed_on")
    driver: Driver

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._awaiting_reason: set[str] = set()  # failed workers, told once their reason arrives
        #: (Tune trial id, Optuna trial, reason) of trials handed on, for the next Tune trials
        self._handed_on: list[tuple[str, optuna.Trial, str]] = []
        self._handed_on_numbers: set[int] = set()  # every Optuna trial handed on (once at most)

    @classmethod
    def for_study(cls, study: Study, storage, seed: int, unstored_dir: str | Path, driver: Driver | None = None,
                  renamed: frozenset = frozenset()) -> StudySearch:
        """``seed`` should differ between the drivers of one study (e.g. their sequence
        number), so no two draw the same random start-up points."""
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                    "nsgaii": optuna.samplers.NSGAIISampler,
                    "grid": optuna.samplers.TPESampler}  # grid points are enqueued: never sampled
        search = cls(space=StudySpace(study, renamed), metric=[m.name for m in study.objectives],
                     mode=["max" if m.higher_is_better else "min" for m in study.objectives],
                     storage=storage, study_name=study.name, sampler=samplers[study.sampler](seed=seed))
        search.driver = driver or Driver(study.drivers.heartbeat_seconds, version=1)
        search.unstored_dir, search.outage = Path(unstored_dir), None
        search.study = replace(study, storage=hide_password(study.storage))  # Tune pickles the searcher
        return search

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in self._UNPICKLED}

    def save(self, checkpoint_path: str):  # OptunaSearch.save pickles __dict__ whole
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__getstate__(), fh)

    def suggest(self, trial_id):
        if self.outage is not None:
            return FINISHED
        try:
            while True:
                if trial_id not in self._ot_trials:
                    claimed = self._handed_on.pop(0)[1] if self._handed_on else \
                        self.driver.next_trial(self._ot_study)
                    if claimed == FINISHED and self.study.max_retries and \
                            any(t not in self._completed_trials for t in self._ot_trials):
                        return None  # a trial still running here may yet be handed on: ask again
                    if claimed is None or claimed == FINISHED:
                        return claimed
                    self._ot_trials[trial_id] = claimed
                config = super().suggest(trial_id)
                if not (isinstance(config, dict) and self._replaced_repeat(trial_id, config)):
                    break
            if isinstance(config, dict):  # record the configuration now: a killed sweep can re-run it
                self._record(self._ot_trials[trial_id], {**{k: config.get(k) for k in ("method", "knobs", "baseline")},
                                                        "file_version": self.driver.version})
        except StorageUnavailable as err:  # start nothing more; what runs still finishes
            self.outage = err
            return FINISHED
        return config

    def on_trial_result(self, trial_id, result):
        if self.outage is None:
            try:
                super().on_trial_result(trial_id, result)
            except StorageUnavailable as err:
                self.outage = err

    @staticmethod
    def _record(ot_trial, attrs: dict) -> None:
        """``ot_trial.set_user_attr`` for every key, in one transaction."""
        set_user_attrs(ot_trial.storage, ot_trial._trial_id, attrs)
        ot_trial._cached_frozen_trial.user_attrs.update(attrs)  # what set_user_attr keeps too

    def _replaced_repeat(self, trial_id, config: dict) -> bool:
        """When the sampler repeated a configuration the study already has: the slot is told
        PRUNED (left out of the budget), an unrun configuration is queued in its place, and
        True says to claim again. False: ``config`` runs (new, or nothing unrun is left)."""
        ot_trial = self._ot_trials[trial_id]
        repeat_of = self._repeat_of(ot_trial, config)
        if repeat_of is None:
            return False
        # a shared budget (num_trials) may take the slot to another method: the sampled one's
        # space can be used up while another's is not (the cap counts every method's configurations)
        methods = [config["method"]] if self.study.trials_per_method else \
            [config["method"], *(s.method for s in self.study.spaces if s.method != config["method"])]
        replacement = next(((m, knobs) for m in methods
                            if (knobs := unrun_configuration(self.study, self._ot_study, m, ot_trial.number))
                            is not None), None)
        if replacement is None:  # none left: the budget cap makes this rare; run it
            return False
        self._record(ot_trial, {"failure": REPEAT.format(number=repeat_of), "method": config["method"],
                                "knobs": config["knobs"]})
        self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        # a retry slot (an interrupted trial's, sampled afresh) stays that trial's retry
        lineage = {"retry_of": ot_trial.user_attrs["retry_of"]} if "retry_of" in ot_trial.user_attrs else {}
        self._ot_study.enqueue_trial({}, user_attrs={"method": replacement[0], "knobs": replacement[1],
                                                     "fixed": True, **lineage})
        self.driver.release(ot_trial._trial_id)
        del self._ot_trials[trial_id]
        return True

    def _repeat_of(self, ot_trial, config: dict) -> int | None:
        """The trial that already has this sampled configuration (baselines, queued ones included)."""
        if config.get("baseline") or ot_trial.user_attrs.get("fixed"):
            return None
        return _configurations(self.study, self._ot_study, ot_trial.number).get(
            self.study.config_key(config["method"], config["knobs"]))

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if error and result is None:  # Tune's call for a failed worker: the reason follows
            self._awaiting_reason.add(trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        values, attrs = self._outcome(trial_id, result, error)
        self._completed_trials.add(trial_id)
        try:
            if self.outage is None:
                try:
                    self.driver.release(self._store(ot_trial, values, attrs))
                    return
                except StorageUnavailable as err:
                    self.outage = err
            keep_unstored(self.unstored_dir, ot_trial.number, values, attrs)
        finally:
            self.driver.release(ot_trial._trial_id)

    def _outcome(self, trial_id, result: dict | None, error: bool) -> tuple[list | None, dict]:
        """The objective values (None: the trial is told FAIL) and the user attrs to record."""
        result = result or {}
        values = [result.get(m) for m in self.metric]
        finished = result.get("status") == "completed"
        ok = finished and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        attrs = {"status": result.get("status", "error"), "tune_trial_id": trial_id,
                 "record_dir": result.get("record_dir"), "trial_seconds": result.get("trial_seconds"),
                 "latency": _nested(result, "latency"), "seeds": result.get("seeds"),
                 "cpu_fallback": result.get("cpu_fallback"), "node": _nested(result, "node"),
                 "attempts": result.get("attempts")}
        attrs.update({k: v for k, v in result.items() if k.endswith(("_std", "_seeds"))})
        # the test twins of val objectives: reported beside them, never told to Optuna
        attrs.update({k: v for k, v in result.items() if k.startswith("test_") and k not in self.metric})
        if not ok:  # failed, diverged or stopped early: never a point of the front
            missing = [m for m, v in zip(self.metric, values, strict=True)
                       if not (isinstance(v, int | float) and math.isfinite(v))]
            attrs["failure"] = result.get("failure") or (
                f"finished without a finite value of {', '.join(missing)}" if finished
                else "stopped early by the scheduler" if result and not error
                else WORKER_RAISED)
        # one storage transaction each: an attr left out reads as None too
        return (values if ok else None), {k: v for k, v in attrs.items() if v is not None}

    def _store(self, ot_trial, values: list | None, attrs: dict) -> int:
        """Tell the storage (retried through outages by ``RetryingStorage``); returns the id of
        the trial that took the result. When another driver found this one stale (it missed its
        heartbeats) and enqueued it again, the result goes to that retry unless it runs already."""
        try:
            record_outcome(self._ot_study, ot_trial.number, values, attrs)
            return ot_trial._trial_id
        except optuna.exceptions.UpdateFinishedTrialError:
            retry = self.driver.claim(self._ot_study, retry_of=ot_trial.number)
            if retry is None:
                logging.getLogger(__name__).warning(
                    "trial %d finished after another driver took it for stale, and its retry is running "
                    "already: this result is dropped (its records stay in %s)", ot_trial.number, attrs["record_dir"])
                return ot_trial._trial_id
            record_outcome(self._ot_study, retry.number, values, {"file_version": self.driver.version, **attrs})
            return retry._trial_id

    def fail(self, trial_id, result: dict) -> None:
        """End a trial whose worker failed (and was not retried) as FAIL; ``result`` holds
        its ``failure`` (the reason) and what is known of it (``record_dir``, ``node``)."""
        self._awaiting_reason.discard(trial_id)
        self.on_trial_complete(trial_id, {"status": "error", **result}, error=True)

    def hand_on(self, trial_id, reason: str) -> bool:
        """Keep the Optuna trial of a Tune trial whose worker failed RUNNING, and give it to
        the next Tune trial, which runs it afresh. ``WorkerFailures`` calls this when Tune gave
        up on the trial with retries left, having counted one lost worker twice. False, and
        nothing changes, when the trial is not this searcher's to hand on, or was handed on
        once already. With retries (only then can a trial be handed on), ``suggest`` says
        FINISHED only once none of its trials runs, so a Tune trial takes it; one still handed
        on when the sweep ends anyway (interrupted) is told FAIL, with ``reason``."""
        ot_trial = self._ot_trials.get(trial_id)
        if self.outage is not None or trial_id in self._completed_trials or ot_trial is None \
                or ot_trial.number in self._handed_on_numbers:
            return False
        self._awaiting_reason.discard(trial_id)
        self._handed_on_numbers.add(ot_trial.number)
        self._handed_on.append((trial_id, self._ot_trials.pop(trial_id), reason))
        return True

    def fail_unexplained(self) -> None:
        """After the sweep: a failed worker whose reason never came still ends FAIL, and so
        does a trial handed on that no Tune trial took (the sweep ended first)."""
        for trial_id in sorted(self._awaiting_reason):
            self.fail(trial_id, {"failure": WORKER_RAISED})
        while self._handed_on:
            trial_id, ot_trial, reason = self._handed_on.pop(0)
            self._ot_trials[trial_id] = ot_trial
            self.fail(trial_id, {"failure": reason})


def _configurations(study: Study, ot_study, but: int | None = None) -> dict:
    """``Study.config_key`` → the number of the first trial with it: every configuration the study
    ran, runs or has queued (an interrupted trial's is held by its retry); ``but`` left out."""
    seen: dict = {}
    for t in ot_study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if t.number != but and attrs.get("knobs") is not None and attrs.get("failure") != INTERRUPTED \
                and not str(attrs.get("failure") or "").startswith("repeat:"):
            seen.setdefault(study.config_key(attrs["method"], attrs["knobs"]), t.number)
    return seen


def unrun_configuration(study: Study, ot_study, method: str, number: int) -> dict | None:
    """A configuration of ``method``'s space that the study has not run nor queued, chosen at
    random (seeded by the trial ``number``); None when there is none, or the space is continuous."""
    import random

    space = next(s for s in study.spaces if s.method == method)
    size = space.size()
    if size is None:
        return None
    seen = _configurations(study, ot_study, number)
    rng = random.Random(f"{study.name}|{number}")
    if size <= LISTABLE:
        left = [k for k in space.points() if study.config_key(method, k) not in seen]
        return rng.choice(left) if left else None
    draws = (space.random_point(rng) for _ in range(1000))
    return next((k for k in draws if study.config_key(method, k) not in seen), None)


# ---- preparing the study: resume, baselines ----------------------------------------


def open_study(study: Study, root: str | Path = "runs"):
    """The Optuna study (created on first use) and its storage, with heartbeats enabled.

    A storage URL the study names is checked before anything is written; the default
    SQLite file needs the run folder, which is created first.
    """
    import warnings

    if study.storage:
        check_storage(study.storage)
    else:
        study.run_dir(root).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # Optuna marks heartbeat_interval experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = open_storage(study.storage_url(root), study.storage_retry_seconds,
                               heartbeat_interval=study.drivers.heartbeat_seconds,
                               grace_period=study.drivers.grace_seconds)
    ot_study = optuna.create_study(storage=storage, study_name=study.name, load_if_exists=True,
                                   directions=study.directions)
    objectives = [m.name for m in study.objectives]
    stored = ot_study.user_attrs.get("objectives")
    if stored is None:
        ot_study.set_user_attr("objectives", objectives)
        ot_study.set_user_attr("study_file", study.path)
    elif stored != objectives and not ot_study.user_attrs.get("file_versions"):  # (else: _drivers.check_file)
        raise ValueError(f"objectives: the stored study {study.name!r} optimises {stored}; this file "
                         f"asks for {objectives}: give the study another name")
    return ot_study, storage


def prepare(ot_study, study: Study, more: int = 0) -> int:
    """Re-enqueue trials whose driver is gone, enqueue what must run (the baselines, the
    budget's slots or grid points; ``more`` slots beyond the study file's budget, per
    method with ``trials_per_method``); return how many trials wait. Several drivers call
    this under ``storage_lock``."""
    State = optuna.trial.TrialState
    reap_stale(ot_study)
    extra = ot_study.user_attrs.get("more_trials", 0) + more
    if more:
        ot_study.set_user_attr("more_trials", extra)
    trials = ot_study.get_trials(deepcopy=False)
    present = {(t.user_attrs["baseline"], study.config_key(t.user_attrs["method"], t.user_attrs.get("knobs") or {}))
               for t in trials if t.user_attrs.get("baseline")}
    for b in study.baselines:
        if (b.label, study.config_key(b.method, b.knobs)) not in present:
            ot_study.enqueue_trial({}, user_attrs={"baseline": b.label, "method": b.method, "knobs": b.knobs})
    budget = study.budget(extra)  # capped at the distinct configurations (baselines not repeated)
    if budget.note:
        ot_study.set_user_attr("budget_note", budget.note)
    # slots per method with trials_per_method, else one budget (key None) for all
    per_method = bool(study.trials_per_method)
    slots = dict(budget.per_method) if per_method else ({None: budget.total} if study.spaces else {})
    used = dict.fromkeys(slots, 0)
    for t in trials:
        if _counts_against_budget(t):
            key = t.user_attrs.get("method") if per_method else None
            used[key] = used.get(key, 0) + 1
    if study.sampler == "grid":  # the grid in a seeded order: the points not run yet, up to the budget
        import random

        known = _configurations(study, ot_study)
        baselines = {study.config_key(b.method, b.knobs) for b in study.baselines}
        points = [p for p in study.grid() if study.config_key(*p) not in baselines]
        random.Random(study.name).shuffle(points)
        for method, knobs in points:
            key = method if per_method else None
            if study.config_key(method, knobs) not in known and used[key] < slots[key]:
                ot_study.enqueue_trial({}, user_attrs={"method": method, "knobs": knobs, "fixed": True})
                used[key] += 1
    else:  # slots the sampler fills when a driver claims them (a method's own, per method)
        for key, n in slots.items():
            for _ in range(n - used[key]):
                ot_study.enqueue_trial({}, user_attrs={"method": key} if key else {})
    return len(ot_study.get_trials(deepcopy=False, states=(State.WAITING,)))


def _counts_against_budget(t) -> bool:
    """A searched trial that ran, runs or will: not a baseline, not an interrupted run (its retry counts)."""
    State = optuna.trial.TrialState
    interrupted = t.state == State.FAIL and t.user_attrs.get("failure") == INTERRUPTED
    return not t.user_attrs.get("baseline") and not interrupted and t.state != State.PRUNED


# ---- the sweep ---------------------------------------------------------------------


def cpu_fallback(study: Study, gpus: float) -> str | None:
    """Why trials run on CPU although the study asks for GPUs (``resources.cpu_fallback``), or
    None when they get what they ask. Asking for GPUs where Ray sees none is an error otherwise:
    the trials would run on CPU without a word (or, asked of Ray, stay PENDING forever)."""
    asked = study.resources.gpus_per_trial
    if not asked or gpus:
        return None
    if not study.resources.cpu_fallback:
        raise ValueError(f"resources.gpus_per_trial: got {asked:g}, but Ray sees no GPU in this cluster; "
                         "allowed: 0, a cluster with GPUs, or resources.cpu_fallback = true to run on CPU")
    return f"resources.gpus_per_trial = {asked:g} but Ray saw no GPU: ran on CPU (resources.cpu_fallback = true)"


def _resources(study: Study, gpus: float) -> dict:
    """Per-trial resources that this cluster can give: asking for a GPU where there is
    none would leave the trial PENDING forever."""
    resources = {"cpu": study.resources.cpus_per_trial}
    if gpus and study.resources.gpus_per_trial:
        resources["gpu"] = min(study.resources.gpus_per_trial, gpus)
    return resources


def run_sweep(study: Study, root: str | Path = "runs", address: str | None = None,
              num_cpus: int | None = None, verbose: bool = True, more: int = 0) -> dict:
    """Run (or resume, or join) ``study``, with ``more`` trials beyond its budget; returns a
    summary with the sweep's timing. ``started``: the trials waiting when it began.

    Raises ``ValueError`` when the study file differs from the stored study in what
    ``more`` may not change (``_drivers.check_file``).
    """
    import ray
    from ray import tune

    from qlsearch.progress import TrialLines

    started = time.time()
    ot_study, storage = open_study(study, root)
    run_dir = study.run_dir(root).resolve()
    with storage_lock(storage, study.name):
        resubmit_unstored(ot_study, run_dir / "unstored")  # results an outage kept on disk, first
        version = settle_version(ot_study, study, more=bool(more))
        to_run = prepare(ot_study, study, more)
        number = ot_study.user_attrs.get("drivers", 0)  # this driver's sequence number: its sampler seed
        ot_study.set_user_attr("drivers", number + 1)
    storage_ready = time.time()
    summary = {"study": study.name, "storage": hide_password(study.storage_url(root)), "started": to_run}
    others = ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if to_run == 0 and not others:  # (another driver's running trials may still turn stale)
        summary.update(wall_seconds=time.time() - started, trial_seconds=0.0)
        return summary
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token auth
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own JSON/CSV/TensorBoard result files per trial: the study and the seed records
    # hold every result, and writing them is per-trial overhead (docs/cluster.md)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # ...whose absence Tune's result grid then reports as one warning line per trial
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    if not ray.is_initialized():
        # the workers import the study's module:attribute plug-ins by name: ship those that
        # are not installed, so every node of a cluster (and a local one) can import them
        shipped = plugin_modules(study.names())
        runtime_env = {"py_modules": shipped} if shipped else None
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
        else:
            # "local": a Ray of its own, even where `ray start` left this machine's address
            # in /tmp/ray/ray_current_cluster (a plain ray.init() would join that cluster)
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     runtime_env=runtime_env)
    ray_ready = time.time()
    gpus = ray.cluster_resources().get("GPU", 0)
    fallback = cpu_fallback(study, gpus)
    ot_study.set_user_attr("cpu_fallback", fallback)  # status and the report show it
    driver = Driver(study.drivers.heartbeat_seconds, version)
    search = StudySearch.for_study(study, storage, seed=number, unstored_dir=run_dir / "unstored", driver=driver,
                                   renamed=frozenset(changed_knobs(ot_study, study)))
    # what the workers get (Tune pickles it into its files): no password, one cache for every trial
    worker_study = replace(study, storage=hide_password(study.storage), cache_dir=str(study.cache_path(root)))
    scheduler = None
    if study.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        primary = study.objectives[0]
        scheduler = ASHAScheduler(metric=primary.name, mode="max" if primary.higher_is_better else "min")
    failures = WorkerFailures(search, run_dir)
    lines = TrialLines([m.name for m in study.objectives], verbose=verbose, reasons=failures.reasons,
                       handed_on=failures.handed_on)
    # FailureConfig: a trial whose worker (or node) died runs again up to max_retries times,
    # afresh and wherever there is room; after that it ends FAIL, its reason told by
    # WorkerFailures (node died: ...), and the sweep goes on
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, study=worker_study, run_dir=str(run_dir),
                                                 cpu_fallback=fallback),
                            _resources(study, gpus)),
        # reuse_actors: a trial's worker process (torch and the libraries already imported)
        # runs the next trial too, instead of a fresh process per trial
        # num_samples=-1: the searcher says when the study's queue is empty (FINISHED)
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=-1,
                                    max_concurrent_trials=study.resources.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(run_dir / "ray"), verbose=0,
                                  callbacks=[failures, lines],
                                  failure_config=tune.FailureConfig(max_failures=study.max_retries)),
    )
    fit_started = time.time()
    try:
        tuner.fit()
    finally:
        driver.stop()
    search.fail_unexplained()
    if search.outage is not None:
        kept = sorted(p.name for p in (run_dir / "unstored").glob("*.json"))
        raise StorageUnavailable(f"{search.outage}; the sweep stopped"
                                 + (f", {len(kept)} finished result(s) kept in {run_dir / 'unstored'}" if kept else "")
                                 + "; once the storage is back, run the sweep again with --resume")
    ended = time.time()
    wall, busy = ended - started, lines.busy_seconds()
    parts = {"storage_seconds": storage_ready - started, "ray_start_seconds": ray_ready - storage_ready,
             "workers_start_seconds": (lines.first_start() or ended) - fit_started}
    summary.update(wall_seconds=wall, trial_seconds=busy, overhead_seconds=wall - busy,
                   overhead_fraction=(wall - busy) / wall if wall else 0.0, **parts,
                   scheduling_seconds=wall - busy - sum(parts.values()))
    with storage_lock(storage, study.name):  # another driver may be appending too
        runs = ot_study.user_attrs.get("sweeps", [])
        ot_study.set_user_attr("sweeps", [*runs, {k: v for k, v in summary.items() if k != "storage"}])
    return summary
