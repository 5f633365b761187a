"""How a sweep's overhead grows with its number of trials: fixed part + per-trial part.

    python benchmarks/overhead.py                       # one machine: 8, 32, 128 tiny trials
    python benchmarks/overhead.py --cluster 2           # on a test cluster: CPU-less head + 2 worker nodes
    python benchmarks/overhead.py --trials 8 32 --json out.json

Each sweep runs in a fresh process (``--one``), so each pays Ray's start (or its connection to
the cluster) as a real ``qlsearch sweep`` does. A trial is tiny on purpose (one seed, one epoch
of the deep MLP on sin_cos, no profiling): what is measured is what the sweep adds around it.

* wall: ``run_sweep`` from opening the study to the end of ``Tuner.fit``.
* trial work: the union of the trials' own spans, timed inside the trial's worker (each seed
  record's ``started_at`` and ``duration_s``: the trial itself, from backbone to record).
* overhead = wall - trial work; its least-squares line over the trial counts splits it into
  a fixed part (Ray start, Tune set-up, the first worker's start) and a per-trial part.
* between trials: from the first trial's start to the last one's end, the time no trial
  ran. Divided by the trials, it is the per-trial part measured directly, free of the
  start-up costs that move most with the machine's load.

Timings on a shared machine move with its load; the fitted per-trial part and the ratios are
the figures to compare, and the load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "seeds": [0],
    "sampler": "random",
    "profile": False,
    "objectives": ["val_mse"],
    "task": {"kind": "synthetic", "name": "sin_cos", "backbone": "mlp"},
    "train": {"epochs": 1, "pretrain_epochs": 1, "batch_size": 200},
    "space": {"queryable": {"r": {"low": 2, "high": 64}, "num_atoms": [2, 4, 8], "top_k": [1, 2],
                            "num_blocks": 2, "d_k": 8}},
    "resources": {"cpus_per_trial": 1, "max_concurrent": 1},
}


def union_seconds(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(spans):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def one_sweep(n: int, root: Path, address: str | None, concurrent: int, storage: str | None) -> dict:
    """Run one sweep of ``n`` tiny trials in this process; its timing as a dict."""
    from datetime import datetime

    import optuna

    from qlsearch.search import run_sweep
    from qlsearch.study import parse_study

    name = f"overhead{n}_{os.getpid()}"
    data = {**TINY, "name": name, "num_trials": n, "cache_dir": str(root / "cache"),
            "resources": {**TINY["resources"], "max_concurrent": concurrent}}
    if storage:
        data["storage"] = storage
    study = parse_study(data)
    summary = run_sweep(study, root=root, address=address, num_cpus=None if address else 2, verbose=False)
    trials = optuna.load_study(study_name=name, storage=study.storage_url(root)).get_trials()
    spans = []
    ran = [t for t in trials if "record_dir" in t.user_attrs]  # a sampled repeat is PRUNED unrun
    for t in ran:
        for path in Path(t.user_attrs["record_dir"]).glob("seed*.json"):
            record = json.loads(path.read_text())
            started = datetime.fromisoformat(record["started_at"]).timestamp()
            spans.append((started, started + record["duration_s"]))
    work = union_seconds(spans)
    between = max(b for _, b in spans) - min(a for a, _ in spans) - work
    return {"trials": n, "complete": sum(t.state.name == "COMPLETE" for t in trials), "between_trials": between,
            "wall": summary["wall_seconds"], "trial_work": work, "overhead": summary["wall_seconds"] - work,
            "mean_trial": sum(b - a for a, b in spans) / len(spans),
            **{k: summary[k] for k in ("storage_seconds", "ray_start_seconds", "workers_start_seconds")},
            "load": os.getloadavg()[0]}


def fit(points: list[dict]) -> tuple[float, float]:
    """Least squares ``overhead = fixed + per_trial * n``."""
    import numpy as np

    n = np.array([p["trials"] for p in points], dtype=float)
    y = np.array([p["overhead"] for p in points])
    per_trial, fixed = np.polyfit(n, y, 1)
    return float(fixed), float(per_trial)


def start_cluster(workers: int):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from unittest import mock

    from ray.cluster_utils import Cluster

    # not written to /tmp/ray/ray_current_cluster, where any later ray.init() would join it
    with mock.patch("ray._private.utils.write_ray_address"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(workers):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--cluster", type=int, default=0, metavar="WORKERS",
                   help="start a test cluster of this many one-CPU worker nodes (0: one local Ray)")
    p.add_argument("--concurrent", type=int, default=None, help="trials at a time (default: 1, or WORKERS)")
    p.add_argument("--storage", help="an Optuna storage URL (default: a SQLite file per sweep)")
    p.add_argument("--quickstart-trial", type=float, default=None, metavar="SECONDS",
                   help="also give the overhead share at 32 trials of this many seconds each")
    p.add_argument("--json", metavar="FILE", help="write the points and the fit here")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    concurrent = args.concurrent or max(1, args.cluster)
    if args.one:  # the child: one sweep, its timing as JSON on the last line
        with tempfile.TemporaryDirectory() as root:
            print(json.dumps(one_sweep(args.one, Path(root), args.address, concurrent, args.storage)))
        return 0
    cluster = start_cluster(args.cluster) if args.cluster else None
    where = f"test cluster, {args.cluster} worker nodes" if cluster else "one machine, local Ray"
    points = []
    try:
        for n in args.trials:
            cmd = [sys.executable, __file__, "--one", str(n), "--concurrent", str(concurrent)]
            cmd += ["--address", cluster.address] if cluster else []
            cmd += ["--storage", args.storage] if args.storage else []
            # a PYTHONPATH given first (e.g. an older checkout to compare with), then this one
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.environ.get("PYTHONPATH", ""), str(ROOT)]),
                   "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                return 1
            points.append(json.loads(out.stdout.strip().splitlines()[-1]))
            q = points[-1]
            print(f"{where}: {n:4d} trials ({q['complete']} complete), {concurrent} at a time: wall {q['wall']:.1f}s, "
                  f"trial work {q['trial_work']:.1f}s (mean trial {q['mean_trial']:.2f}s), overhead "
                  f"{q['overhead']:.1f}s = {100 * q['overhead'] / q['wall']:.0f}% (Ray start "
                  f"{q['ray_start_seconds']:.1f}s, workers' start {q['workers_start_seconds']:.1f}s); between trials "
                  f"{q['between_trials']:.1f}s = {q['between_trials'] / n:.3f}s a trial; "
                  f"load {q['load']:.1f}", flush=True)
    finally:
        if cluster:
            cluster.shutdown()
    result = {"where": where, "concurrent": concurrent, "points": points}
    if len(points) > 1:
        fixed, per_trial = fit(points)
        result.update(fixed_seconds=fixed, per_trial_seconds=per_trial)
        print(f"{where}: overhead = {fixed:.2f}s fixed + {per_trial:.3f}s per trial (least squares over "
              f"{', '.join(str(q['trials']) for q in points)} trials)")
        if args.quickstart_trial:
            work = 32 * args.quickstart_trial / concurrent
            share = (fixed + 32 * per_trial) / (work + fixed + 32 * per_trial)
            result["share_at_32"] = share
            print(f"{where}: at 32 trials of {args.quickstart_trial:.1f}s, {concurrent} at a time: overhead "
                  f"{100 * share:.1f}% of the wall time")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
