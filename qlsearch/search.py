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

import math
import os
import statistics
import time
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
from qlsearch._registry import plugin_modules
from qlsearch.study import MethodSpace, Param, Study
from qlsearch.trial import TrialConfig, run_trial, write_record

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
                      latency_cache: str | None = None) -> dict:
    """Run ``config`` on every seed; returns the result Tune reports (objectives = means).

    ``latency`` in the result is the configuration's quiet latency measurement
    (qlsearch/profiling/_latency.py): one per configuration, shared by its seeds,
    kept under ``latency_cache`` (the study's ``<run>/latency``) so reruns reuse it.

    With ``report`` (the ASHA scheduler), every evaluation also reports the primary
    objective so far, the other objectives as NaN, so the scheduler can stop it early.
    """
    import torch

    torch.set_num_threads(max(1, int(study.resources.cpus_per_trial)))
    objectives = [m.name for m in study.objectives]
    progress = _asha_progress(study, report) if report is not None else None
    knobs, train = study.settings(config["knobs"])
    records, failure = [], None
    started = time.time()
    for seed in study.seeds:
        trial = TrialConfig(method=config["method"], knobs=dict(knobs), task=study.task,
                            train=train, seed=seed, profile=study.profile,
                            cache_dir=study.cache_dir, latency_cache=latency_cache)
        record = run_trial(trial, progress=progress)
        record["baseline"] = config.get("baseline")
        records.append(record)
        write_record(record, Path(record_dir) / f"seed{seed}.json")
        if record["status"] != "completed":
            failure = f"seed {seed}: {record['failure']}"
            break  # the configuration failed: the other seeds would not rescue its objectives
    result = {"status": "failed" if failure else "completed", "failure": failure,
              "record_dir": record_dir, "trial_seconds": time.time() - started,
              "latency": next((r["profile"]["latency"] for r in records if "latency" in r["profile"]), None),
              "seeds": [r["seed"] for r in records], **aggregate(records, reported_metrics(study))}
    if failure:
        result.update(dict.fromkeys(objectives, float("nan")))
    return result


