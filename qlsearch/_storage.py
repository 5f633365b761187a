"""The Optuna study's RDB storage: URLs as users write them, connections that outlive a
database restart, and a password that never leaves the driver's memory.

* ``storage_problems(url)`` checks a URL before anything is written, one line per problem:
  not a URL, an unknown dialect, an in-memory or unreachable SQLite path, a missing driver
  (with the pip command that installs it).
* ``driver_url(url)`` maps ``postgresql://`` (SQLAlchemy's default driver there is psycopg 3)
  and ``mysql://`` to a driver that is installed; the ``[postgres]`` extra installs psycopg2.
* ``open_storage(url, retry_seconds)`` is an ``RDBStorage`` whose pooled connections are
  pinged before use (``pool_pre_ping``: Optuna turns it on only for MySQL) and whose every
  call is retried with backoff for ``retry_seconds`` when the database is unreachable. After
  that, ``StorageUnavailable`` says in one line which storage (password hidden) and why, with
  the database's own words ("server closed the connection unexpectedly"), never Optuna's
  "invalid data in the commit" that wraps every SQLAlchemy error.
* ``hide_password(url)`` and ``redact(text, url)`` are what every message goes through.

Only the first connection is not retried: a wrong password, an unknown host or a missing
database is reported at once, in one line.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

from optuna.storages import RDBStorage

logger = logging.getLogger("qlsearch.storage")

#: The dialects Optuna's RDB storage supports, with their drivers in order of preference
#: (SQLAlchemy's name, the module it imports, the pip requirement that installs it).
DRIVERS = {
    "sqlite": [("pysqlite", "sqlite3", None)],
    "postgresql": [("psycopg2", "psycopg2", "qlsearch[postgres]  (psycopg2-binary)"),
                   ("psycopg", "psycopg", "'psycopg[binary]'"), ("pg8000", "pg8000", "pg8000")],
    "mysql": [("mysqldb", "MySQLdb", "mysqlclient"), ("pymysql", "pymysql", "pymysql"),
              ("mysqlconnector", "mysql.connector", "mysql-connector-python")],
}
#: What users also write: Heroku-style ``postgres://`` and MariaDB's own name.
ALIASES = {"postgres": "postgresql", "mariadb": "mysql"}
DEFAULT_RETRY_SECONDS = 60.0


class StorageUnavailable(RuntimeError):
    """The storage could not be reached (or written) in the retry window: one line, password hidden."""


# ---- URLs ----------------------------------------------------------------------------


def _parse(url: str):
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError, TypeError):
        return None


def hide_password(url: str | None) -> str | None:
    """``url`` with its password shown as ``***`` (a string that is not a URL is returned as is)."""
    parsed = _parse(url) if isinstance(url, str) else None
    if parsed is None or parsed.password is None:
        return url
    return parsed.render_as_string(hide_password=True)


def redact(text: str, url: str | None) -> str:
    """``text`` with ``url``'s password (as written, and URL-decoded) replaced by ``***``."""
    from urllib.parse import quote

    parsed = _parse(url) if isinstance(url, str) else None
    password = parsed.password if parsed is not None else None
    if password:
        for form in {str(password), quote(str(password), safe="")}:
            text = text.replace(form, "***")
    return text


def _installed_driver(dialect: str, asked: str | None):
    """``(driver, module, pip)`` of ``dialect``: the one ``asked`` for, else the first installed."""
    import importlib.util

    candidates = DRIVERS[dialect]
    if asked is not None:
        named = [d for d in candidates if d[0] == asked]
        if not named:
            return None, f"unknown driver {asked!r} for {dialect}; allowed: " + ", ".join(d[0] for d in candidates)
        candidates = named
    for driver in candidates:
        if importlib.util.find_spec(driver[1].split(".")[0]) is not None:
            return driver, None
    wanted = candidates[0]
    return None, (f"the {dialect} driver {wanted[1]} is not installed; install it with "
                  f"`pip install {wanted[2]}`")


def storage_problems(url: str) -> list[str]:
    """Everything wrong with a storage URL, one line each (``storage: ...``); [] when it is usable.

    Checks the URL's form, its dialect, its driver and, for SQLite, that its folder exists;
    it connects to nothing.
    """
    shown = hide_password(url)
    parsed = _parse(url) if isinstance(url, str) else None
    if parsed is None:
        return [f"storage: {shown!r} is not a database URL; allowed: an SQLAlchemy URL such as "
                "sqlite:///path/study.db or postgresql://user:password@host/database"]
    dialect, _, asked = parsed.drivername.partition("+")
    dialect = ALIASES.get(dialect, dialect)
    if dialect not in DRIVERS:
        return [f"storage: unknown database {parsed.drivername.partition('+')[0]!r} in {shown}; "
                f"allowed: {', '.join(DRIVERS)}"]
    problems = []
    _, missing = _installed_driver(dialect, asked or None)
    if missing:
        problems.append(f"storage: {missing}")
    if dialect == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            problems.append(f"storage: {shown} is an in-memory SQLite database, which keeps nothing; "
                            "allowed: sqlite:///<path of a file>")
        elif not Path(parsed.database).expanduser().parent.is_dir():
            problems.append(f"storage: the folder of {parsed.database} does not exist; "
                            "create it, or name a file in an existing folder")
    return problems


