"""One configuration's forward latency, measured quietly and reused by every trial of it.

Design (DESIGN.md, "Latency inside a sweep"): a per-configuration cache that
the sweep fills, not a separate profiling phase. Inference cost does not depend
on the trained weights (top-k keeps the active set's size fixed), so a fresh,
untrained copy of the configuration times the same as the trained one, and one
measurement per configuration, shape and machine serves every seed, retry and
repeat of it. A cache needs no second pass over the sweep: the trial that first
meets a configuration measures it before it trains and the study's latency
objective is known when Optuna is told, for any sampler (a phase would need the
configurations in advance, which TPE does not give). The cache lives on disk
under the study's run folder, so a resumed sweep reuses it.

A measurement is fair because:

* nothing else computes on the machine while it times: it holds the node's
  quiet lock (``_quiet.py``), which every trial yields at its next forward;
* the configuration is interleaved in one process with the frozen model and a
  fixed reference, PEFT LoRA at rank ``REFERENCE_RANK`` on the same targets, at
  the trial's own inputs (``_timing.py``: rounds in shuffled order, medians, spreads);
* ``forward_ratio`` divides by that reference, so ratios from trials measured
  hours apart, or under different background noise, stay comparable: the
  reference is fixed, not the trial's own rank.

The cache key holds everything the time depends on: method and knobs (not the
seed, which only initialises weights), the model's architecture (parameter
names, shapes and dtypes), the input shapes, device, thread count, library
versions and the code's revision. Two trials on different nodes of a cluster
that miss at once may both measure; the later file wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from qlsearch.adapters import attach
from qlsearch.adapters._precision import inference_form
from qlsearch.profiling._machine import _cpu_model, _version
from qlsearch.profiling._quiet import QuietDevice, quiet_device
from qlsearch.profiling._settings import FROZEN, REFERENCE
from qlsearch.profiling._subjects import Subject, forward_call, shared_copy
from qlsearch.profiling._timing import Clock, Spread, timed_rounds, warm_up

#: The reference's rank: the paper's (Table 6, r = 8), fixed for every trial of every study.
REFERENCE_RANK = 8
MEASURED = "configuration"
#: Bump when what a measurement means changes: older cache files are then ignored.
LATENCY_VERSION = 1


def _architecture(model: nn.Module) -> str:
    shapes = [(n, list(p.shape), str(p.dtype)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps([type(model).__name__, shapes]).encode()).hexdigest()[:16]


def _shapes(tensors: dict) -> dict:
    return {k: [list(v.shape), str(v.dtype)] if isinstance(v, Tensor) else repr(v) for k, v in tensors.items()}


def latency_key(base: nn.Module, method: str, knobs: dict, inputs: dict, extra: dict,
                code: str | None = None) -> dict:
    """What a forward's time depends on; equal keys share one measurement."""
    device = next(base.parameters()).device
    return {
        "version": LATENCY_VERSION,
        "method": method,
        "knobs": {k: v for k, v in sorted(knobs.items()) if k != "seed"},
        "architecture": _architecture(base),
        "inputs": _shapes({**inputs, **extra}),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model()),
        "threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in ("torch", "transformers", "peft", "qlsearch")},
        "code": code,
    }


def _subjects(base: nn.Module, method: str, knobs: dict, extra: dict) -> list[Subject]:
    """Frozen, reference LoRA and the configuration: adapted copies sharing ``base``'s weights."""
    targets = knobs.get("target_modules")
    device = next(base.parameters()).device
    # the reference runs under the configuration's precision policy (the same terms for both)
    precision = {"precision": knobs["precision"]} if "precision" in knobs else {}
    reference = attach(shared_copy(base), REFERENCE, r=REFERENCE_RANK, **precision,
                       **({"target_modules": targets} if targets is not None else {})).to(device).eval()
    adapted = attach(shared_copy(base), method, **knobs).to(device).eval()
    frozen = shared_copy(base).eval()  # eval mode without changing the caller's model
    return [Subject(FROZEN, frozen, frozen), Subject(REFERENCE, reference, reference),
            Subject(MEASURED, adapted, adapted, extra)]


def _summary(samples: dict[str, list[float]], batch: int) -> dict:
    median = {name: statistics.median(xs) for name, xs in samples.items()}
    ratios = [c / r for c, r in zip(samples[MEASURED], samples[REFERENCE], strict=True)]
    return {
        "forward_ms": median[MEASURED],
        "forward_ms_spread": Spread.of(samples[MEASURED]).as_dict(),
        "forward_ratio": median[MEASURED] / median[REFERENCE],
        # each round times all three back to back: the per-round ratio shows the ratio's own noise
        "forward_ratio_spread": Spread.of(ratios).as_dict(),
        "frozen_ms": median[FROZEN],
        "reference_ms": median[REFERENCE],
        "overhead_ms": median[MEASURED] - median[FROZEN],
        "batch": batch,
        "forward_ms_per_example": median[MEASURED] / batch,
        "unit": f"ms per forward of a batch of {batch}",
    }


def measure_latency(base: nn.Module, method: str, knobs: dict, inputs: dict[str, Tensor], *,
                    extra: dict | None = None, cache_dir: str | Path | None = None, code: str | None = None,
                    repeats: int = 30, warmup: int = 5, quiet: QuietDevice | None = None) -> dict:
    """``method`` with ``knobs`` on the frozen ``base``: forward latency at ``inputs``
    (keyword arguments of the model's forward), its ratio to PEFT LoRA and their spreads.

    ``extra`` goes to the adapted model's forward only (e.g. ``instruction``).
    With ``cache_dir``, a stored measurement of the same key is returned
    (``cached: True``) instead of timing again. ``base`` is not modified.
    """
    extra = extra or {}
    key = latency_key(base, method, knobs, inputs, extra, code)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{method}-{digest}.json" if cache_dir is not None else None
    if (hit := _read(path)) is not None:
        return hit
    subjects = _subjects(base, method, knobs, extra)  # built before the others are paused
    calls = {s.name: forward_call(s, inputs) for s in subjects}
    clock = Clock(next(base.parameters()).device.type)
    with (quiet or quiet_device()).quiet() as state:
        if (hit := _read(path)) is not None:  # measured by a trial we waited for
            return hit
        started = time.time()
        with contextlib.ExitStack() as deployed:  # each model in the form a user would deploy
            forms = {s.name: deployed.enter_context(inference_form(s.model)) for s in subjects}
            warm_up(calls, warmup)
            samples = timed_rounds(calls, clock, repeats)
        seconds = time.time() - started
        latency = {
            **_summary(samples, batch=int(next(iter(inputs.values())).shape[0])),
            "reference": f"PEFT LoRA r={REFERENCE_RANK} on the same targets",
            "form": forms[MEASURED], "reference_form": forms[REFERENCE],
            "quiet": state["quiet"], "waited_s": state["waited_s"],
            "repeats": repeats, "warmup": warmup, "threads": key["threads"], "timer": clock.name,
            "statistic": "median over rounds; frozen, reference and configuration interleaved",
            "started_at": started, "seconds": seconds, "key": digest, "cached": False,
        }
        if path is not None:
            _write(path, {"key": key, "latency": latency})
    return latency


def _read(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    return {**json.loads(path.read_text())["latency"], "cached": True}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)  # readers see the whole file or none
