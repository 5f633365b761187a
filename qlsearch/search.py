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
* Resume: finished trials (COMPLETE/FAIL) are never run again; trials left
  RUNNING by a killed driver are marked FAIL ("interrupted") and their
  configuration is enqueued again; the sweep runs what is left of the budget.
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

from qlsearch._failures import WORKER_RAISED, WorkerFailures
from qlsearch._registry import plugin_modules
from qlsearch.study import MethodSpace, Param, Study
from qlsearch.trial import TrialConfig, record_attempt, run_trial, write_record

INTERRUPTED = "interrupted: the sweep's driver stopped before this trial finished"


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


def sample_knobs(trial, space: MethodSpace) -> dict:
    knobs = dict(space.fixed)
    for param in space.params:  # bounds come before the knobs they bound
        bound_name = space.bound_of(param)
        knobs[param.name] = _suggest(trial, f"{space.method}.{param.name}", param,
                                     knobs.get(bound_name) if bound_name else None)
    return knobs


class StudySpace:
    """Optuna's define-by-run space: a baseline's fixed settings, or a sampled method and knobs.

    A class, not a closure: Tune pickles the searcher (and so the space) into its
    experiment checkpoints.
    """

    def __init__(self, study: Study):
        self.spaces = {s.method: s for s in study.spaces}

    def __call__(self, trial) -> dict:
        attrs = trial.user_attrs
        if attrs.get("baseline") or attrs.get("fixed"):  # a baseline, a grid point, or a retry
            return {"method": attrs["method"], "knobs": attrs["knobs"], "baseline": attrs.get("baseline")}
        methods = list(self.spaces)
        if attrs.get("method") in self.spaces:  # a method's budget slot: the sampler picks its knobs
            method = attrs["method"]
        else:
            method = methods[0] if len(methods) == 1 else trial.suggest_categorical("method", methods)
        return {"method": method, "knobs": sample_knobs(trial, self.spaces[method]), "baseline": None}


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
    attempts = record_attempt(record_dir)
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
              "node": attempts[-1]["node"], "attempts": len(attempts),
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
    objectives is told as FAIL, with its reason. A trial whose worker failed is told when
    its reason arrives (``fail``, from ``WorkerFailures``, which Tune calls just after).

    It relies on ``OptunaSearch``'s ``_ot_trials``/``_ot_study``/``_completed_trials``;
    tests/test_search.py checks this against the installed Ray.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._awaiting_reason: set[str] = set()  # failed workers, told once their reason arrives

    @classmethod
    def for_study(cls, study: Study, storage, seed: int) -> StudySearch:
        """``seed`` should differ between sweeps of one study (e.g. its trial count), so a
        resumed sweep does not draw the same random start-up points again."""
        samplers = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                    "nsgaii": optuna.samplers.NSGAIISampler,
                    "grid": optuna.samplers.TPESampler}  # grid points are enqueued: never sampled
        return cls(space=StudySpace(study), metric=[m.name for m in study.objectives],
                   mode=["max" if m.higher_is_better else "min" for m in study.objectives],
                   storage=storage, study_name=study.name, sampler=samplers[study.sampler](seed=seed))

    def suggest(self, trial_id):
        config = super().suggest(trial_id)
        if isinstance(config, dict):  # record the configuration now: a killed sweep can re-run it
            for key in ("method", "knobs", "baseline"):
                self._ot_trials[trial_id].set_user_attr(key, config.get(key))
        return config

    def on_trial_complete(self, trial_id, result=None, error=False):
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        if error and result is None:  # Tune's call for a failed worker: the reason follows
            self._awaiting_reason.add(trial_id)
            return
        ot_trial = self._ot_trials[trial_id]
        result = result or {}
        values = [result.get(m) for m in self.metric]
        finished = result.get("status") == "completed"
        ok = finished and all(isinstance(v, int | float) and math.isfinite(v) for v in values)
        attrs = {"status": result.get("status", "error"), "tune_trial_id": trial_id,
                 "record_dir": result.get("record_dir"), "trial_seconds": result.get("trial_seconds"),
                 "latency": _nested(result, "latency"), "seeds": result.get("seeds"),
                 "node": _nested(result, "node"), "attempts": result.get("attempts")}
        attrs.update({k: v for k, v in result.items() if k.endswith(("_std", "_seeds"))})
        # the test twins of val objectives: reported beside them, never told to Optuna
        attrs.update({k: v for k, v in result.items() if k.startswith("test_") and k not in self.metric})
        if not ok:
            attrs["failure"] = result.get("failure") or (
                "stopped early by the scheduler" if result and not finished and not error
                else WORKER_RAISED)
        for key, value in attrs.items():
            if value is not None:  # one storage transaction each: a missing attr reads as None too
                ot_trial.set_user_attr(key, value)
        if ok:
            self._ot_study.tell(ot_trial, values)
        else:  # failed, diverged or stopped early: never a point of the front
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.FAIL)
        self._completed_trials.add(trial_id)

    def fail(self, trial_id, result: dict) -> None:
        """End a trial whose worker failed (and was not retried) as FAIL; ``result`` holds
        its ``failure`` (the reason) and what is known of it (``record_dir``, ``node``)."""
        self._awaiting_reason.discard(trial_id)
        self.on_trial_complete(trial_id, {"status": "error", **result}, error=True)

    def fail_unexplained(self) -> None:
        """After the sweep: a failed worker whose reason never came still ends FAIL."""
        for trial_id in sorted(self._awaiting_reason):
            self.fail(trial_id, {"failure": WORKER_RAISED})