def driver_url(url: str) -> str:
    """``url`` with its dialect spelled as SQLAlchemy wants and the installed driver named
    (``postgresql://`` -> ``postgresql+psycopg2://``). Call after ``storage_problems`` is []."""
    parsed = _parse(url)
    dialect, _, asked = parsed.drivername.partition("+")
    dialect = ALIASES.get(dialect, dialect)
    driver, _ = _installed_driver(dialect, asked or None)
    return parsed.set(drivername=f"{dialect}+{driver[0]}").render_as_string(hide_password=False)


def check_storage(url: str) -> None:
    """Raise ``ValueError`` with every problem of ``url`` (one line each)."""
    problems = storage_problems(url)
    if problems:
        raise ValueError("\n".join(problems))


# ---- errors ----------------------------------------------------------------------------


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_transient(err: BaseException) -> bool:
    """A lost or refused connection, a locked SQLite file: worth retrying, unlike bad data."""
    from sqlalchemy import exc

    return any(isinstance(e, exc.OperationalError | exc.InterfaceError | exc.DisconnectionError
                          | exc.TimeoutError) or getattr(e, "connection_invalidated", False)
               for e in _chain(err))


#: Tries to open a new database that other processes are opening too (``schema_race``).
SCHEMA_RACE_TRIES = 5


def schema_race(err: BaseException) -> bool:
    """Whether opening a storage failed because another process created the same new
    database's tables at the same moment. Optuna creates them on first use, unguarded
    (optuna/optuna#1092): two drivers of one study, or ``qlsearch status`` beside a starting
    sweep, can both find the database empty, and the slower one fails on a table or version
    row the other made ("table studies already exists", "UNIQUE constraint failed:
    alembic_version.version_num"). Opening again finds the schema made."""
    from sqlalchemy import exc

    return any(isinstance(e, exc.IntegrityError) or "already exists" in str(e) for e in _chain(err))


def cause(err: BaseException) -> str:
    """The database driver's own first line (``server closed the connection unexpectedly``),
    not the wrappers SQLAlchemy and Optuna put around it."""
    innermost = None
    for e in _chain(err):
        if getattr(e, "orig", None) is not None:
            innermost = e.orig
    text = str(innermost if innermost is not None else err).strip()
    return (text.splitlines() or [type(err).__name__])[0].strip()


def unavailable(url: str, err: BaseException, seconds: float | None = None) -> StorageUnavailable:
    waited = f" for {seconds:.0f} s" if seconds else ""
    return StorageUnavailable(redact(f"storage {hide_password(url)} unreachable{waited}: {cause(err)}", url))


# ---- the storage ---------------------------------------------------------------------

#: The RDBStorage methods that touch the database: the BaseStorage API and what Optuna's
#: _CachedStorage calls on its backend.
_DATABASE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions", "get_study_user_attrs",
    "get_study_system_attrs", "get_all_studies", "create_new_trial", "_create_new_trial",
    "set_trial_param", "_set_trial_param", "get_trial_id_from_study_id_trial_number",
    "get_trial_number_from_id", "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial", "get_all_trials", "_get_trials",
    "get_n_trials", "get_best_trial", "_get_best_trial_id", "get_trial_params", "get_trial_user_attrs",
    "get_trial_system_attrs", "record_heartbeat", "_get_stale_trial_ids",
)
_inside = threading.local()  # calls made by a retried call are not retried again


def _retried(name: str):
    method = getattr(RetryingStorage, name)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if getattr(_inside, "active", False):
            return method(self, *args, **kwargs)
        _inside.active = True
        try:
            return self._with_retries(method, name, args, kwargs)
        finally:
            _inside.active = False

    return call


