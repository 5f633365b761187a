"""Timing: one clock per device, methods interleaved in rounds, medians with their spread.

Interleaving spreads slow drifts (thermal throttling, a background process, the
allocator warming up) over every method alike instead of charging them to
whichever ran last. Each round runs the methods in its own random order (seeded:
a run is reproducible), so no method always follows the same neighbour: a call
leaves the caches and branch predictors to the next one, and a fixed order, even
one whose start rotates, billed each method for its predecessor's leftovers. Measured
on the deep-MLP backbone (batch 64, 2 CPU threads): two identical queryable models,
one always run right after PEFT LoRA, differed by 5 %; in shuffled rounds, by 1 %.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


class Clock:
    """Milliseconds of one call: CUDA events after a synchronize on GPU, ``perf_counter`` on CPU.

    Kernels run asynchronously on GPU, so host time alone would measure the
    launches, not the work.
    """

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    @property
    def name(self) -> str:
        return "torch.cuda.Event + synchronize" if self.cuda else "time.perf_counter"

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


@dataclass(frozen=True)
class Spread:
    """Where the repeats fell: extremes and quartiles (the median is reported beside it)."""

    min: float
    q25: float
    q75: float
    max: float

    @classmethod
    def of(cls, samples: list[float]) -> Spread:
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], samples[0])
        q25, _, q75 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(min(samples), q25, q75, max(samples))

    def as_dict(self) -> dict:
        return asdict(self)


def warm_up(calls: dict[str, Callable[[], object]], rounds: int, clock: Clock | None = None) -> dict[str, float]:
    """Untimed rounds: first-call costs (allocations, compilation, lazy init) stay out of the
    samples. Returns the seconds each call's first round took on ``clock`` (under
    ``--compile``, compiling that model); without a clock, or without rounds, ``{}``."""
    first = {}
    for i in range(rounds):
        for name, call in calls.items():
            if i == 0 and clock is not None:
                first[name] = clock.time_ms(call) / 1e3
            else:
                call()
    return first


def round_order(names: list, i: int) -> list:
    """Round ``i``'s order of ``names``: a shuffle seeded by ``i``, the same in every run."""
    random.Random(i).shuffle(names)
    return names


def timed_rounds(calls: dict[str, Callable[[], object]], clock: Clock, repeats: int,
                 progress: Callable[[str], None] | None = None, label: str = "") -> dict[str, list[float]]:
    """Samples (ms) of every call, ``repeats`` rounds of one call each, each round in its
    own order (``round_order``). The garbage collector is paused while timing, as
    ``timeit`` does, so a collection triggered by one method is not billed to another.
    """
    samples: dict[str, list[float]] = {name: [] for name in calls}
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(repeats):
            for name in round_order(list(calls), i):
                samples[name].append(clock.time_ms(calls[name]))
            if progress is not None:
                progress(f"{label}: round {i + 1}/{repeats}")
    finally:
        if enabled:
            gc.enable()
    return samples

