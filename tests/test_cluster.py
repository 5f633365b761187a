"""A sweep on a real multi-node Ray cluster, its study in PostgreSQL, and worker nodes killed mid-sweep.

The cluster is Ray's own multi-node test harness (``ray.cluster_utils.Cluster``): a head
node with no CPUs (so no trial runs there) and worker nodes of one CPU each, every node a
separate raylet with its own processes, on this one machine. The sweeps are ``qlsearch
sweep --address`` processes, as on a real cluster. Killing a node is SIGKILL to its raylet
and every worker on it at once, then ``remove_node``.

The cluster tests are slow (minutes on 2 cores): ``.ci/run`` runs them after ``make test``.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

ray = pytest.importorskip("ray")

POSTGRES = os.environ.get("QLSEARCH_TEST_POSTGRES_URL")
ROOT = Path(__file__).resolve().parents[1]

STUDY = """\
name = "{name}"
storage = "{storage}"
cache_dir = "{cache}"
seeds = {seeds}
num_trials = {num_trials}
sampler = "grid"
max_retries = {max_retries}
profile = false
objectives = ["val_mse"]
[task]
kind = "synthetic"
name = "sin_cos"
backbone = "mlp"
[train]
epochs = {epochs}
pretrain_epochs = 1
batch_size = 200
[space.queryable]
r = [2, 4]
num_atoms = [2, 4]
top_k = [1, 2]
num_blocks = 2
d_k = 8
[resources]
cpus_per_trial = 1
max_concurrent = {concurrent}
"""


def head_only_cluster():
    """A CPU-less head node. Ray's harness would also write its address to
    /tmp/ray/ray_current_cluster, where every later ``ray.init()`` on this machine (other
    tests, other sweeps) would join it: the sweeps here are given the address instead."""
    from unittest import mock

    from ray.cluster_utils import Cluster

    with mock.patch("ray._private.utils.write_ray_address"):
        return Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})


class Nodes:
    """The test cluster: a CPU-less head, and worker nodes of one CPU each to add and kill."""

    def __init__(self):
        self.cluster = head_only_cluster()
        self.head = self.cluster.head_node._node_id
        self.workers: dict = {}
        self.killed: list[str] = []

    def keep(self, n: int) -> None:
        """Add worker nodes until ``n`` are alive."""
        while len(self.workers) < n:
            for tries_left in (2, 1, 0):  # Ray gives a node 30 s to start: a loaded machine can miss it
                try:
                    node = self.cluster.add_node(num_cpus=1)
                    break
                except Exception:  # noqa: BLE001  ("The current node timed out during startup")
                    if not tries_left:
                        raise
            self.workers[node._node_id] = node
        self.cluster.wait_for_nodes()

    def kill(self, node_id: str) -> None:
        """SIGKILL every process of a worker node at once: its raylet and the workers it spawned.
        ``remove_node`` alone kills only the raylet (and the node's other tracked processes); a
        trial's worker would go on for about a second before noticing, time enough to finish a
        seed and report the trial, which a machine's death does not allow."""
        import psutil  # a dependency of peft and accelerate
        from ray._private import ray_constants

        node = self.workers.pop(node_id)
        raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        spawned = raylet.children(recursive=True)
        for process in (raylet, *spawned):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.cluster.remove_node(node, allow_graceful=False)  # the rest, and Ray's bookkeeping
        self.killed.append(node_id)


@pytest.fixture(scope="module")
def nodes():
    if not POSTGRES:
        pytest.skip("no PostgreSQL server: set QLSEARCH_TEST_POSTGRES_URL (.ci/run starts one)")
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # read by the nodes' processes too
    cluster = Nodes()
    cluster.keep(2)
    yield cluster
    cluster.cluster.shutdown()


def write_study(tmp_path: Path, label: str, **settings) -> tuple[Path, str]:
    name = f"cluster_{label}_{os.getpid()}_{int(time.time())}"
    values = {"seeds": [0], "num_trials": 4, "max_retries": 0, "epochs": 5, "concurrent": 2, **settings}
    path = tmp_path / f"{label}.toml"
    path.write_text(STUDY.format(name=name, storage=POSTGRES, cache=tmp_path / "cache", **values))
    return path, name


def start_sweep(path: Path, root: Path, address: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "qlsearch.cli", "sweep", str(path), "--root", str(root),
                             "--address", address], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@functools.cache
def _storage() -> optuna.storages.RDBStorage:
    """One storage (one connection pool) for every read: the polling loops read often, and a
    storage per read would hold PostgreSQL connections until it is collected."""
    return optuna.storages.RDBStorage(POSTGRES)


def trials_of(name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=_storage()).get_trials()


def attempts(record_dir: Path) -> list[dict]:
    path = record_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.slow
def test_sweep_spreads_its_trials_over_the_worker_nodes(nodes, tmp_path):
    """``qlsearch sweep --address``: 4 trials, 2 at a time, on two one-CPU worker nodes; every
    record and the status say which node ran it, and both workers (never the head) did."""
    nodes.keep(2)
    # trials of seconds: a trial shorter than the gap between the two workers' starts (each
    # imports torch) leaves the later worker nothing to run, the first one taking every trial
    path, name = write_study(tmp_path, "spread", epochs=100)
    started = time.time()
    sweep = start_sweep(path, tmp_path / "runs", nodes.cluster.address)
    output, _ = sweep.communicate(timeout=900)
    print(f"multi-node sweep: {time.time() - started:.1f}s")
    assert sweep.returncode == 0, output
    trials = trials_of(name)
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), output
    used = set()
    for t in trials:
        node = t.user_attrs["node"]
        assert node["node_id"] in nodes.workers and node["host"] == socket.gethostname()
        record = json.loads((Path(t.user_attrs["record_dir"]) / "seed0.json").read_text())
        assert record["node"] == node  # the seed's own record says the same
        used.add(node["node_id"])
    assert used == set(nodes.workers)  # two trials at a time, one CPU per node: both nodes ran trials
    status = subprocess.run([sys.executable, "-m", "qlsearch.cli", "status", str(path), "--json"], cwd=ROOT,
                            capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = json.loads(status.stdout)["trials"]
    assert {r["node"]["node_id"] for r in rows} == used


def _fresh(path: Path, since: float) -> bool:
    """``path`` was written by the attempt that started at ``since``."""
    return path.is_file() and path.stat().st_mtime >= since


def run_with_kills(nodes: Nodes, tmp_path: Path, label: str, max_retries: int):
    """A 6-trial, 2-seed sweep (one trial at a time) whose worker node is killed at three points:
    early in a trial (before its first seed finished), during its last seed, and just after a
    trial finished (between trials: the idle worker kept for the next trial dies with its node).
    After each kill a fresh worker node joins. Returns the study name, the kills (point, node,
    trial hit; point "missed" where the trial's seeds ended before its node died) and, per
    kill, the finished trials' values at that moment."""
    nodes.keep(2)
    path, name = write_study(tmp_path, label, seeds=[0, 1], num_trials=6, max_retries=max_retries,
                             epochs=40, concurrent=1)
    trials_dir = tmp_path / "runs" / name / "trials"
    sweep = start_sweep(path, tmp_path / "runs", nodes.cluster.address)
    kills, finished_then = [], []
    points = ["early", "last seed", "between"]
    complete_before = None
    deadline = time.time() + 900
    while sweep.poll() is None and points and time.time() < deadline:
        time.sleep(0.2)
        last = {d.name: attempts(d)[-1] for d in trials_dir.glob("*") if attempts(d)} if trials_dir.is_dir() else {}
        hit = {k["trial"] for k in kills}  # each kill point on a trial of its own
        running = {tid: a for tid, a in last.items() if a["node"]["node_id"] in nodes.workers and tid not in hit}
        target = None
        for trial_id, attempt in running.items():
            seed0, seed1 = (trials_dir / trial_id / f"seed{s}.json" for s in (0, 1))
            if _fresh(seed1, attempt["started"]):
                continue  # this attempt is done with its seeds
            if points[0] == "early" and not _fresh(seed0, attempt["started"]):
                target = (trial_id, attempt["node"]["node_id"], attempt["started"])
            elif points[0] == "last seed" and _fresh(seed0, attempt["started"]):
                target = (trial_id, attempt["node"]["node_id"], attempt["started"])
        if points[0] == "between":
            complete = {t.user_attrs["tune_trial_id"]: t.user_attrs["node"]["node_id"] for t in trials_of(name)
                        if t.state == optuna.trial.TrialState.COMPLETE}
            if complete_before is None:
                complete_before = set(complete)
            new = [tid for tid in complete if tid not in complete_before]
            target = (None, complete[new[0]], None) if new else None
        if target is None or target[1] not in nodes.workers:
            continue
        finished_then.append({t.number: t.values for t in trials_of(name) if t.state.is_finished()})
        nodes.kill(target[1])
        trial_id, node_id, started = target
        if trial_id is not None and _fresh(trials_dir / trial_id / "seed1.json", started):
            # its last seed was written before the node died (the seed ran out between the look
            # and the kill): this kill did not hit the point, so another trial's must
            kills.append({"point": "missed", "node": node_id, "trial": trial_id})
        else:
            kills.append({"point": points.pop(0), "node": node_id, "trial": trial_id})
        nodes.keep(2)
    output, _ = sweep.communicate(timeout=max(1, deadline - time.time()))
    assert sweep.returncode == 0, output
    assert not points, f"kill points never reached: {points}\n{output}"
    return name, kills, finished_then, output


def mid_trial(kills: list[dict]) -> list[dict]:
    """The kills that hit a trial while it ran: early, and during its last seed."""
    return [k for k in kills if k["point"] in ("early", "last seed")]


def check_counts(name: str, kills: list[dict], finished_then: list[dict], nodes: Nodes) -> dict:
    """What every sweep with killed nodes must keep: the budget exactly, each configuration once,
    every trial that had finished unchanged, each completed trial's seed records from the node
    of its last attempt, which is one that lived until the trial ended."""
    trials = trials_of(name)
    assert len(trials) == 6 and all(t.state.is_finished() for t in trials)  # the budget, no repeat
    configurations = {json.dumps(t.user_attrs["knobs"], sort_keys=True) for t in trials}
    assert len(configurations) == 6  # no configuration run twice
    assert len({t.user_attrs["tune_trial_id"] for t in trials}) == 6
    by_number = {t.number: t for t in trials}
    for before in finished_then:  # nothing finished is lost or told again
        assert {n: by_number[n].values for n in before} == before
    for t in trials:
        if t.state != optuna.trial.TrialState.COMPLETE:
            continue
        done = attempts(Path(t.user_attrs["record_dir"]))
        seeds = [json.loads((Path(t.user_attrs["record_dir"]) / f"seed{s}.json").read_text()) for s in (0, 1)]
        assert [r["node"]["node_id"] for r in seeds] == [done[-1]["node"]["node_id"]] * 2
        assert t.user_attrs["attempts"] == len(done)
    return {"complete": sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials),
            "failed": sum(t.state == optuna.trial.TrialState.FAIL for t in trials),
            "retried": sum((t.user_attrs.get("attempts") or 1) > 1 for t in trials)}


