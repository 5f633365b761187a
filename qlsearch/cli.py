"""The ``qlsearch`` command: one subcommand per function, registered in ``_SUBCOMMANDS``.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its options
and ``_run_<name>(args) -> int`` does the work. Heavy imports happen inside
the run function, so ``qlsearch --help`` stays instant.

Bad input exits with status 2 and one line naming the option and the allowed
values, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import warnings
from collections.abc import Callable


class UsageError(Exception):
    """Bad input found after parsing (e.g. by a settings object): reported like argparse's own."""


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _methods(text: str) -> list[str]:
    from qlsearch.adapters import get_method
    from qlsearch.profiling._settings import FROZEN

    names = _comma_list(text)
    if not names:
        raise argparse.ArgumentTypeError("give one or more adapter methods, comma-separated")
    for name in names:
        if name != FROZEN:
            try:
                get_method(name)
            except ValueError as err:
                raise argparse.ArgumentTypeError(str(err).removeprefix("method: ")) from None
    return names


def _skip(text: str) -> list[str]:
    from qlsearch.profiling._settings import SKIPPABLE

    phases = _comma_list(text)
    unknown = [p for p in phases if p not in SKIPPABLE]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown phase(s) {', '.join(unknown)}; allowed: {', '.join(SKIPPABLE)}")
    return phases


# ---- profile --------------------------------------------------------------------------------

def _add_profile(subparsers: argparse._SubParsersAction) -> None:
    from qlsearch.profiling._settings import (
        DEVICES,
        DTYPES,
        PAPER_TARGETS,
        PRECISIONS,
        SKIPPABLE,
        SYNTHETIC_MODELS,
        ProfileSettings,
    )

    # every option but --json/--out is a ProfileSettings field: its default is read from there
    default = {f.name: f.default for f in dataclasses.fields(ProfileSettings)}
    p = subparsers.add_parser(
        "profile", help="forward latency, decode throughput, training step, parameters, memory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Time adapter methods against the frozen model and PEFT LoRA on one model "
                    "config (random weights; nothing is downloaded).")
    p.add_argument("--model", required=True,
                   help="hub id (config only), a folder with config.json, or a synthetic backbone: "
                        f"{', '.join(SYNTHETIC_MODELS)} (no decode phase)")
    p.add_argument("--methods", type=_methods, default=",".join(default["methods"]),
                   help="comma-separated registry names; frozen and lora are always measured")
    p.add_argument("--batch", type=int, default=default["batch"], help="examples per call")
    p.add_argument("--seq", type=int, default=default["seq"], help="prompt tokens per example")
    p.add_argument("--new-tokens", type=int, default=default["new_tokens"], help="decode length N")
    p.add_argument("--dtype", choices=DTYPES, default=default["dtype"],
                   help="the frozen model's weights and activations")
    p.add_argument("--device", choices=DEVICES, default=default["device"], help="where to run")
    p.add_argument("--precision", choices=PRECISIONS, default=default["precision"],
                   help="every method's policy: mixed = float32 adapter weights cast to --dtype on use; "
                        "model = adapter weights stored in --dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile each model (forward, train); decode with "
                        "transformers' static cache and its compiled decode step")
    p.add_argument("--repeats", type=int, default=default["repeats"], help="timed rounds")
    p.add_argument("--warmup", type=int, default=default["warmup"], help="untimed rounds first")
    p.add_argument("--skip", type=_skip, default="", help=f"phases to leave out, of {','.join(SKIPPABLE)} (flops: the FLOP and kernel counts)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's default)")
    p.add_argument("--attn-implementation", default=default["attn_implementation"],
                   help="attention kernel: sdpa, eager, ...")
    p.add_argument("--r", type=int, default=default["r"], help="rank of every method")
    p.add_argument("--num-atoms", type=int, default=default["num_atoms"], help="queryable: atoms M")
    p.add_argument("--top-k", type=int, default=default["top_k"], help="queryable: atoms per route k")
    p.add_argument("--num-blocks", type=int, default=default["num_blocks"], help="queryable: blocks B")
    p.add_argument("--target-modules", type=_comma_list, default=None,
                   help="comma-separated linear names (default: "
                        f"{','.join(PAPER_TARGETS)}; every linear in a synthetic backbone's layers)")
    p.add_argument("--seed", type=int, default=default["seed"], help="weights, tokens, adapters")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", metavar="DIR", help="also write DIR/<tag>.json and DIR/<tag>.md")
    p.add_argument("--tag", help="file name under --out (None: the machine, e.g. cpu-amd-epyc-2t)")
    p.add_argument("--trace", metavar="DIR", help="write one torch.profiler trace of a forward per method "
                   "(Chrome trace JSON: Perfetto, chrome://tracing, or TensorBoard's profiler plugin)")
    p.set_defaults(run=_run_profile, parser=p)


