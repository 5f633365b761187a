"""Several sweep drivers on one study, and a study that grows.

* **Claims.** A driver runs only trials it popped from the study's WAITING queue (the
  storage's WAITING -> RUNNING transition is atomic: one driver wins), never a trial it
  created itself. Everything that runs (the budget's slots, grid points, baselines,
  retries) is enqueued once, under ``storage_lock``, so two drivers never run the same
  slot and together they run the budget exactly.
* **Leases.** Trials run in Ray workers but every Optuna write happens in the driver, so
  the driver keeps each trial it claimed alive: one thread records an Optuna heartbeat
  (``RDBStorage.record_heartbeat``) for each of them every ``drivers.heartbeat_seconds``.
  A RUNNING trial whose last heartbeat is older than ``drivers.grace_seconds`` has lost
  its driver: whichever driver sees it first fails it ("interrupted") and enqueues its
  configuration again (the storage's row lock lets exactly one driver do so). A trial
  left RUNNING by a driver older than leases (no ``driver`` attribute) counts as stale
  once it started more than the grace period ago, by the local clock.
* **File versions.** The study's sections (objectives, space, baselines, and what a trial
  is: task, training, seeds) are stored in the study's user attrs at creation, with a
  fingerprint of each. ``--resume`` refuses a file whose sections differ, one line per
  difference; ``--more`` accepts a changed space or baselines as a new file version (not
  changed objectives or trials: old results would not compare) and every trial records
  the version its driver ran.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import threading
import time
import zlib
from dataclasses import asdict

import optuna

from qlsearch.study import Study

INTERRUPTED = "interrupted: the sweep's driver stopped before this trial finished"
FINISHED = "FINISHED"  # ray.tune.search.Searcher.FINISHED: this driver has nothing left to run
#: Sections that ``--more`` may change (a new file version); the others never change.
GROWABLE = ("space", "baselines")
#: How often an idle driver looks for work again (a WAITING trial or a stale one).
POLL_SECONDS = 1.0


# ---- the storage lock ------------------------------------------------------------------


#: A database's own lock, held by a connection (and released when its holder dies): the
#: SQL that takes it and gives it back, and the key each one takes for a lock's name.
_LOCKS = {"postgresql": ("SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)",
                         lambda name: zlib.crc32(name.encode())),
          "mysql": ("SELECT GET_LOCK(:k, -1)", "SELECT RELEASE_LOCK(:k)", lambda name: name)}


@contextlib.contextmanager
def storage_lock(storage, study_name: str):
    """Held while a driver prepares the study (enqueues, versions), so two drivers never
    both enqueue the same thing. The database's own lock, which dies with its holder:
    PostgreSQL's advisory lock, MySQL's ``GET_LOCK``, a ``flock`` beside a SQLite file.
    Other dialects get no lock: one driver at a time there."""
    from sqlalchemy import text

    engine = getattr(storage, "_backend", storage).engine
    dialect, name = engine.dialect.name, f"qlsearch:{study_name}"
    if dialect in _LOCKS:
        take, give_back, key = _LOCKS[dialect]
        with engine.connect() as conn:
            conn.execute(text(take), {"k": key(name)})
            try:
                yield
            finally:
                conn.execute(text(give_back), {"k": key(name)})
                conn.commit()
    elif dialect == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        import fcntl

        with open(f"{engine.url.database}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    else:
        yield


# ---- file versions ---------------------------------------------------------------------


def _param_definition(param) -> list | dict:
    if param.choices is not None:
        return list(param.choices)
    return {"low": param.low, "high": param.high, "log": param.log, "step": param.step}


def file_sections(study: Study) -> dict:
    """What the study file says about what runs, as plain JSON (lists are values)."""
    sections = {
        "objectives": [m.name for m in study.objectives],
        "space": {s.method: {**s.fixed, **{p.name: _param_definition(p) for p in s.params}} for s in study.spaces},
        "baselines": {b.label: {"method": b.method, "knobs": b.knobs} for b in study.baselines},
        "trial": {"task": asdict(study.task), "train": asdict(study.train), "seeds": study.seeds,
                  "profile": study.profile},
    }
    return json.loads(json.dumps(sections, default=str))  # tuples -> lists, as the storage keeps them


def fingerprint(section) -> str:
    return hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:16]


def _flat(value, path: str) -> dict:
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{path}.{key}").items()}
    return {path: value}


def differences(stored: dict, current: dict, sections=None) -> list[str]:
    """``space.queryable.r: stored [4, 8], file [4, 8, 16]``: one line per difference."""
    lines = []
    for name in sections if sections is not None else sorted(set(stored) | set(current)):
        old, new = _flat(stored.get(name, {}), name), _flat(current.get(name, {}), name)
        for path in sorted(set(old) | set(new)):
            if old.get(path, ...) != new.get(path, ...):
                shown = [json.dumps(v) if v is not ... else "absent" for v in (old.get(path, ...), new.get(path, ...))]
                lines.append(f"{path}: stored {shown[0]}, file {shown[1]}")
    return lines


def file_versions(ot_study) -> list[dict]:
    return list(ot_study.user_attrs.get("file_versions") or [])


def check_file(ot_study, study: Study, more: bool) -> list[str]:
    """The differences that forbid running ``study`` on the stored study; ``more``: a
    changed space or baselines are allowed (they make a new file version)."""
    versions = file_versions(ot_study)
    if not versions or not ot_study.trials:  # nothing ran yet: the file may still say what the study is
        return []
    current = file_sections(study)
    changed = differences(versions[-1]["sections"], current,
                          sections=sorted(s for s in current if not (more and s in GROWABLE)))
    if changed:
        why = ("--more accepts a changed space or baselines, not these" if more else
               "--resume continues the same study file; --more N accepts a changed space or baselines")
        return [f"study {study.name!r} differs from its stored file ({why}; or give the study another name):",
                *changed]
    return []


def settle_version(ot_study, study: Study, more: bool) -> int:
    """The file version this driver runs: the stored latest, or a new one (``more`` and a
    changed space or baselines). Call under ``storage_lock``. Raises ``ValueError`` with
    ``check_file``'s lines."""
    problems = check_file(ot_study, study, more)
    if problems:
        raise ValueError("\n".join(problems))
    versions = file_versions(ot_study)
    current = file_sections(study)
    if not ot_study.trials:
        versions = []
    if versions and versions[-1]["sections"] == current:
        return versions[-1]["version"]
    changes = differences(versions[-1]["sections"], current) if versions else []
    versions.append({"version": len(versions) + 1, "file": study.path, "changes": changes,
                     "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "fingerprints": {name: fingerprint(section) for name, section in current.items()},
                     "sections": current})
    ot_study.set_user_attr("file_versions", versions)
    return versions[-1]["version"]


