"""One trial: backbone → attach the adapter → train → evaluate → profile → one JSON record.

A trial never crashes its caller: divergence, out-of-memory and any other
error end it as ``failed`` with the reason in the record, so a sweep goes on.
The record carries the config, seed, metrics, profile, library versions and
git revision: nothing about a run lives only in a log.
"""

from __future__ import annotations

import functools
import json
import platform
import subprocess
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from qlsearch.adapters import attach, get_method
from qlsearch.adapters._knobs import NON_NEGATIVE, POSITIVE, check_values
from qlsearch.profiling._quiet import quiet_device
from qlsearch.profiling._settings import DTYPES
from qlsearch.train import History, TrialDiverged

TASK_KINDS = ("synthetic", "text", "multitask")
INSTRUCTION_MODES = ("task", "none", "shuffled", "random", "adversarial")
SYNTHETIC_BACKBONES = ("transformer", "mlp")
PACKAGES = ("qlsearch", "torch", "transformers", "peft", "optuna", "ray", "datasets")


def _check_fields(cls, data: dict, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field; allowed: {', '.join(sorted(known))}")


@dataclass
class TaskSpec:
    """What to learn: a synthetic function on a pre-trained regressor, or a text task on an HF LM."""

    kind: str = "synthetic"
    name: str = "dropwave"  # a synthetic function, a text task or a multi-task (tasks/multitask.py)
    backbone: str = "transformer"  # "transformer" | "mlp" (synthetic, multitask), an HF id or folder (text)
    data_files: dict | None = None  # text: local files in the dataset's schema, per split
    limit_train: int | None = None
    limit_val: int | None = None
    limit_test: int | None = None
    max_length: int = 512
    max_new_tokens: int = 64
    instruction: str | None = None  # text, multitask: overrides every example's instruction
    #: text, multitask: the instruction ablations of Table 8: "task" (the instruction as given), "none",
    #: "shuffled" (its words in a seeded random order), "random" (a random embedding of equal norm),
    #: "adversarial" (each example another task's instruction: needs two or more distinct ones)
    instruction_mode: str = "task"
    #: the backbone's dtype: its weights and the adapters' compute (``train.precision``
    #: says how the adapters' own weights are stored)
    dtype: str = "float32"
    #: the linears every method adapts (names or name suffixes); None: every linear inside
    #: the backbone's layers. One setting for all methods, never a method's own default.
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task.kind: got {self.kind!r}; allowed: {', '.join(TASK_KINDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"task.dtype: got {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.targets is not None and not (
                isinstance(self.targets, list) and self.targets and all(isinstance(t, str) and t for t in self.targets)):
            raise ValueError(f"task.targets: got {self.targets!r}; allowed: a non-empty list of linear names")
        if self.instruction_mode not in INSTRUCTION_MODES:
            raise ValueError(f"task.instruction_mode: got {self.instruction_mode!r}; allowed: "
                             f"{', '.join(INSTRUCTION_MODES)}")
        if self.kind in ("synthetic", "multitask"):
            from qlsearch.tasks.multitask import get_multitask
            from qlsearch.tasks.synthetic import get_function

            get, field = (get_function, "function") if self.kind == "synthetic" else (get_multitask, "multitask")
            try:
                get(self.name)
            except ValueError as err:
                raise ValueError(f"task.name: {str(err).removeprefix(field + ': ')}") from None
            if self.backbone not in SYNTHETIC_BACKBONES:
                raise ValueError(f"task.backbone: got {self.backbone!r}; allowed: "
                                 f"{', '.join(SYNTHETIC_BACKBONES)}")
        else:
            from qlsearch.tasks.text import get_text_task

            try:
                get_text_task(self.name)
            except ValueError as err:
                raise ValueError(f"task.name: {str(err).removeprefix('task: ')}") from None


#: The training settings a study may also set per method (``lr``, ...), declared once: TrainSpec
#: and the study validation both check them here.
TRAIN_KNOB_SPECS = {"lr": POSITIVE, "weight_decay": NON_NEGATIVE}


@dataclass
class TrainSpec:
    """Post-training settings; defaults are the paper's synthetic protocol, fewer epochs."""

    epochs: int = 50  # the paper: 5,000 (synthetic), 25 (text)
    lr: float = 5e-4  # the paper: 5e-4 (synthetic), 2e-4 (text)
    batch_size: int = 64
    eval_every: int = 1
    weight_decay: float = 0.0
    #: early stopping: stop after this many evaluations without a lower validation loss (None: never)
    patience: int | None = None
    pretrain_epochs: int = 300  # synthetic backbones (the paper: 300 at lr 3e-3)
    pretrain_lr: float = 3e-3
    #: how every method stores its trainable weights (``qlsearch.adapters._precision``):
    #: "mixed" float32 weights and optimizer state, computed in the backbone's dtype;
    #: "model" stored in the backbone's dtype
    precision: str = "mixed"

    def __post_init__(self) -> None:
        from qlsearch.adapters._precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision: got {self.precision!r}; allowed: {', '.join(PRECISIONS)}")
        for name in ("epochs", "batch_size", "eval_every", "pretrain_epochs"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"train.{name}: got {value!r}; allowed: an integer >= 1")
        if self.patience is not None and not (isinstance(self.patience, int) and self.patience >= 1):
            raise ValueError(f"train.patience: got {self.patience!r}; allowed: an integer >= 1 (or leave it out)")
        check_values({"pretrain_lr": self.pretrain_lr}, {"pretrain_lr": POSITIVE}, "train")
        check_values({k: getattr(self, k) for k in TRAIN_KNOB_SPECS}, TRAIN_KNOB_SPECS, "train")


@dataclass
class TrialConfig:
    """One trial, as a trial file (TOML) or a sweep's sampled point gives it."""

    method: str = "queryable"
    knobs: dict = field(default_factory=dict)
    task: TaskSpec = field(default_factory=TaskSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    seed: int = 0
    profile: bool = True
    device: str = "auto"  # "auto": CUDA when present
    cache_dir: str = "runs/cache"
    #: where quiet per-configuration latency measurements are kept (a sweep: ``<run>/latency``);
    #: None: ``<cache_dir>/latency``
    latency_cache: str | None = None

    def __post_init__(self) -> None:
        method = get_method(self.method)  # raises naming the allowed methods
        if "target_modules" in self.knobs:  # one setting, in one place, for every method
            raise ValueError("knobs.target_modules: set task.targets instead; allowed: the method's "
                             "other knobs")
        method.check_knobs({k: v for k, v in self.knobs.items() if k != "seed"}, "knobs")

    @classmethod
    def from_dict(cls, data: dict) -> TrialConfig:
        data = dict(data)
        _check_fields(cls, data, "trial")
        _check_fields(TaskSpec, data.get("task", {}), "task")
        _check_fields(TrainSpec, data.get("train", {}), "train")
        data["task"] = TaskSpec(**data.get("task", {}))
        data["train"] = TrainSpec(**data.get("train", {}))
        return cls(**data)

    @classmethod
    def from_toml(cls, path: str | Path) -> TrialConfig:
        from qlsearch._toml import read_toml

        return cls.from_dict(read_toml(path, "trial file"))

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the record --------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    return dict(_versions())


@functools.cache  # per process: a sweep's worker runs many trials with the code it imported
def _versions() -> dict[str, str | None]:
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


@functools.cache  # per process (two git calls a seed otherwise): the code a process runs is
def git_revision() -> str | None:  # the code it imported, whatever the checkout does later
    """The checkout's commit (``+dirty`` with uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def node_info() -> dict:
    """Where this process runs: the host name and, inside a Ray worker, the Ray node's id
    and IP (None outside Ray). Several nodes of a test cluster share one host, so the
    node id is what tells them apart."""
    import socket
    import sys

    node = {"host": socket.gethostname(), "node_id": None, "ip": None}
    ray = sys.modules.get("ray")  # a trial outside a sweep never imports (or starts) Ray
    if ray is not None and ray.is_initialized():
        node.update(node_id=ray.get_runtime_context().get_node_id(), ip=ray.util.get_node_ip_address())
    return node


def record_attempt(record_dir: str | Path) -> list[dict]:
    """Append this run of a sweep's trial (its node, when it started) to the trial's
    ``attempts.jsonl``; returns every attempt so far. A trial that Tune retried after its
    worker or node died has more than one, each on the node it ran on."""
    path = Path(record_dir) / "attempts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps({"node": node_info(), "started": time.time()}) + "\n")
    return read_attempts(record_dir)


def read_attempts(record_dir: str | Path) -> list[dict]:
    """The attempts ``record_attempt`` wrote, oldest first (none: an empty list)."""
    path = Path(record_dir) / "attempts.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _machine(device: str) -> dict:
    from qlsearch.profiling._machine import machine_info

    return machine_info(_device(device).type)


def run_trial(config: TrialConfig, progress=None) -> dict:
    """Run one trial and return its record; failures are recorded, never raised."""
    started = time.time()
    record = {
        "status": "running",
        "failure": None,
        "config": config.to_dict(),
        "seed": config.seed,
        "metrics": {},
        "history": {},
        "profile": {},
        "versions": versions(),
        "git": git_revision(),
        "machine": _machine(config.device),  # where it ran: the report shows it per trial
        "node": node_info(),  # which node of a cluster
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
    }
    try:
        torch.manual_seed(config.seed)
        run = {"synthetic": _run_synthetic, "text": _run_text, "multitask": _run_multitask}[config.task.kind]
        with quiet_device().working():  # paused while any trial on this node times its latency
            metrics, history, profile, adapter = run(config, _device(config.device), progress)
        record.update(status="completed", metrics=metrics, history=asdict(history), profile=profile,
                      **adapter)
    except TrialDiverged as err:
        record.update(status="failed", failure=f"diverged: {err}")
    except torch.OutOfMemoryError as err:
        record.update(status="failed", failure=f"out of memory: {str(err).splitlines()[0]}")
    except Exception as err:  # noqa: BLE001  (a trial's error is data for the sweep)
        record.update(status="failed", failure=f"{type(err).__name__}: {err}",
                      traceback=traceback.format_exc(limit=8))
    record["duration_s"] = time.time() - started
    return record


def write_record(record: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=float) + "\n")
    return path


# ---- the two experiment families --------------------------------------------------


def _knobs(config: TrialConfig, targets: list[str]) -> dict:
    """The trial's knobs, adapting ``targets`` (the same linears for every method)."""
    knobs = {**config.knobs, "target_modules": list(targets)}
    if "seed" in get_method(config.method).knobs:
        knobs.setdefault("seed", config.seed)  # the adapter's initialisation follows the trial seed
    return knobs


def _adapt(base: nn.Module, config: TrialConfig, knobs: dict) -> tuple[nn.Module, nn.Module | None, dict]:
    """The trial's method on ``base`` under ``train.precision``, its forward yielding to latency
    measurements; (when the trial profiles) a frozen copy of ``base`` taken before adapting it;
    and what the record states about the adapter: ``precision``, ``adapter_dtype``,
    ``compute_dtype`` and ``targets`` (the linears it adapted)."""
    from qlsearch.adapters._precision import adapted_targets, precision_of
    from qlsearch.profiling._subjects import shared_copy

    frozen = shared_copy(base) if config.profile else None
    model = attach(base, config.method, precision=config.train.precision, **knobs)
    quiet_device().yield_on_forward(model)
    return model, frozen, {"precision": config.train.precision, **precision_of(model),
                           "targets": adapted_targets(model)}


def _latency(config: TrialConfig, frozen: nn.Module | None, knobs: dict, inputs: dict,
             extra: dict | None = None) -> dict | None:
    """The configuration's quiet latency at ``inputs``, measured (or found in the study's
    cache) on an untrained copy, before training; None when the trial does not profile."""
    from qlsearch.profiling._latency import measure_latency

    if frozen is None:
        return None
    cache = config.latency_cache or Path(config.cache_dir) / "latency"
    return measure_latency(frozen, config.method, {**knobs, "precision": config.train.precision},
                           inputs, extra=extra, cache_dir=cache, code=git_revision())


def _profile(model: nn.Module, args: tuple, kwargs: dict, latency: dict | None) -> dict:
    """The trained model's profile: its counts (parameters, bytes, FLOPs) always, which no
    neighbour can disturb; its latency fields, the quiet measurement's, when the trial profiles."""
    from qlsearch.profiling._trained import profile_trained

    profile = profile_trained(model, args, kwargs)
    if latency is None:
        return profile
    fields = ("forward_ms", "forward_ms_spread", "forward_ratio", "forward_ratio_spread", "batch")
    return {**profile, **{k: latency[k] for k in fields}, "latency": latency}


def check_targets(task: TaskSpec, method: str) -> None:
    """Attach ``method`` (at its defaults) to the task's backbone on the meta device, adapting
    ``task.targets``: a target it cannot adapt fails when the study is validated, not in the
    middle of a sweep. Only the targets are checked here: a bad knob value stays a trial's
    own failure (recorded, the sweep goes on). A text backbone whose config cannot be read
    here (not cached, offline) is checked when its trial loads it."""
    from qlsearch.adapters._wrapper import layer_linear_names
    from qlsearch.backbones import SYNTHETIC_TARGETS, build_backbone
    from qlsearch.params import load_config, meta_model

    if task.kind != "text":
        with torch.device("meta"):
            backbone = build_backbone(task.backbone)
        targets = task.targets or SYNTHETIC_TARGETS[task.backbone]
    else:
        try:
            backbone = meta_model(load_config(task.backbone))
        except (ValueError, OSError):
            return
        targets = task.targets or layer_linear_names(backbone)
    try:
        attach(backbone, method, precision=None, target_modules=list(targets))
    except ValueError as err:
        raise ValueError(f"task.targets: {method} cannot adapt {list(targets)}: {err}") from None


def _run_synthetic(config: TrialConfig, device: torch.device, progress):
    from qlsearch.backbones import SYNTHETIC_TARGETS, pretrained_backbone
    from qlsearch.tasks.synthetic import make_splits
    from qlsearch.train import regression_fit

    task, train = config.task, config.train
    splits = make_splits(task.name, config.seed)
    backbone = pretrained_backbone(task.name, task.backbone, config.seed, config.cache_dir,
                                   epochs=train.pretrain_epochs, lr=train.pretrain_lr, device=device)
    # every linear of the layers, named (PEFT's "all-linear" only knows HF models); the
    # backbone is pre-trained (and cached) in float32, then cast to the trial's dtype
    dtype = getattr(torch, task.dtype)
    on = {split: tuple(t.to(device, dtype) for t in getattr(splits, f"target_{split}"))
          for split in ("train", "val", "test")}
    knobs = _knobs(config, task.targets or SYNTHETIC_TARGETS[task.backbone])
    model, frozen, adapter = _adapt(backbone.to(dtype), config, knobs)
    model = model.to(device)
    latency = _latency(config, frozen, knobs, {"x": on["test"][0][: train.batch_size]})
    history = regression_fit(model, on, **_fit_settings(config), progress=progress)
    metrics = {**_prefixed(history.summary(), "mse"), **_optimisation(history)}
    model.eval()
    x_test = on["test"][0]
    with torch.no_grad():
        model(x_test)
    metrics.update(_routing_summary(model))
    profile = _profile(model, (x_test[: train.batch_size],), {}, latency)
    return metrics, history, profile, adapter


def _run_multitask(config: TrialConfig, device: torch.device, progress):
    """A multi-task (``tasks/multitask.py``): the backbone pre-trained on the base function's
    source, the members trained together; the queryable adapters read each example's
    instruction, every other method sees ``x`` only. Records the test MSE of every member."""
    from types import SimpleNamespace

    from qlsearch.adapters.queryable import QueryableModel
    from qlsearch.backbones import SYNTHETIC_TARGETS, pretrained_backbone
    from qlsearch.tasks.multitask import get_multitask, make_multitask_splits
    from qlsearch.train import fit

    task, train = config.task, config.train
    splits = make_multitask_splits(task.name, config.seed)
    backbone = pretrained_backbone(get_multitask(task.name).base, task.backbone, config.seed, config.cache_dir,
                                   epochs=train.pretrain_epochs, lr=train.pretrain_lr, device=device)
    dtype = getattr(torch, task.dtype)
    on = {split: getattr(splits, split) for split in ("train", "val", "test")}
    knobs = _knobs(config, task.targets or SYNTHETIC_TARGETS[task.backbone])
    model, frozen, adapter = _adapt(backbone.to(dtype), config, knobs)
    model = model.to(device)
    # one row per example, so the ablations (e.g. a wrong task's instruction) may act per example
    rows = {split: [SimpleNamespace(instruction=splits.instructions[i]) for i in ids.tolist()]
            for split, (_, _, ids) in on.items()}
    routed = isinstance(model, QueryableModel)
    _apply_instruction_mode(task, rows, model if routed else None, config.seed)
    embedded = {split: model.embed_instruction([r.instruction for r in rows[split]]) if routed else None
                for split in on}
    data = {split: (x.to(device, dtype), y.to(device, dtype), embedded[split])
            for split, (x, y, _) in on.items()}

    def predict(m: nn.Module, split: str, index=slice(None)) -> torch.Tensor:
        x, _, e = data[split]
        return m(x[index]) if e is None else m(x[index], instruction=e[index])

    def mse(m: nn.Module, split: str, index=slice(None)) -> torch.Tensor:
        return nn.functional.mse_loss(predict(m, split, index), data[split][1][index])

    extra = {} if embedded["test"] is None else {"instruction": embedded["test"][: train.batch_size]}
    latency = _latency(config, frozen, knobs, {"x": data["test"][0][: train.batch_size]}, extra)
    history = fit(model, lambda m, i: mse(m, "train", i), len(data["train"][0]),
                  lambda m: {s: mse(m, s).item() for s in data}, **_fit_settings(config), progress=progress)
    metrics = {**_prefixed(history.summary(), "mse"), **_optimisation(history)}
    model.eval()
    with torch.no_grad():
        errors = (predict(model, "test") - data["test"][1]).float().pow(2).squeeze(-1).cpu()
    ids = on["test"][2]
    metrics["test_mse_per_task"] = {m.name: errors[ids == i].mean().item() for i, m in enumerate(splits.members)}
    metrics.update(_routing_summary(model))  # of the test forward above
    profile = _profile(model, (data["test"][0][: train.batch_size],), extra, latency)
    return metrics, history, profile, adapter


def _run_text(config: TrialConfig, device: torch.device, progress):
    from transformers import AutoTokenizer

    from qlsearch.adapters._wrapper import layer_linear_names
    from qlsearch.adapters.queryable import QueryableModel
    from qlsearch.backbones import load_hf_model
    from qlsearch.tasks.text import (
        encode_for_training,
        evaluate_generation,
        evaluate_multiple_choice,
        get_text_task,
        load_task,
    )
    from qlsearch.train import fit

    task, train = config.task, config.train
    kind = get_text_task(task.name).kind
    tokenizer = AutoTokenizer.from_pretrained(task.backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backbone = load_hf_model(task.backbone, dtype=task.dtype, seed=config.seed, device=device)
    knobs = _knobs(config, task.targets or layer_linear_names(backbone))
    model, frozen, adapter = _adapt(backbone, config, knobs)
    examples = {key: load_task(task.name, split, limit=limit, data_files=task.data_files, seed=config.seed)
                for key, split, limit in (("train", "train", task.limit_train),
                                          ("val", "validation", task.limit_val),
                                          ("test", "test", task.limit_test))}
    routed = isinstance(model, QueryableModel)  # takes the route mask and the instruction
    _apply_instruction_mode(task, examples, model if routed else None, config.seed)
    encoded = {split: encode_for_training(tokenizer, rows, task.max_length) for split, rows in examples.items()}

    def batch_loss(m: nn.Module, data: dict, index) -> torch.Tensor:
        kwargs = {k: data[k][index].to(device) for k in ("input_ids", "attention_mask", "labels")}
        if routed:
            kwargs["route_mask"] = data["route_mask"][index].to(device)
            kwargs["instruction"] = [data["instruction"][i] for i in index.tolist()]
        return m(**kwargs).loss

    first = torch.arange(min(train.batch_size, len(encoded["test"]["input_ids"])))
    sample = {k: encoded["test"][k][first].to(device) for k in ("input_ids", "attention_mask")}
    routing = ({"route_mask": encoded["test"]["route_mask"][first].to(device),
                "instruction": [encoded["test"]["instruction"][i] for i in first.tolist()]} if routed else {})
    latency = _latency(config, frozen, knobs, sample, routing)

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {s: float(torch.stack([batch_loss(m, encoded[s], i) for i in
                                      torch.arange(len(encoded[s]["input_ids"])).split(train.batch_size)]).mean())
                for s in ("train", "val", "test")}

    history = fit(model, lambda m, i: batch_loss(m, encoded["train"], i), len(encoded["train"]["input_ids"]),
                  evaluate, **_fit_settings(config), progress=progress)
    model.eval()  # at the epoch selected on validation: both splits are scored there
    score = evaluate_multiple_choice if kind == "multiple_choice" else evaluate_generation
    extra = {} if kind == "multiple_choice" else {"max_new_tokens": task.max_new_tokens}
    metrics = {**history.summary(), **_optimisation(history)}
    for split in ("val", "test"):
        scores = score(model, tokenizer, examples[split], batch_size=train.batch_size, **extra)
        metrics.update({f"{split}_{k}": v for k, v in scores.items()})
    metrics.update(_routing_summary(model))
    profile = _profile(model, (), sample, latency)
    return metrics, history, profile, adapter


def shuffled_instruction(text: str, seed: int) -> str:
    """``text``'s words in an order seeded by ``seed`` and the text (the "shuffled" mode)."""
    import random

    words = text.split()
    random.Random(f"{seed}|{text}").shuffle(words)
    return " ".join(words)


def _apply_instruction_mode(task: TaskSpec, examples: dict, model, seed: int) -> None:
    """Set each example's instruction as ``task`` asks (the ablations of the paper's Table 8).

    ``random`` keeps the instruction text but seeds the adapter's per-string embedding
    cache with a random vector of the real embedding's norm, so training and every
    evaluation see that vector wherever the text would have been embedded.
    """
    import random

    rows = [e for split in examples.values() for e in split]
    if task.instruction is not None:
        for example in rows:
            example.instruction = task.instruction
    if task.instruction_mode == "none":
        for example in rows:
            example.instruction = None
    elif task.instruction_mode == "shuffled":
        for example in rows:
            example.instruction = shuffled_instruction(example.instruction, seed)
    elif task.instruction_mode == "adversarial":
        texts = sorted({e.instruction for e in rows if e.instruction is not None})
        if len(texts) < 2:
            raise ValueError("task.instruction_mode: 'adversarial' needs two or more distinct instructions "
                             "(a multi-task); allowed for one task: task.instruction = another task's")
        chooser = random.Random(f"{seed}|adversarial")
        for example in rows:  # a wrong task's instruction, drawn per example: it misleads
            example.instruction = chooser.choice([t for t in texts if t != example.instruction])
    elif task.instruction_mode == "random" and model is not None:
        encoder = model.instruction_encoder
        generator = torch.Generator().manual_seed(seed)
        for text in sorted({e.instruction for e in rows}):
            real = encoder([text])[0]
            noise = torch.randn(real.shape, generator=generator)
            encoder._cache[text] = noise * (real.norm() / noise.norm())


def _fit_settings(config: TrialConfig) -> dict:
    train = config.train
    return dict(epochs=train.epochs, lr=train.lr, batch_size=train.batch_size, seed=config.seed,
                eval_every=train.eval_every, weight_decay=train.weight_decay, patience=train.patience)


def _prefixed(summary: dict[str, float], unit: str) -> dict[str, float]:
    """``val_loss`` → ``val_mse`` for regression (the paper's Tables 1/2/9/10 say MSE)."""
    return {k.replace("loss", unit): v for k, v in summary.items()}


def _optimisation(history: History) -> dict:
    """Fig. 3/4: the last epoch's per-layer adapter gradient norms and concentration index."""
    if not history.layer_grad_norms or not history.layer_grad_norms[-1]:
        return {}
    return {"layer_grad_norms": history.layer_grad_norms[-1],
            "gradient_concentration": history.concentration[-1]}


def _routing_summary(model: nn.Module) -> dict:
    """Per block: mean routing weight of each atom over the last forward, and its entropy."""
    trace = getattr(model, "routing_trace", None)
    if not callable(trace):
        return {}
    usage, entropy = [], []
    for block in trace():
        if not isinstance(block, dict) or "alpha" not in block:
            return {}
        mean = block["alpha"].float().mean(0)
        usage.append(mean.tolist())
        entropy.append(float(-(mean * mean.clamp_min(1e-12).log()).sum()))
    return {"atom_usage": usage, "atom_usage_entropy": entropy} if usage else {}