def _run_profile(args: argparse.Namespace) -> int:
    from qlsearch.profiling import (
        ProfileSettings,
        format_table,
        profile_methods,
        write_results,
    )

    # PEFT still asks transformers 5 the deprecated name: noise, not the user's concern
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
    try:
        settings = ProfileSettings(**{f.name: getattr(args, f.name)
                                      for f in dataclasses.fields(ProfileSettings)})
        result = profile_methods(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as err:
        raise UsageError(_as_option(err, args)) from err
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_table(result))
    if args.out:
        for path in write_results(result, args.out, settings.tag):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _as_option(err: ValueError, args: argparse.Namespace) -> str:
    """``"dtype: ..."`` -> ``"--dtype: ..."`` when the name is one of this command's options.

    A ValueError that names no option is a bug, not bad input: it is raised again.
    """
    message = str(err)
    match = re.match(r"(?:--)?([a-z][a-z_]*):", message)
    if match is None or match.group(1) not in vars(args):
        raise err
    return f"--{match.group(1).replace('_', '-')}{message[match.end(1):]}"


# ---- trial, sweep, status, params ------------------------------------------------------------

def _add_trial(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("trial", help="run one trial without Ray (for debugging)",
                              description="Train, evaluate and profile one configuration from a "
                                          "trial file (TOML) and write its JSON record.")
    p.add_argument("file", help="trial file: method, knobs, [task], [train], seed, ...")
    p.add_argument("--out", help="record path (default: runs/trials/<file stem>.json)")
    p.set_defaults(run=_run_trial, parser=p)


def _run_trial(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlsearch.trial import TrialConfig, run_trial, write_record

    try:
        config = TrialConfig.from_toml(args.file)
    except (OSError, ValueError) as err:
        raise UsageError(f"{args.file}: {err}") from err

    def progress(epoch: int, losses: dict[str, float]) -> None:
        print(f"epoch {epoch}: " + "  ".join(f"{k} {v:.5g}" for k, v in losses.items()), file=sys.stderr, flush=True)

    record = run_trial(config, progress=progress)
    path = write_record(record, args.out or Path("runs/trials") / f"{Path(args.file).stem}.json")
    metrics = {k: v for k, v in record["metrics"].items() if isinstance(v, int | float)}
    print(json.dumps({"status": record["status"], "failure": record["failure"], "metrics": metrics,
                      "record": str(path)}, indent=2))
    return 0 if record["status"] == "completed" else 1


def _add_sweep(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sweep", help="run a study: Ray Tune runs the trials, Optuna samples them",
                              description="Run (or, with --resume, continue) the study in a study file.")
    p.add_argument("study", help="study file (e.g. studies/quickstart.toml) or a folder of them")
    p.add_argument("--resume", action="store_true",
                   help="continue a study that already has trials (the same study file), or join "
                        "another driver running it")
    p.add_argument("--more", type=int, metavar="N",
                   help="add N trials to the study's budget (per method with trials_per_method), "
                        "finished or running: the sampler goes on from its trials, baselines are not "
                        "re-run; a changed space or baselines become a new file version")
    p.add_argument("--root", default="runs", help="run folder (SQLite storage, records, Ray results)")
    p.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001, or auto: the one "
                   "`ray start` began on this machine); without it, a local Ray of the sweep's own")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--quiet", action="store_true", help="no line per finished trial")
    p.set_defaults(run=_run_sweep, parser=p)


def _run_sweep(args: argparse.Namespace) -> int:
    from qlsearch._drivers import check_file
    from qlsearch._storage import check_storage, hide_password
    from qlsearch.search import open_study, run_sweep
    from qlsearch.status import format_status, study_status
    from qlsearch.study import load_study, study_files

    if args.more is not None and args.more < 1:
        raise UsageError(f"--more: got {args.more}; allowed: an integer >= 1")
    try:
        studies = [load_study(path) for path in study_files(args.study)]
        for study in studies:  # every storage URL checked before any storage is created
            if study.storage:
                check_storage(study.storage)
        opened = [open_study(study, args.root)[0] for study in studies]
    except ValueError as err:
        raise UsageError(f"{args.study}: {err}") from err
    for study, ot_study in zip(studies, opened, strict=True):
        if ot_study.trials and not (args.resume or args.more):
            raise UsageError(f"{study.path}: study {study.name!r} already has {len(ot_study.trials)} trials "
                             f"in {hide_password(study.storage_url(args.root))}; pass --resume to continue it "
                             "or --more N to add trials")
        problems = check_file(ot_study, study, more=bool(args.more))
        if problems:
            raise UsageError(f"{study.path}: " + "\n".join(problems))
    for study, ot_study in zip(studies, opened, strict=True):
        note = study.budget(ot_study.user_attrs.get("more_trials", 0) + (args.more or 0)).note
        if note:
            print(f"warning: {study.name}: {note}", file=sys.stderr)
        try:
            summary = run_sweep(study, root=args.root, address=args.address, num_cpus=args.num_cpus,
                                verbose=not args.quiet, more=args.more or 0)
        except ValueError as err:  # what only the cluster can tell (e.g. GPUs asked where there are none)
            raise UsageError(f"{study.path}: {err}") from err
        print(format_status(study_status(ot_study)))
        if summary["started"] == 0:
            print(f"{study.name}: nothing left to run, every trial has finished")
    return 0


def _add_status(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="a study's trials and current Pareto front",
                              description="List a study's trials (state, configuration, objectives) "
                                          "and its Pareto front (Optuna's best_trials).")
    p.add_argument("study", help="study file, a folder of them, or a study name under --root")
    p.add_argument("--root", default="runs", help="run folder the sweep used")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_status, parser=p)


