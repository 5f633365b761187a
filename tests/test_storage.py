"""Storage that survives what databases do, secrets that stay secret, writes that stay in
their folders, and one pre-training cache per sweep.

The PostgreSQL tests start their own throwaway server (tests/_pgserver.py) on a free port,
so restarting or stopping it disturbs nobody; they skip where the server binaries are
missing (``.ci/run`` installs them).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest

from qlsearch.cli import main
from qlsearch.search import INTERRUPTED

from ._pgserver import Server, binaries

ray = pytest.importorskip("ray")

TINY = {
    "objectives": ["val_mse", "train_mse"],  # measured without profiling: quick trials
    "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
    "train": {"epochs": 2, "pretrain_epochs": 1, "batch_size": 200},
    "space": {"queryable": {"r": [2, 4], "num_atoms": [2, 4], "top_k": [1, 2], "num_blocks": 2, "d_k": 8}},
    "sampler": "grid",
    "profile": False,
    "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
}


@pytest.fixture(scope="module")
def ray_temp():
    """Ray of this module, with its own temp folder (searched for secrets, and never joined
    to another Ray instance on the machine)."""
    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    folder = tempfile.mkdtemp(prefix="qlray-")  # short: Ray's socket paths must fit ~100 chars
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=folder)
    yield Path(folder)
    ray.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def pg():
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql (.ci/run installs them)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    server = Server(bin_dir)
    yield server
    server.remove()


def write_study(folder: Path, name: str, **changes) -> Path:
    """A study file (TOML) from TINY with ``changes``."""
    data = {**TINY, "name": name, **changes}
    lines = []
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for key, value in data.items():
        if key not in tables:
            lines.append(f"{key} = {json.dumps(value)}")
    for key, table in tables.items():
        if key == "space":
            for method, knobs in table.items():
                lines.append(f"[space.{method}]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in knobs.items()]
        else:
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def files_under(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders if f.exists() for p in f.rglob("*") if p.is_file()}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error: " in line]


def complete_configurations(url: str, name: str) -> list[tuple]:
    trials = optuna.load_study(study_name=name, storage=url.replace("postgresql://", "postgresql+psycopg2://"))
    return [t for t in trials.get_trials() if t.state == optuna.trial.TrialState.COMPLETE]


# ---- the storage table: bad storages are one line, and touch nothing -------------------

MISSING_DRIVER = next(((url, module) for url, module in [("postgresql+pg8000://u:p@localhost/db", "pg8000"),
                                                         ("mysql+pymysql://u:p@localhost/db", "pymysql")]
                       if __import__("importlib.util").util.find_spec(module) is None), (None, None))

# (case, storage, exit code, the first error line starts with, needs the PostgreSQL server)
STORAGE_CASES = [
    ("not a URL", "just some words", 2, "storage: 'just some words' is not a database URL; allowed:", False),
    ("relative SQLite folder missing", "sqlite:///no/such/folder/study.db", 2,
     "storage: the folder of no/such/folder/study.db does not exist", False),
    ("unknown dialect", "oracle9://u:p@localhost/db", 2, "storage: unknown database 'oracle9' in", False),
    ("unknown driver", "postgresql+bogus://u:p@localhost/db", 2,
     "storage: unknown driver 'bogus' for postgresql; allowed: psycopg2, psycopg, pg8000", False),
    ("missing driver", MISSING_DRIVER[0], 2, f"storage: the {(MISSING_DRIVER[0] or '').split('+')[0]} driver "
     f"{MISSING_DRIVER[1]} is not installed; install it with `pip install", False),
    ("SQLite folder missing", "sqlite:///{tmp}/no/such/folder/study.db", 2,
     "storage: the folder of {tmp}/no/such/folder/study.db does not exist", False),
    ("in-memory SQLite", "sqlite://", 2, "storage: sqlite:// is an in-memory SQLite database, which keeps nothing",
     False),
    ("nothing listening", "postgresql://u:{password}@localhost:9/db", 1,
     'storage postgresql://u:***@localhost:9/db unreachable: connection to server at "localhost"', False),
    ("wrong password", "postgresql://storetest:{password}-wrong@localhost:{port}/storetest", 1,
     "storage postgresql://storetest:***@localhost:{port}/storetest unreachable: connection to server", True),
    ("missing database", "postgresql://storetest:{password}@localhost:{port}/nosuchdb", 1,
     "storage postgresql://storetest:***@localhost:{port}/nosuchdb unreachable: connection to server", True),
]


@pytest.mark.parametrize("case,storage,code,first,needs_pg", STORAGE_CASES, ids=[c[0] for c in STORAGE_CASES])
def test_bad_storage_is_one_line_and_touches_nothing(case, storage, code, first, needs_pg, tmp_path, request,
                                                     capsys, monkeypatch):
    if storage is None:
        pytest.skip("every driver this case could name is installed")
    server = request.getfixturevalue("pg") if needs_pg else None
    from qlsearch.search import open_study
    from qlsearch.study import load_study

    values = {"tmp": tmp_path, "password": server.password if server else "Pw-no-server-here",
              "port": server.port if server else 0}
    storage, first = storage.format(**values), first.format(**values)
    root = tmp_path / "runs"
    monkeypatch.chdir(tmp_path)
    # an existing study, in its default SQLite storage, with one finished trial
    existing, _ = open_study(load_study(write_study(tmp_path, "existing")), root)
    existing.tell(existing.ask(), [0.5, 10.0])
    write_study(tmp_path, "existing", storage=storage).rename(tmp_path / "bad.toml")  # same name, bad storage
    before = files_under(tmp_path)
    for command in (["sweep", str(tmp_path / "bad.toml"), "--root", str(root)],
                    ["status", str(tmp_path / "bad.toml"), "--root", str(root)],
                    ["report", str(tmp_path / "bad.toml"), "--root", str(root), "--out", str(tmp_path / "reports")]):
        capsys.readouterr()
        try:
            rc = main(command)
        except SystemExit as exit_:
            rc = exit_.code
        err = capsys.readouterr().err
        assert rc == code, (command[0], err)
        lines = error_lines(err)
        message = lines[0].split(": error: ", 1)[1] if lines else ""
        assert message.removeprefix(f"{command[1]}: ").startswith(first), (command[0], err)
        assert "Traceback" not in err and values["password"] not in err
        assert files_under(tmp_path) == before, command[0]  # nothing created, the storage byte-identical


def test_plain_postgresql_url_maps_to_the_installed_driver():
    from qlsearch._storage import driver_url, storage_problems

    assert storage_problems("postgresql://u:p@host/db") == []
    assert driver_url("postgresql://u:p@host/db") == "postgresql+psycopg2://u:p@host/db"
    assert driver_url("postgres://u:p@host:5433/db") == "postgresql+psycopg2://u:p@host:5433/db"
    assert driver_url("postgresql+psycopg2://u:p@host/db") == "postgresql+psycopg2://u:p@host/db"


def test_password_is_hidden_as_written_and_as_decoded():
    from qlsearch._storage import hide_password, redact

    url = "postgresql://me:p%40ss%2Fw0rd-42@db.example/studies"  # the password is "p@ss/w0rd-42"
    assert hide_password(url) == "postgresql://me:***@db.example/studies"
    assert redact("login p@ss/w0rd-42 failed for p%40ss%2Fw0rd-42", url) == "login *** failed for ***"
    assert hide_password("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_pooled_connections_are_pinged_before_use(tmp_path):
    from qlsearch._storage import open_storage

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}")
    assert storage.engine.pool._pre_ping is True  # SQLAlchemy's pool_pre_ping


def _open_at_once(url: str, barrier, answers) -> None:
    from qlsearch._storage import open_storage

    barrier.wait()
    try:
        open_storage(url)
        answers.put("opened")
    except Exception as err:  # noqa: BLE001  (the test reports what failed)
        answers.put(f"{type(err).__name__}: {err}")


def test_processes_opening_a_new_database_at_once_all_open_it(tmp_path):
    """Optuna creates a new database's tables on first use, unguarded: processes that open it
    at the same moment (two drivers of one study, ``status`` beside a starting sweep) race,
    and the slower ones failed on a table or version row another had just made. Six
    processes, four new databases: every one opens (before the fix, 2 of 5 rounds of four
    processes had one failing)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")  # the test's imports, without re-importing them
    for round_ in range(4):
        barrier, answers = context.Barrier(6), context.Queue()
        url = f"sqlite:///{tmp_path / f'new{round_}.db'}"
        processes = [context.Process(target=_open_at_once, args=(url, barrier, answers)) for _ in range(6)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
        assert [answers.get(timeout=10) for _ in processes] == ["opened"] * 6


# ---- PostgreSQL restarts and outages --------------------------------------------------


def _watch(records: Path, actions: dict[int, callable], stop: threading.Event) -> threading.Thread:
    """Run ``actions[n]`` once ``n`` trial records exist under ``records`` (a sweep's trials/)."""
    def loop():
        pending = dict(sorted(actions.items()))
        while pending and not stop.is_set():
            done = len(list(records.glob("*/seed0.json"))) if records.exists() else 0
            for n in [n for n in pending if n <= done]:
                pending.pop(n)()
            time.sleep(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def test_postgresql_restarts_mid_sweep_lose_no_result(pg, ray_temp, tmp_path, capsys):
    """The server restarts twice while the sweep runs: every trial ends COMPLETE with the
    values its records on disk hold (issue 14: one ended FAIL, "the trial's worker raised")."""
    name = "restarts"
    path = write_study(tmp_path, name, storage=pg.url, storage_retry_seconds=60,
                       resources={"cpus_per_trial": 1, "max_concurrent": 2})
    root = tmp_path / "runs"
    restarted = []
    stop = threading.Event()
    watcher = _watch(root / name / "trials", {1: lambda: (pg.restart(), restarted.append(1)),
                                              4: lambda: (pg.restart(), restarted.append(4))}, stop)
    try:
        assert main(["sweep", str(path), "--root", str(root), "--quiet"]) == 0
    finally:
        stop.set()
        watcher.join()
    assert restarted == [1, 4]
    trials = optuna.load_study(study_name=name, storage=pg.url.replace("postgresql://", "postgresql+psycopg2://"))
    trials = trials.get_trials()
    records = {p.parent.name: json.loads(p.read_text()) for p in (root / name / "trials").glob("*/seed0.json")}
    assert len(trials) == len(records) == 8  # the 2x2x2 grid
    for t in trials:
        assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs.get("failure")
        record = records[t.user_attrs["tune_trial_id"]]
        assert record["status"] == "completed"
        assert t.values == [record["metrics"]["val_mse"], record["metrics"]["train_mse"]]


def test_long_outage_is_one_line_and_resume_completes_every_configuration(pg, ray_temp, tmp_path, capsys):
    """The server is down for longer than the retry window: one line naming the storage
    (password hidden) and the cause, exit 1; with the server back, ``--resume`` stores the
    results kept on disk and runs the rest: every configuration COMPLETE exactly once."""
    name = "outage"
    path = write_study(tmp_path, name, storage=pg.url, storage_retry_seconds=2, num_trials=4,
                       space={"queryable": {"r": [2, 4], "num_atoms": [2], "top_k": [1, 2], "num_blocks": 2,
                                            "d_k": 8}})
    root = tmp_path / "runs"
    stop = threading.Event()
    watcher = _watch(root / name / "trials", {1: pg.stop}, stop)
    try:
        capsys.readouterr()
        assert main(["sweep", str(path), "--root", str(root), "--quiet"]) == 1
    finally:
        stop.set()
        watcher.join()
        pg.start()
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    line = lines[0]
    assert line.startswith(f"qlsearch sweep: error: storage postgresql://storetest:***@localhost:{pg.port}/storetest "
                           "unreachable for ")
    assert any(cause in line for cause in ("Connection refused", "server closed the connection unexpectedly",
                                           "terminating connection due to administrator command",
                                           "the database system is shutting down"))
    assert "--resume" in line and pg.password not in captured.err + captured.out
    assert main(["sweep", str(path), "--root", str(root), "--quiet", "--resume"]) == 0
    trials = optuna.load_study(study_name=name, storage=pg.url.replace("postgresql://", "postgresql+psycopg2://"))
    trials = trials.get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    configurations = sorted(json.dumps(t.user_attrs["knobs"], sort_keys=True) for t in complete)
    assert len(configurations) == len(set(configurations)) == 4  # the 2x1x2 grid, each once
    # nothing else failed: a trial left running by the outage is "interrupted", never a false reason
    assert all(t.user_attrs.get("failure") == INTERRUPTED for t in trials if t.state != optuna.trial.TrialState.COMPLETE)
    assert not list((root / name / "unstored").glob("*.json"))  # every kept result was stored
    records = [json.loads(p.read_text()) for p in (root / name / "trials").glob("*/seed0.json")]
    finished = {json.dumps({k: v for k, v in r["config"]["knobs"].items()}, sort_keys=True)
                for r in records if r["status"] == "completed"}
    assert finished >= set(configurations)


# ---- secrets ---------------------------------------------------------------------------


def test_storage_password_is_in_no_file_and_no_output(pg, ray_temp, tmp_path, capsys):
    """A sweep, status, report and the error paths, with a password in the storage URL: the
    password is in none of the files under the root, the reports, Ray's temp folder, nor
    in anything printed."""
    root, reports, studies = tmp_path / "runs", tmp_path / "reports", tmp_path / "studies"
    studies.mkdir()  # the user's own files hold the password: all else is searched
    path = write_study(studies, "secret", storage=pg.url, num_trials=2,
                       space={"queryable": {"r": [2], "num_atoms": [2], "top_k": [1, 2], "num_blocks": 2, "d_k": 8}})
    other = write_study(studies, "never-run", storage=pg.url)
    wrong = write_study(studies, "wrong", storage=pg.url.replace(pg.password, pg.password + "x"))
    outputs, codes = [], []
    commands = [
        ["sweep", str(path), "--root", str(root)],
        ["sweep", str(path), "--root", str(root)],  # an existing study without --resume
        ["sweep", str(path), "--root", str(root), "--resume"],
        ["status", str(path), "--root", str(root)],
        ["status", str(path), "--root", str(root), "--json"],
        ["report", str(path), "--root", str(root), "--out", str(reports)],
        ["status", str(other), "--root", str(root)],  # a study not in the storage
        ["report", str(other), "--root", str(root), "--out", str(reports)],
        ["sweep", str(wrong), "--root", str(root)],  # a wrong password
        ["status", str(wrong), "--root", str(root)],
    ]
    for command in commands:
        try:
            codes.append(main(command))
        except SystemExit as exit_:
            codes.append(exit_.code)
        captured = capsys.readouterr()
        outputs.append(captured.out + captured.err)
    assert codes == [0, 2, 0, 0, 0, 0, 2, 2, 1, 1], outputs
    assert "storetest:***@localhost" in outputs[1] and "storetest:***@localhost" in outputs[6]
    searched = [p for p in files_under(tmp_path, ray_temp) if studies not in p.parents]
    leaks = [str(p) for p in searched if pg.password.encode() in p.read_bytes()]
    assert leaks == []
    assert [i for i, out in enumerate(outputs) if pg.password in out] == []
    assert (reports / "secret" / "index.html").is_file()
    assert list((root / "secret" / "ray").rglob("*.pkl"))  # Tune's pickles exist, and were searched


# ---- nothing outside its own folders ----------------------------------------------------


def test_commands_write_only_in_their_run_and_report_folders(ray_temp, tmp_path, monkeypatch):
    """sweep, status, report and trial, run from a folder with canary files around it and
    around the root: nothing outside ``<root>/<study>``, ``<root>/cache`` and
    ``reports/<study>`` changes (``qlsearch trial`` writes under ``./runs``)."""
    outer = tmp_path / "outer"
    work = outer / "work"
    (work / "figures").mkdir(parents=True)
    for canary in (outer / "canary.txt", work / "canary.txt", work / "figures" / "keep.png",
                   work / "tables.csv"):
        canary.write_text("canary\n")
    monkeypatch.chdir(work)
    study = write_study(work, "canaries", num_trials=1)
    (work / "trial.toml").write_text('method = "lora"\nprofile = false\n[knobs]\nr = 2\n'
                                     '[task]\nkind = "synthetic"\nname = "sin_cos"\nbackbone = "mlp"\n'
                                     '[train]\nepochs = 1\npretrain_epochs = 1\nbatch_size = 200\n')
    before = files_under(outer)
    assert main(["sweep", "canaries.toml", "--root", "runs", "--quiet"]) == 0
    assert main(["status", "canaries", "--root", "runs"]) == 0
    assert main(["report", str(study), "--root", "runs", "--out", "reports"]) == 0
    assert main(["trial", "trial.toml"]) == 0
    after = files_under(outer)
    changed = sorted(str(p.relative_to(outer)) for p in set(before) | set(after) if before.get(p) != after.get(p))
    allowed = ("work/runs/canaries/", "work/runs/cache/", "work/reports/canaries/", "work/runs/trials/")
    assert [p for p in changed if not p.startswith(allowed)] == []


def test_a_name_that_leaves_its_folder_writes_and_deletes_nothing(tmp_path, monkeypatch):
    """Whatever a name holds (the parser forbids ``..``; this is the code's own guard),
    the report refuses before clearing ``figures/`` or ``tables/``, and the sweep before
    creating its run folder."""
    from dataclasses import replace

    from qlsearch.report import write_report
    from qlsearch.search import open_study
    from qlsearch.study import load_study

    monkeypatch.chdir(tmp_path)
    for folder in ("figures", "tables"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "keep.txt").write_text("canary\n")
    study = load_study(write_study(tmp_path, "fine"))
    before = files_under(tmp_path)
    for name in ("..", ".", "../elsewhere", "/tmp"):
        bad = replace(study, name=name)
        with pytest.raises(ValueError, match="^study.name: .* outside "):
            write_report(bad, root=tmp_path / "runs", out=tmp_path / "reports")
        with pytest.raises(ValueError, match="^study.name: .* outside "):
            open_study(bad, root=tmp_path / "runs")
    assert files_under(tmp_path) == before


# ---- one cache for the whole sweep -------------------------------------------------------


def test_a_sweep_pretrains_its_backbone_once(ray_temp, tmp_path):
    """4 trials on one synthetic function, one seed: one pre-trained backbone in
    ``<root>/cache``, and none anywhere else (Ray runs each trial in its own folder)."""
    name = "cache-once"
    path = write_study(tmp_path, name, num_trials=4, resources={"cpus_per_trial": 1, "max_concurrent": 2},
                       train={"epochs": 1, "pretrain_epochs": 3, "batch_size": 200})
    root = tmp_path / "runs"
    assert main(["sweep", str(path), "--root", str(root), "--quiet"]) == 0
    trials = optuna.load_study(study_name=name, storage=f"sqlite:///{root / name / 'study.db'}").get_trials()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 4
    backbones = [p for p in files_under(tmp_path, ray_temp) if p.suffix == ".safetensors"]
    assert [p.parent.resolve() for p in backbones] == [(root / "cache").resolve()]
    pretrained = json.loads(backbones[0].with_suffix(".json").read_text())
    assert pretrained["function"] == "sin_cos" and pretrained["epochs"] == 3
    assert statistics.mean(len(t.user_attrs["seeds"]) for t in trials) == 1