class RetryingStorage(RDBStorage):
    """``RDBStorage`` that retries every database call with backoff for ``retry_seconds``.

    A write whose commit reached the server before the connection dropped may be
    retried into "already finished": for ``set_trial_state_values`` that is success
    when the stored state is the one asked for.
    """

    def __init__(self, url: str, retry_seconds: float = DEFAULT_RETRY_SECONDS, user_url: str | None = None,
                 **kwargs):
        self.retry_seconds = retry_seconds
        self.user_url = user_url or url  # as the user wrote it: what messages name
        super().__init__(url, **kwargs)

    def _with_retries(self, method, name, args, kwargs):
        from optuna.exceptions import UpdateFinishedTrialError

        started, delay, failed = time.monotonic(), 0.5, None
        while True:
            try:
                return method(self, *args, **kwargs)
            except UpdateFinishedTrialError:
                if failed is not None and name == "set_trial_state_values":
                    trial_id, state = args[0], args[1] if len(args) > 1 else kwargs["state"]
                    if RDBStorage.get_trial(self, trial_id).state == state:
                        return True  # the first attempt was committed; only its answer was lost
                raise
            except Exception as err:
                if not is_transient(err):
                    raise
                waited = time.monotonic() - started
                if waited + delay > self.retry_seconds:
                    raise unavailable(self.user_url, err, waited) from None
                if failed is None:
                    logger.warning("%s; retrying for up to %.0f s", unavailable(self.user_url, err), self.retry_seconds)
                failed = err
                time.sleep(delay)
                delay = min(2 * delay, 8.0)


    def set_trial_user_attrs(self, trial_id: int, attrs: dict) -> None:
        """Every key of ``attrs`` in one transaction: a finished trial's dozen attributes cost
        one round trip, not a dozen (most of a sweep's per-trial time on the driver)."""
        from optuna.storages._rdb.models import TrialUserAttributeModel
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session, True) as session:
            for key, value in attrs.items():
                self._set_trial_attr_without_commit(session, TrialUserAttributeModel, trial_id, key, value)


for _name in (*_DATABASE_CALLS, "set_trial_user_attrs"):
    if hasattr(RetryingStorage, _name):
        setattr(RetryingStorage, _name, _retried(_name))


def set_user_attrs(storage, trial_id: int, attrs: dict) -> None:
    """``attrs`` on the trial: in one transaction where the storage is ours (behind Optuna's
    cache or not), one call per key on any other."""
    backend = getattr(storage, "_backend", storage)
    if isinstance(backend, RetryingStorage):
        backend.set_trial_user_attrs(trial_id, attrs)
    else:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial_id, key, value)


def open_storage(url: str, retry_seconds: float = DEFAULT_RETRY_SECONDS, **kwargs) -> RetryingStorage:
    """The storage at ``url`` (checked, its driver mapped), connected once, without retries:
    a wrong password, an unknown host or a missing database raise ``StorageUnavailable`` now.

    ``kwargs`` go to ``RDBStorage`` (e.g. ``heartbeat_interval``).
    """
    check_storage(url)
    full = driver_url(url)
    engine_kwargs = {"pool_pre_ping": True, **kwargs.pop("engine_kwargs", {})}
    if full.startswith("postgresql+psycopg"):  # an unknown or silent host fails, not hangs
        engine_kwargs.setdefault("connect_args", {"connect_timeout": 10})
    for tries_left in range(SCHEMA_RACE_TRIES - 1, -1, -1):
        try:
            return RetryingStorage(full, retry_seconds, user_url=url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as err:
            from sqlalchemy.exc import SQLAlchemyError

            if tries_left and schema_race(err):
                time.sleep(0.2)
                continue
            if isinstance(err, SQLAlchemyError) or is_transient(err) or any(
                    isinstance(e, SQLAlchemyError) for e in _chain(err)):
                raise unavailable(url, err) from None
            raise


# ---- results the storage could not take ----------------------------------------------


def record_outcome(ot_study, number: int, values: list | None, attrs: dict) -> None:
    """Store a finished trial: its user attrs, then COMPLETE with ``values`` (None: FAIL)."""
    import optuna

    trial_id = ot_study._storage.get_trial_id_from_study_id_trial_number(ot_study._study_id, number)
    set_user_attrs(ot_study._storage, trial_id, attrs)
    if values is None:
        ot_study.tell(number, state=optuna.trial.TrialState.FAIL)
    else:
        ot_study.tell(number, values)


def keep_unstored(folder: Path, number: int, values: list | None, attrs: dict) -> Path:
    """Write a result the storage did not take to ``folder/<number>.json`` (atomically)."""
    import json
    import os

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{number}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"number": number, "values": values, "attrs": attrs}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def resubmit_unstored(ot_study, folder: Path) -> int:
    """Store the results ``keep_unstored`` kept in ``folder``; returns how many were stored.

    A trial that is no longer RUNNING already holds its result (the write that failed had
    reached the database, or another driver stored it): its file is only removed.
    """
    import json

    stored = 0
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        kept = json.loads(path.read_text())
        trial = ot_study._storage.get_trial(
            ot_study._storage.get_trial_id_from_study_id_trial_number(ot_study._study_id, kept["number"]))
        if trial.state.name == "RUNNING":
            record_outcome(ot_study, kept["number"], kept["values"], kept["attrs"])
            stored += 1
        path.unlink()
    return stored