@pytest.mark.slow
def test_killed_nodes_trials_run_again_on_another_node(nodes, tmp_path):
    """max_retries = 1: a trial whose node dies is run again, afresh, on a node that lives;
    every trial completes, none is lost or repeated."""
    name, kills, finished_then, output = run_with_kills(nodes, tmp_path, "retry", max_retries=1)
    counts = check_counts(name, kills, finished_then, nodes)
    trials = {t.user_attrs["tune_trial_id"]: t for t in trials_of(name)}
    assert counts["complete"] == 6 and counts["failed"] == 0, output
    for kill in mid_trial(kills):  # the trial running there was retried elsewhere
        trial = trials[kill["trial"]]
        tried = attempts(Path(trial.user_attrs["record_dir"]))
        assert len(tried) == 2 and tried[0]["node"]["node_id"] == kill["node"] != tried[1]["node"]["node_id"]
    print(f"retry: kills {[k['point'] for k in kills]}: {counts}")


@pytest.mark.slow
def test_killed_nodes_trials_end_failed_with_the_reason(nodes, tmp_path):
    """max_retries = 0: the trial running on a killed node ends FAIL, "node died: ...", and the
    sweep goes on to finish the budget."""
    name, kills, finished_then, output = run_with_kills(nodes, tmp_path, "fail", max_retries=0)
    counts = check_counts(name, kills, finished_then, nodes)
    trials = {t.user_attrs["tune_trial_id"]: t for t in trials_of(name)}
    for kill in mid_trial(kills):
        trial = trials[kill["trial"]]
        assert trial.state == optuna.trial.TrialState.FAIL
        assert trial.user_attrs["failure"].startswith(f"node died: Ray node {kill['node'][:12]}"), output
    for t in trials.values():
        if t.state != optuna.trial.TrialState.FAIL:
            continue
        tried = attempts(Path(t.user_attrs["record_dir"]))
        if tried:  # it began on a node that was killed: that node's death is its reason
            assert tried[-1]["node"]["node_id"] in nodes.killed
            assert t.user_attrs["failure"].startswith("node died:")
        else:  # between trials: given the killed node's idle worker, it failed before it began,
            # with no node of its own on record: the worker's loss is its reason
            assert t.user_attrs["failure"].startswith("worker died:")
    assert counts["complete"] == 6 - counts["failed"] and counts["retried"] == 0
    print(f"fail: kills {[k['point'] for k in kills]}: {counts}")


