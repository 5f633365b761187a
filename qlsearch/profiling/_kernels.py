"""Kernels one forward or one training step launches: what a step costs where each op is small.

On a GPU at small batch (and on CPU with the launch-bound config) a step's time follows the
number of kernels it launches far more than its FLOPs: each costs a launch and a pass of the
dispatcher, however little it computes. This count is exact and the same on every run, so
it shows a change of a few percent that timings on a shared machine cannot resolve.

Counted with a ``TorchDispatchMode``, which sees every op below autograd, so a backward's
ops count too. Composite ops are decomposed to the ops that run; ops that only make a view
(their schema says the output aliases an input, and ``_unsafe_view``) or only allocate count
0. The count is the eager one, on the profile's device: a compiled graph fuses ops, and a few
ops decompose differently per device (``F.rms_norm`` is one kernel on CUDA, several on CPU).
In-place ops count: they write, so they launch.
The optimizer step is left out: on CUDA, AdamW steps every tensor in a few foreach launches.

Checked against a GPU: on an H200 (Qwen2.5-0.5B shape, bf16, batch 1 x 128, two runs) the
training step of queryable took 1.19-1.22x PEFT LoRA's time and instr-queryable's 1.09-1.18x,
where this count (the same code, the launch-bound config, bf16, 1 x 128, on CPU) gave 1.18x
and 1.20x. The forward tracks less closely: counted 1.11x and 1.13x, measured 0.96-1.01x and
0.95-1.06x.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: Ops that launch nothing: allocation only, or a view the schema does not mark as one.
NO_KERNEL = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like",
                       "_unsafe_view"})


def _launches(func) -> bool:
    """False for a view (an output aliases an input without writing it: ``Tensor(a)``) and
    for ``NO_KERNEL``; an in-place op (``Tensor(a!)``) writes, so it launches."""
    if func.overloadpacket.__name__ in NO_KERNEL:
        return False
    return not any(ret.alias_info is not None and not ret.alias_info.is_write for ret in func._schema.returns)


class KernelCounter(TorchDispatchMode):
    """Counts the ops that launch a kernel, by name (``counts``); see the module docstring."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), torch._C.DispatchKey.CompositeImplicitAutograd):
            with self:  # count the ops it is made of
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if _launches(func):
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_kernels(call: Callable[[], object]) -> int:
    """The kernels ``call()`` launches (run once, under the counter)."""
    with KernelCounter() as counter:
        call()
    return counter.total