def _trainable(config: dict, study: Study, run_dir: str):
    from ray import tune

    record_dir = Path(run_dir) / "trials" / tune.get_context().get_trial_id()
    report = tune.report if study.scheduler == "asha" else None
    tune.report(run_configuration(config, study, str(record_dir), report,
                                  latency_cache=str(Path(run_dir) / "latency")))


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
    objectives is told as FAIL, with its reason.

    It runs only trials its ``Driver`` claimed from the study's queue (never one that
    ``ask`` would create), so several drivers share one study.

    It relies on ``OptunaSearch``'s ``_ot_trials``/``_ot_study``/``_completed_trials``;
    tests/test_search.py checks this against the installed Ray.
    """

    driver: Driver

    @classmethod
    def for_study(cls, study: Study, storage, seed: int, driver: Driver | None = None,
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
        return search

    def suggest(self, trial_id):
        if trial_id not in self._ot_trials:
            claimed = self.driver.next_trial(self._ot_study)
            if claimed is None or claimed == FINISHED:
                return claimed
            self._ot_trials[trial_id] = claimed
        config = super().suggest(trial_id)
        if isinstance(config, dict):  # record the configuration now: a killed sweep can re-run it
            self._record(self._ot_trials[trial_id], {**{k: config.get(k) for k in ("method", "knobs", "baseline")},
                                                    "file_version": self.driver.version})
        return config

    @staticmethod
    def _record(ot_trial, attrs: dict) -> None:
        for key, value in attrs.items():
            ot_trial.set_user_attr(key, value)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        values = [result.get(m) for m in self.metric]
        finished = result.get("status") == "completed"
        ok = finished and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        attrs = {"status": result.get("status", "error"), "tune_trial_id": trial_id,
                 "record_dir": result.get("record_dir"), "trial_seconds": result.get("trial_seconds"),
                 "latency": _nested(result, "latency"), "seeds": result.get("seeds")}
        attrs.update({k: v for k, v in result.items() if k.endswith(("_std", "_seeds"))})
        # the test twins of val objectives: reported beside them, never told to Optuna
        attrs.update({k: v for k, v in result.items() if k.startswith("test_") and k not in self.metric})
        attrs["failure"] = None if ok else result.get("failure") or (
            "stopped early by the scheduler" if result and not finished and not error
            else "the trial's worker raised; see the Ray Tune logs")
        try:
            self._finish(ot_trial, attrs, values if ok else None)
        except optuna.exceptions.UpdateFinishedTrialError:
            # another driver found this trial stale (this one missed its heartbeats) and
            # enqueued it again: the result goes to that retry unless a driver claimed it
            retry = self.driver.claim(self._ot_study, retry_of=ot_trial.number)
            if retry is None:
                import logging

                logging.getLogger(__name__).warning(
                    "trial %d finished after another driver took it for stale, and its retry is running "
                    "already: this result is dropped (its records stay in %s)", ot_trial.number, attrs["record_dir"])
            else:
                self.driver.release(ot_trial._trial_id)
                ot_trial = retry
                self._finish(retry, {"file_version": self.driver.version, **attrs}, values if ok else None)
        self.driver.release(ot_trial._trial_id)
        self._completed_trials.add(trial_id)

    def _finish(self, ot_trial, attrs: dict, values: list | None) -> None:
        self._record(ot_trial, attrs)
        if values is not None:
            self._ot_study.tell(ot_trial, values)
        else:  # failed, diverged or stopped early: never a point of the front
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)


# ---- preparing the study: resume, baselines ----------------------------------------


def open_study(study: Study, root: str | Path = "runs"):
    """The Optuna study (created on first use) and its storage, with heartbeats enabled."""
    import warnings

    study.run_dir(root).mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # Optuna marks heartbeat_interval experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(study.storage_url(root),
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


def _config_key(t) -> tuple:
    return (t.user_attrs.get("method"), repr(sorted((t.user_attrs.get("knobs") or {}).items())))


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
    present = {(t.user_attrs["baseline"], *_config_key(t)) for t in trials if t.user_attrs.get("baseline")}
    for b in study.baselines:
        if (b.label, b.method, repr(sorted(b.knobs.items()))) not in present:
            ot_study.enqueue_trial({}, user_attrs={"baseline": b.label, "method": b.method, "knobs": b.knobs})
    # budgets per method with trials_per_method, else one budget (key None) for all
    per_method = bool(study.trials_per_method)
    budget = ({s.method: study.trials_per_method + extra for s in study.spaces} if per_method
              else {None: study.num_trials + extra} if study.spaces else {})
    used = dict.fromkeys(budget, 0)
    for t in trials:
        if _counts_against_budget(t):
            key = t.user_attrs.get("method") if per_method else None
            used[key] = used.get(key, 0) + 1
    if study.sampler == "grid":  # the grid in a seeded order: the points not run yet, up to the budget
        import random

        points = study.grid()
        random.Random(study.name).shuffle(points)
        known = {_config_key(t) for t in trials if not t.user_attrs.get("baseline")}
        for method, knobs in points:
            key = method if per_method else None
            if (method, repr(sorted(knobs.items()))) not in known and used[key] < budget[key]:
                ot_study.enqueue_trial({}, user_attrs={"method": method, "knobs": knobs, "fixed": True})
                used[key] += 1
    else:  # slots the sampler fills when a driver claims them (a method's own, per method)
        for key, slots in budget.items():
            for _ in range(slots - used[key]):
                ot_study.enqueue_trial({}, user_attrs={"method": key} if key else {})
    return len(ot_study.get_trials(deepcopy=False, states=(State.WAITING,)))


def _counts_against_budget(t) -> bool:
    """A searched trial that ran, runs or will: not a baseline, not an interrupted run (its retry counts)."""
    State = optuna.trial.TrialState
    interrupted = t.state == State.FAIL and t.user_attrs.get("failure") == INTERRUPTED
    return not t.user_attrs.get("baseline") and not interrupted and t.state != State.PRUNED


# ---- the sweep ---------------------------------------------------------------------


def _resources(study: Study) -> dict:
    """Per-trial resources that this cluster can give: asking for a GPU where there is
    none would leave the trial PENDING forever."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
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
    with storage_lock(storage, study.name):
        version = settle_version(ot_study, study, more=bool(more))
        to_run = prepare(ot_study, study, more)
        number = ot_study.user_attrs.get("drivers", 0)  # this driver's sequence number: its sampler seed
        ot_study.set_user_attr("drivers", number + 1)
    storage_ready = time.time()
    summary = {"study": study.name, "storage": study.storage_url(root), "started": to_run}
    others = ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    if to_run == 0 and not others:  # (another driver's running trials may still turn stale)
        summary.update(wall_seconds=time.time() - started, trial_seconds=0.0)
        return summary
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token auth
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized():
        # the workers import the study's module:attribute plug-ins by name: ship those that
        # are not installed, so every node of a cluster (and a local one) can import them
        shipped = plugin_modules(study.names())
        runtime_env = {"py_modules": shipped} if shipped else None
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    ray_ready = time.time()
    run_dir = study.run_dir(root).resolve()
    driver = Driver(study.drivers.heartbeat_seconds, version)
    search = StudySearch.for_study(study, storage, seed=number, driver=driver,
                                   renamed=frozenset(changed_knobs(ot_study, study)))
    scheduler = None
    if study.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        primary = study.objectives[0]
        scheduler = ASHAScheduler(metric=primary.name, mode="max" if primary.higher_is_better else "min")
    lines = TrialLines([m.name for m in study.objectives], verbose=verbose)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, study=study, run_dir=str(run_dir)),
                            _resources(study)),
        # reuse_actors: a trial's worker process (torch and the libraries already imported)
        # runs the next trial too, instead of a fresh process per trial
        # num_samples=-1: the searcher says when the study's queue is empty (FINISHED)
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=-1,
                                    max_concurrent_trials=study.resources.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(run_dir / "ray"), verbose=0,
                                  callbacks=[lines],
                                  failure_config=tune.FailureConfig(max_failures=study.max_retries)),
    )
    fit_started = time.time()
    try:
        tuner.fit()
    finally:
        driver.stop()
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
