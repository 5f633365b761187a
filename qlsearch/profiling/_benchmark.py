"""Run the comparison: forward, decode and training step of every method, interleaved."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from qlsearch.adapters._precision import inference_form
from qlsearch.profiling._flops import count_flops
from qlsearch.profiling._kernels import count_kernels
from qlsearch.profiling._machine import machine_info
from qlsearch.profiling._settings import FROZEN, REFERENCE, ProfileSettings
from qlsearch.profiling._subjects import (
    Subject,
    backward_call,
    build_base,
    build_subjects,
    count_parameters,
    cuda_peak_bytes,
    forward_call,
    generate_call,
    generation_kwargs,
    make_inputs,
    train_call,
)
from qlsearch.profiling._timing import Clock, Spread, timed_rounds, warm_up

_PEAK_MEMORY = ("the model's own parameters and buffers plus the most allocated above them in one "
                "forward and (unless train is skipped) one training step with a fresh AdamW; "
                "torch.cuda.max_memory_allocated")
_NO_PEAK_MEMORY = ("null: not measured on CPU (the process RSS never shrinks, so one process "
                   "cannot attribute it to methods that run interleaved)")


#: Under --compile: five models share code objects (one graph each), so the default of
#: 8 graphs per code object is too few.
_DYNAMO_CONFIG = {"recompile_limit": 64}


def _compile_context(settings: ProfileSettings) -> contextlib.AbstractContextManager:
    if not settings.compile:
        return contextlib.nullcontext()
    import torch._dynamo

    return torch._dynamo.config.patch(**_DYNAMO_CONFIG)


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["frames"]["ok"]


@dataclass
class _Phases:
    """Runs each phase's warm-up and timed rounds; counts compilations inside timed rounds,
    which would mean the samples measure the compiler, not the model."""

    settings: ProfileSettings
    clock: Clock
    progress: Callable[[str], None] | None
    compiles_while_timing: int = 0
    #: under --compile, per phase: each model's first warm-up call in seconds (its compilation)
    compile_seconds: dict[str, dict[str, float]] = field(default_factory=dict)

    def time(self, calls: dict, label: str) -> dict[str, list[float]]:
        first = warm_up(calls, self.settings.warmup, self.clock if self.settings.compile else None)
        if first:
            self.compile_seconds[label] = first
        before = _compiled_graphs() if self.settings.compile else 0
        samples = timed_rounds(calls, self.clock, self.settings.repeats, self.progress, label)
        compiled = _compiled_graphs() - before if self.settings.compile else 0
        if compiled and self.progress is not None:
            self.progress(f"{label}: warning: {compiled} graph(s) compiled while timing; "
                          "raise --warmup")
        self.compiles_while_timing += compiled
        return samples


@dataclass
class MethodProfile:
    """One method's row. Times are medians over the repeats; ``*_ratio`` is to PEFT LoRA,
    ``*_ratio_frozen`` and ``overhead_ms`` to the frozen model, all measured in the same
    process. Phases that were skipped (or cannot apply, like training the frozen model,
    or decoding a backbone that does not generate) are None; the training step has no
    ratio to the frozen model, which has nothing to train."""

    forward_ms: float
    forward_ms_spread: dict
    forward_ratio: float
    forward_ratio_frozen: float
    overhead_ms: float
    prefill_ms: float | None
    decode_tokens_per_s: float | None
    decode_tokens_per_s_spread: dict | None
    decode_ratio: float | None
    decode_ratio_frozen: float | None
    train_step_ms: float | None
    train_step_ms_spread: dict | None
    train_ratio: float | None
    trainable_params: int
    total_params: int
    adapter_bytes: int
    peak_memory_bytes: int | None
    #: how the trainable weights are stored and the dtype the adapter computes in (None: frozen)
    adapter_dtype: str | None
    compute_dtype: str | None
    targets: list[str]  # the adapted linears (last name component), in model order
    #: the form forward, decode and FLOPs were measured in (``inference_form``); the
    #: training step always runs the training form
    form: str
    flops: int | None = None  # one forward; see qlsearch/profiling/_flops.py for what counts
    flops_ratio: float | None = None
    flops_ratio_frozen: float | None = None
    #: kernels launched by one eager forward (inference form) and one training step's forward
    #: and backward (training form); see qlsearch/profiling/_kernels.py for what counts
    kernels: int | None = None
    kernels_ratio: float | None = None
    train_kernels: int | None = None
    train_kernels_ratio: float | None = None
    peak_memory_ratio: float | None = None  # to LoRA's (CUDA only)
    #: under --compile: seconds of the first forward, the first training step and the first
    #: full ``generate`` (its decode step's compilation), which compile the model's graphs
    #: (warm-up calls, never among the samples); else None
    forward_compile_s: float | None = None
    train_compile_s: float | None = None
    decode_compile_s: float | None = None


@dataclass
class ProfileResult:
    machine: dict
    settings: dict
    methods: dict[str, MethodProfile]

    def as_dict(self) -> dict:
        return {"machine": self.machine, "settings": self.settings,
                "methods": {name: asdict(row) for name, row in self.methods.items()}}


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def _decode_rate(batch: int, new_tokens: int, full_ms: float, prefill_ms: float) -> float | None:
    """Tokens/s of the N - 1 decode steps: ``batch (N - 1) / (t(N) - t(prefill))``.

    None when noise makes the decode time non-positive (too few repeats).
    """
    decode_ms = full_ms - prefill_ms
    return batch * (new_tokens - 1) / (decode_ms / 1e3) if decode_ms > 0 else None


def _measure_decode(subjects: list[Subject], inputs: dict, settings: ProfileSettings,
                    phases: _Phases) -> dict[str, tuple[float, float | None, list]]:
    """Per method: (prefill ms, tokens/s from the medians, per-round tokens/s for the spread)."""
    config = subjects[0].model.config  # the frozen HF model's config
    N = settings.new_tokens
    calls = {}
    for s in subjects:
        calls[(s.name, 1)] = generate_call(s, inputs, generation_kwargs(config, 1, settings.compile))
        calls[(s.name, N)] = generate_call(s, inputs, generation_kwargs(config, N, settings.compile))
    samples = phases.time(calls, "decode")
    out = {}
    for s in subjects:
        prefill, full = samples[(s.name, 1)], samples[(s.name, N)]
        rate = _decode_rate(settings.batch, N, statistics.median(full), statistics.median(prefill))
        rounds = [r for f, p in zip(full, prefill, strict=True)
                  if (r := _decode_rate(settings.batch, N, f, p)) is not None]
        out[s.name] = (statistics.median(prefill), rate, rounds)
    return out


@contextlib.contextmanager
def _training(subjects: list[Subject]) -> Iterator[list[Subject]]:
    """The subjects with something to train (not the frozen or the merged model), in train
    mode; back in eval mode, gradients dropped, afterwards."""
    trained = [s for s in subjects if s.trainable]
    for s in trained:
        s.model.train()
    try:
        yield trained
    finally:
        for s in trained:
            s.model.zero_grad(set_to_none=True)
            s.model.eval()


def _measure_train(subjects: list[Subject], inputs: dict, phases: _Phases) -> dict[str, list[float]]:
    with _training(subjects) as trained:
        return phases.time({s.name: train_call(s, inputs) for s in trained}, "train")


def _eager(subject: Subject) -> Subject:
    return replace(subject, runner=subject.model)


def _count_train_kernels(subjects: list[Subject], inputs: dict) -> dict[str, int]:
    """Kernels of one eager training step's forward and backward, after one uncounted step
    (state made lazily is made at the first), from no gradients, as ``train_call`` runs it."""
    with _training(subjects) as trained:
        counts = {}
        for s in trained:
            step = backward_call(_eager(s), inputs)
            step()
            s.model.zero_grad(set_to_none=True)
            counts[s.name] = count_kernels(step)
        return counts


@contextlib.contextmanager
def _eager_attention(model):
    """Every HF config in ``model`` set to eager attention, then restored: on CPU, SDPA
    runs a kernel the FLOP counter scores 0."""
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    saved = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for key, c in configs.items():
            c._attn_implementation = saved[key]


def _count_flops(subject: Subject, inputs: dict) -> int:
    with _eager_attention(subject.model):
        return count_flops(lambda: subject.model(**inputs, **subject.extra))["flops"]


def _write_traces(subjects: list[Subject], inputs: dict, out_dir: str) -> None:
    """One ``torch.profiler`` trace of a forward per method: ``<dir>/<method>/*.pt.trace.json``
    (Chrome trace JSON: Perfetto, chrome://tracing, or TensorBoard with torch-tb-profiler)."""
    from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for s in subjects:
        handler = tensorboard_trace_handler(str(Path(out_dir) / s.name), worker_name=s.name)
        with torch.inference_mode(), profile(activities=activities, record_shapes=True,
                                             on_trace_ready=handler):
            s.runner(**inputs, **s.extra)


def profile_methods(settings: ProfileSettings,
                    progress: Callable[[str], None] | None = None) -> ProfileResult:
    """Measure every method of ``settings`` against the frozen model and PEFT LoRA.

    ``progress`` receives one line per timed round (the CLI prints them to stderr).

    >>> result = profile_methods(ProfileSettings("benchmarks/configs/launch-bound", seq=1))
    >>> result.methods["queryable"].forward_ratio
    """
    threads = torch.get_num_threads()
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    try:
        return _profile(settings, progress)
    finally:
        torch.set_num_threads(threads)  # a library call leaves the process as it found it


def _profile(settings: ProfileSettings, progress: Callable[[str], None] | None) -> ProfileResult:
    say = progress or (lambda line: None)
    say(f"building {settings.model} ({settings.dtype}, {settings.device})")
    base = build_base(settings)
    subjects = build_subjects(base, settings)
    inputs = make_inputs(base, settings)
    clock = Clock(settings.device)
    phases = _Phases(settings, clock, progress)
    started = time.time()

    with _compile_context(settings):
        with contextlib.ExitStack() as forms:  # each method as deployed: forward, decode, FLOPs
            for s in subjects:
                if s.form is None:
                    s.form = forms.enter_context(inference_form(s.model))
            forward = phases.time({s.name: forward_call(s, inputs) for s in subjects}, "forward")
            decodes = settings.runs("decode") and not settings.synthetic  # backbones do not generate
            decode = _measure_decode(subjects, inputs, settings, phases) if decodes else {}
            flops, kernels = {}, {}
            if settings.runs("flops"):
                flops = {s.name: _count_flops(s, inputs) for s in subjects}
                kernels = {s.name: count_kernels(forward_call(_eager(s), inputs)) for s in subjects}
            if settings.trace:
                _write_traces(subjects, inputs, settings.trace)
        train = _measure_train(subjects, inputs, phases) if settings.runs("train") else {}
        train_kernels = _count_train_kernels(subjects, inputs) if settings.runs("flops") else {}
        peaks = ({s.name: cuda_peak_bytes(s, inputs, settings.runs("train")) for s in subjects}
                 if settings.device == "cuda" else {})

    fwd = {name: statistics.median(x) for name, x in forward.items()}
    step = {name: statistics.median(x) for name, x in train.items()}
    rate = {name: d[1] for name, d in decode.items()}
    methods = {}
    for s in subjects:
        trainable, total = count_parameters(s.model)
        prefill, _, rounds = decode.get(s.name, (None, None, []))
        methods[s.name] = MethodProfile(
            forward_ms=fwd[s.name],
            forward_ms_spread=Spread.of(forward[s.name]).as_dict(),
            forward_ratio=fwd[s.name] / fwd[REFERENCE],
            forward_ratio_frozen=fwd[s.name] / fwd[FROZEN],
            overhead_ms=fwd[s.name] - fwd[FROZEN],
            prefill_ms=prefill,
            decode_tokens_per_s=rate.get(s.name),
            decode_tokens_per_s_spread=Spread.of(rounds).as_dict() if rounds else None,
            decode_ratio=_ratio(rate.get(s.name), rate.get(REFERENCE)),
            decode_ratio_frozen=_ratio(rate.get(s.name), rate.get(FROZEN)),
            train_step_ms=step.get(s.name),
            train_step_ms_spread=Spread.of(train[s.name]).as_dict() if s.name in train else None,
            train_ratio=_ratio(step.get(s.name), step.get(REFERENCE)),
            trainable_params=trainable,
            total_params=total,
            adapter_bytes=sum(p.numel() * p.element_size() for p in s.trainable),
            peak_memory_bytes=peaks.get(s.name),
            adapter_dtype=s.adapter_dtype,
            compute_dtype=s.compute_dtype,
            targets=s.targets,
            form=s.form,
            flops=flops.get(s.name),
            flops_ratio=_ratio(flops.get(s.name), flops.get(REFERENCE)),
            flops_ratio_frozen=_ratio(flops.get(s.name), flops.get(FROZEN)),
            kernels=kernels.get(s.name),
            kernels_ratio=_ratio(kernels.get(s.name), kernels.get(REFERENCE)),
            train_kernels=train_kernels.get(s.name),
            train_kernels_ratio=_ratio(train_kernels.get(s.name), train_kernels.get(REFERENCE)),
            peak_memory_ratio=_ratio(peaks.get(s.name), peaks.get(REFERENCE)),
            forward_compile_s=phases.compile_seconds.get("forward", {}).get(s.name),
            train_compile_s=phases.compile_seconds.get("train", {}).get(s.name),
            decode_compile_s=phases.compile_seconds.get("decode", {}).get((s.name, settings.new_tokens)),
        )

    config = base.config
    recorded = {
        **settings.as_dict(),
        "model_config": {key: getattr(config, key, None) for key in (
            "model_type", "num_hidden_layers", "hidden_size", "intermediate_size",
            "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "timer": clock.name,
        "statistic": "median over repeats after warm-up; methods interleaved, each round in its own seeded random order",
        "compiled_phases": [phase for phase, ran in (("forward", True), ("train", bool(train)), ("decode", decodes))
                            if ran] if settings.compile else [],
        "decode_cache": None if not decodes else (
            "static (transformers compiles the decode step)" if settings.compile else "dynamic"),
        "dynamo_config": _DYNAMO_CONFIG if settings.compile else None,
        "compiles_while_timing": phases.compiles_while_timing if settings.compile else None,
        "forms": ("forward, decode and FLOPs time each method's inference form (row 'form'; "
                  "qlsearch.adapters._precision.inference_form); the training step its training form"),
        "decode_formula": "batch * (new_tokens - 1) / (t(generate new_tokens) - t(generate 1))",
        "flops": ("FlopCounterMode with eager attention, plus elementwise ops, reductions, softmax "
                  "and top-k it does not count (qlsearch/profiling/_flops.py)"),
        "kernels": ("ops that launch a kernel, eager, on this device: one forward in the inference form; "
                    "one training step's forward and backward, no optimizer (qlsearch/profiling/_kernels.py)"),
        "peak_memory": _PEAK_MEMORY if settings.device == "cuda" else _NO_PEAK_MEMORY,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    return ProfileResult(machine_info(settings.device), recorded, methods)