# ---- the pieces, without a cluster ---------------------------------------------------


def test_a_trial_outside_ray_records_its_host_and_no_node():
    from qlsearch.trial import node_info

    assert node_info() == {"host": socket.gethostname(), "node_id": None, "ip": None}


def test_attempts_are_appended_in_order(tmp_path):
    from qlsearch.trial import read_attempts, record_attempt

    assert read_attempts(tmp_path / "t") == []
    first = record_attempt(tmp_path / "t")
    second = record_attempt(tmp_path / "t")
    assert len(first) == 1 and second[0] == first[0] and len(second) == 2
    assert second[1]["started"] >= second[0]["started"] and second[1]["node"]["host"] == socket.gethostname()


def test_failure_reasons_name_what_failed():
    from ray.exceptions import ActorUnavailableError

    from qlsearch._failures import WORKER_RAISED, failure_reason

    assert failure_reason(None, None) == WORKER_RAISED
    assert failure_reason(ValueError("bad knob\ndetails"), None) == "ValueError: bad knob"
    assert failure_reason("Failure # 1\nboom", None) == "Failure # 1"
    lost = ActorUnavailableError("The actor is temporarily unavailable: RpcError: Socket closed", b"\x00" * 16)
    # a lost worker whose node is unknown is a worker's death, never a node's
    assert failure_reason(lost, None).startswith("worker died: ")


@pytest.mark.parametrize("value", [-1, 1.5, "2", True])
def test_max_retries_must_be_a_count(value):
    from qlsearch.study import parse_study

    with pytest.raises(ValueError, match=r"^study\.max_retries: got .*allowed: an integer >= 0"):
        parse_study({"name": "r", "max_retries": value, "objectives": ["val_mse"],
                     "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
                     "space": {"lora": {"r": [2]}}})