def _run_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlsearch.status import format_status, open_existing, study_status
    from qlsearch.study import check_name, study_files

    path = Path(args.study)
    if not (path.exists() or path.suffix == ".toml"):  # a study name: a folder under --root
        try:
            check_name(args.study, "study")
        except ValueError as err:
            raise UsageError(f"{err}, or a study file or folder of them") from err
    try:
        targets = [str(p) for p in study_files(args.study)] if Path(args.study).is_dir() else [args.study]
    except ValueError as err:
        raise UsageError(str(err)) from err
    statuses = []
    for target in targets:
        try:
            statuses.append(study_status(open_existing(target, args.root)))
        except ValueError as err:  # a study file's problem is named with the file, as sweep does
            message = str(err).removeprefix("STUDY: ")
            raise UsageError(f"{target}: {message}" if Path(target).is_file() else message) from err
    if args.json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=2))
    else:
        print("\n\n".join(format_status(status) for status in statuses))
    return 0


def _add_report(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help="write a study's report page (Pareto fronts, tables, figures)",
                              description="Write <out>/<study>/index.html, report.md, figures/ and tables/ "
                                          "from the study's storage and trial records.")
    p.add_argument("study", help="study file, a folder of them, or a name: studies/<name>.toml")
    p.add_argument("--root", default="runs", help="run folder the sweep used")
    p.add_argument("--out", default="reports", help="folder for the report pages")
    p.set_defaults(run=_run_report, parser=p)


def _run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qlsearch.report import write_report
    from qlsearch.study import load_study, study_files

    path = Path(args.study)
    if not path.exists() and not path.suffix:  # `qlsearch report quickstart`
        path = Path("studies") / f"{args.study}.toml"
    try:
        for file in study_files(path):
            print(write_report(load_study(file), root=args.root, out=args.out))
    except ValueError as err:
        raise UsageError(f"{args.study}: {err}") from err
    return 0


def _add_params(subparsers: argparse._SubParsersAction) -> None:
    from qlsearch.profiling._settings import PAPER_TARGETS

    p = subparsers.add_parser("params", help="trainable parameters per method (the paper's Table 6)",
                              description="Count each method's parameters on a model built from its "
                                          "config on the meta device: no weights, nothing downloaded.")
    p.add_argument("--model", required=True, help="hub id (cached config) or a folder with config.json")
    p.add_argument("--r", type=int, default=8, help="rank of every method")
    p.add_argument("--methods", type=_methods, default=None, help="comma-separated (default: all)")
    p.add_argument("--target-modules", type=_comma_list, default=",".join(PAPER_TARGETS),
                   help="comma-separated linear names")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=_run_params, parser=p)


def _run_params(args: argparse.Namespace) -> int:
    from qlsearch.adapters import list_methods
    from qlsearch.params import format_table, parameter_table

    methods = args.methods or [m.name for m in list_methods()]
    try:
        rows = parameter_table(args.model, methods, r=args.r, target_modules=args.target_modules)
    except ValueError as err:
        raise UsageError(_as_option(err, args)) from err
    print(json.dumps([row.as_dict() for row in rows], indent=2) if args.json else format_table(rows))
    return 0


# ---- list -----------------------------------------------------------------------------------

_KINDS = ("methods", "tasks", "functions", "multitasks", "metrics")


def _add_list(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="what a study can name: methods, tasks, functions, multitasks, metrics",
                              description="Print the built-ins, PEFT's methods (peft:<name>) and the "
                                          "installed plug-ins (entry points), each with its knobs and "
                                          "where it comes from. module:attribute references are not "
                                          "listed: any importable one may be named.")
    p.add_argument("kind", choices=_KINDS, help="which registry")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(run=_run_list, parser=p)


def _run_list(args: argparse.Namespace) -> int:
    from qlsearch.listing import format_listing, listing

    try:
        rows = listing(args.kind)
    except ValueError as err:  # an installed plug-in that does not load
        raise UsageError(str(err)) from err
    print(json.dumps(rows, indent=2, default=repr) if args.json else format_listing(rows))
    return 0


# ---- the command ---------------------------------------------------------------------------

_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_sweep, _add_status, _add_report, _add_trial, _add_profile, _add_params, _add_list,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlsearch", description="Hyperparameter search and Pareto benchmarking for Queryable LoRA.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # like `python -m`: module:attribute plug-ins in the current folder import (last, so they
    # never shadow an installed module)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return args.run(args)
    except UsageError as err:
        args.parser.error(str(err))  # prints the subcommand's usage and the message; exits 2
    except Exception as err:
        from qlsearch._storage import StorageUnavailable

        if not isinstance(err, StorageUnavailable):
            raise
        # the database, not the input: one line (storage, password hidden, the cause), no usage
        print(f"qlsearch {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