# ---- preparing the study: resume, baselines ----------------------------------------


def open_study(study: Study, root: str | Path = "runs"):
    """The Optuna study (created on first use) and its storage."""
    study.run_dir(root).mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(study.storage_url(root))
    ot_study = optuna.create_study(storage=storage, study_name=study.name, load_if_exists=True,
                                   directions=study.directions)
    objectives = [m.name for m in study.objectives]
    stored = ot_study.user_attrs.get("objectives")
    if stored is None:
        ot_study.set_user_attr("objectives", objectives)
        ot_study.set_user_attr("study_file", study.path)
    elif stored != objectives:
        raise ValueError(f"objectives: the stored study {study.name!r} optimises {stored}; this file "
                         f"asks for {objectives}: give the study another name")
    return ot_study, storage


def prepare(ot_study, study: Study) -> int:
    """Mark interrupted trials, enqueue what must (re)run; return how many Tune trials to start."""
    State = optuna.trial.TrialState
    trials = ot_study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == State.RUNNING:  # its driver died: record it, then run its configuration again
            ot_study._storage.set_trial_user_attr(t._trial_id, "failure", INTERRUPTED)
            ot_study._storage.set_trial_state_values(t._trial_id, State.FAIL)
            if t.user_attrs.get("method"):
                attrs = {k: t.user_attrs.get(k) for k in ("method", "knobs", "baseline")}
                if not attrs["baseline"]:
                    attrs.update(retry_of=t.number, fixed=True)
                ot_study.enqueue_trial({}, user_attrs=attrs)
    trials = ot_study.get_trials(deepcopy=False)
    present = {t.user_attrs.get("baseline") for t in trials if t.user_attrs.get("baseline")}
    for b in study.baselines:
        if b.label not in present:
            ot_study.enqueue_trial({}, user_attrs={"baseline": b.label, "method": b.method, "knobs": b.knobs})
    if study.sampler == "grid":  # enqueue the grid once, in a seeded order, up to the budget
        import random

        points = study.grid()
        random.Random(study.name).shuffle(points)
        if study.trials_per_method:
            points = [p for s in study.spaces for p in [q for q in points if q[0] == s.method][: study.trials_per_method]]
        known = {(t.user_attrs.get("method"), repr(sorted((t.user_attrs.get("knobs") or {}).items())))
                 for t in ot_study.get_trials(deepcopy=False) if not t.user_attrs.get("baseline")}
        for method, knobs in points[: study.num_trials]:
            if (method, repr(sorted(knobs.items()))) not in known:
                ot_study.enqueue_trial({}, user_attrs={"method": method, "knobs": knobs, "fixed": True})
    elif study.trials_per_method:  # the same number of slots for every searched method
        for space in study.spaces:
            used = sum(_counts_against_budget(t) for t in ot_study.get_trials(deepcopy=False)
                       if t.user_attrs.get("method") == space.method)
            for _ in range(study.trials_per_method - used):
                ot_study.enqueue_trial({}, user_attrs={"method": space.method})
    trials = ot_study.get_trials(deepcopy=False)
    waiting = sum(t.state == State.WAITING for t in trials)
    searched = sum(_counts_against_budget(t) for t in trials)
    remaining_searched = max(0, study.num_trials - searched) if study.spaces else 0
    return waiting + remaining_searched