def changed_knobs(ot_study, study: Study) -> set[str]:
    """``method.knob`` (and ``method``) whose definition differs from the first file
    version's: their Optuna parameters take a new name, since a categorical distribution
    cannot change its choices within one study."""
    versions = file_versions(ot_study)
    if not versions:
        return set()
    first, now = versions[0]["sections"]["space"], file_sections(study)["space"]
    changed = {f"{m}.{k}" for m, knobs in now.items() for k, v in knobs.items() if first.get(m, {}).get(k, ...) != v}
    if list(first) != list(now):
        changed.add("method")
    return changed


# ---- leases ----------------------------------------------------------------------------


def _is_stale_legacy(t: optuna.trial.FrozenTrial, grace_seconds: int) -> bool:
    """A RUNNING trial of a driver older than leases: stale once it started ``grace`` ago."""
    started = t.datetime_start
    return (not t.user_attrs.get("driver") and started is not None
            and (datetime.datetime.now() - started).total_seconds() > grace_seconds)


def retry_attrs(t: optuna.trial.FrozenTrial) -> dict:
    """What to enqueue for an interrupted trial: its configuration if it was recorded (a
    baseline stays a baseline), else the same slot, sampled afresh."""
    attrs = {k: t.user_attrs[k] for k in ("method", "knobs", "baseline", "fixed") if k in t.user_attrs}
    if attrs.get("knobs") is not None and not attrs.get("baseline"):
        attrs["fixed"] = True
    return {**attrs, "retry_of": t.number}


def reap_stale(ot_study) -> list[int]:
    """Fail the RUNNING trials whose driver is gone and enqueue each again; returns their
    numbers. Safe with several drivers: only the one whose FAIL lands enqueues the retry.
    The grace period is the storage's (``open_study`` sets it from the study's ``[drivers]``)."""
    State = optuna.trial.TrialState
    storage = ot_study._storage
    backend = getattr(storage, "_backend", storage)
    grace_seconds = backend.grace_period or 2 * backend.heartbeat_interval
    stale = set(storage._get_stale_trial_ids(ot_study._study_id))
    running = ot_study.get_trials(deepcopy=False, states=(State.RUNNING,))
    stale |= {t._trial_id for t in running if _is_stale_legacy(t, grace_seconds)}
    reaped = []
    for t in running:
        if t._trial_id not in stale:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "failure", INTERRUPTED)
            if not storage.set_trial_state_values(t._trial_id, State.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another driver reaped it first, or its own driver finished it after all
        ot_study.enqueue_trial({}, user_attrs=retry_attrs(storage.get_trial(t._trial_id)))
        reaped.append(t.number)
    return reaped


def claim(ot_study, retry_of: int | None = None) -> int | None:
    """Pop a WAITING trial (its id; only the retry of trial ``retry_of`` if given), or None
    when none is left. The heartbeat is recorded before the trial turns RUNNING, so a
    claimed trial is never without one."""
    State = optuna.trial.TrialState
    storage = ot_study._storage
    for t in storage.get_all_trials(ot_study._study_id, deepcopy=False, states=(State.WAITING,)):
        if retry_of is not None and t.user_attrs.get("retry_of") != retry_of:
            continue
        try:
            storage.record_heartbeat(t._trial_id)
            if storage.set_trial_state_values(t._trial_id, State.RUNNING):
                return t._trial_id
        except (optuna.exceptions.UpdateFinishedTrialError, optuna.exceptions.StorageInternalError):
            continue  # another driver took it
    return None


class Driver:
    """This process's claims on a study's trials and the thread that keeps them alive.

    Picklable (Tune checkpoints the searcher that holds it): the thread is not pickled.
    """

    def __init__(self, heartbeat_seconds: int, version: int):
        self.heartbeat_seconds, self.version = heartbeat_seconds, version
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.live: dict[int, object] = {}  # trial id -> storage, while the trial runs
        self._idle_until = self._next_reap = 0.0
        self._stop: threading.Event | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "live": {}, "_stop": None}

    def next_trial(self, ot_study):
        """A claimed ``optuna.Trial``; None (nothing now: ask again) while other drivers
        still run trials that may turn stale; ``FINISHED`` when nothing is left."""
        now = time.monotonic()
        if now < self._idle_until:
            return None
        if now >= self._next_reap:  # a trial turns stale after a grace period, not between two claims
            reap_stale(ot_study)
            self._next_reap = now + self.heartbeat_seconds
        trial = self.claim(ot_study)
        if trial is not None:
            return trial
        self._idle_until = time.monotonic() + POLL_SECONDS
        running = ot_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return None if any(t._trial_id not in self.live for t in running) else FINISHED

    def claim(self, ot_study, retry_of: int | None = None) -> optuna.Trial | None:
        """``claim`` for this driver: the trial is kept alive until ``release``."""
        trial_id = claim(ot_study, retry_of)
        if trial_id is None:
            return None
        self.live[trial_id] = ot_study._storage
        self._start()
        ot_study._storage.set_trial_user_attr(trial_id, "driver", self.name)
        return optuna.Trial(ot_study, trial_id)

    def release(self, trial_id: int) -> None:
        self.live.pop(trial_id, None)

    def _start(self) -> None:
        if self._stop is None:
            self._stop = threading.Event()
            threading.Thread(target=self._beat, args=(self._stop,), name="qlsearch-heartbeat", daemon=True).start()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.heartbeat_seconds):
            for trial_id, storage in list(self.live.items()):
                with contextlib.suppress(Exception):  # a missed beat is retried next interval
                    storage.record_heartbeat(trial_id)