def _counts_against_budget(t) -> bool:
    """A searched trial that ran (or will): not a baseline, not an interrupted run (its retry counts)."""
    State = optuna.trial.TrialState
    return (not t.user_attrs.get("baseline") and t.user_attrs.get("failure") != INTERRUPTED
            and t.state in (State.COMPLETE, State.FAIL, State.WAITING))


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
              num_cpus: int | None = None, verbose: bool = True) -> dict:
    """Run (or resume) ``study``; returns a summary with the sweep's timing."""
    import ray
    from ray import tune

    from qlsearch.progress import TrialLines

    started = time.time()
    ot_study, storage = open_study(study, root)
    to_run = prepare(ot_study, study)
    storage_ready = time.time()
    summary = {"study": study.name, "storage": study.storage_url(root), "started": to_run}
    if to_run == 0:
        summary.update(wall_seconds=time.time() - started, trial_seconds=0.0)
        return summary
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # local clusters: no token auth
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's own JSON/CSV/TensorBoard result files per trial: the study and the seed records
    # hold every result, and writing them is per-trial overhead (docs/cluster.md)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
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
    run_dir = study.run_dir(root).resolve()
    search = StudySearch.for_study(study, storage, seed=len(ot_study.trials))
    scheduler = None
    if study.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        primary = study.objectives[0]
        scheduler = ASHAScheduler(metric=primary.name, mode="max" if primary.higher_is_better else "min")
    failures = WorkerFailures(search, run_dir)
    lines = TrialLines([m.name for m in study.objectives], verbose=verbose, reasons=failures.reasons)
    # FailureConfig: a trial whose worker (or node) died runs again up to max_retries times,
    # afresh and wherever there is room; after that it ends FAIL, its reason told by
    # WorkerFailures (node died: ...), and the sweep goes on
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trainable, study=study, run_dir=str(run_dir)),
                            _resources(study)),
        # reuse_actors: a trial's worker process (torch and the libraries already imported)
        # runs the next trial too, instead of a fresh process per trial
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=to_run,
                                    max_concurrent_trials=study.resources.max_concurrent,
                                    reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(run_dir / "ray"), verbose=0,
                                  callbacks=[failures, lines],
                                  failure_config=tune.FailureConfig(max_failures=study.max_retries)),
    )
    fit_started = time.time()
    tuner.fit()
    search.fail_unexplained()
    ended = time.time()
    wall, busy = ended - started, lines.busy_seconds()
    parts = {"storage_seconds": storage_ready - started, "ray_start_seconds": ray_ready - storage_ready,
             "workers_start_seconds": (lines.first_start() or ended) - fit_started}
    summary.update(wall_seconds=wall, trial_seconds=busy, overhead_seconds=wall - busy,
                   overhead_fraction=(wall - busy) / wall if wall else 0.0, **parts,
                   scheduling_seconds=wall - busy - sum(parts.values()))
    runs = ot_study.user_attrs.get("sweeps", [])
    ot_study.set_user_attr("sweeps", [*runs, {k: v for k, v in summary.items() if k != "storage"}])
    return summary
