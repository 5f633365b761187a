"""The profile every trial record carries: parameters, FLOPs, memory (latency: see below).

Measured on the trained model with one batch of the trial's own test inputs,
so a study can optimise these fields beside accuracy. Latency is not timed
here: a trial's neighbours would be timed with it. The trial takes it from
the quiet, per-configuration measurement (``_latency.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from qlsearch.profiling._flops import count_flops
from qlsearch.profiling._subjects import count_parameters, resident_bytes


def profile_trained(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    """``trainable_params``, ``total_params``, ``stored_bytes``, ``batch``,
    ``flops``/``matmul_flops`` and ``peak_memory_bytes`` of one forward.

    Peak memory is what CUDA's allocator adds above the model during the forward;
    on CPU no allocator keeps such a peak, so it is ``None`` rather than a guess
    (``model_bytes`` is still exact there).
    """
    model.eval()
    device = next(model.parameters()).device

    def call():  # FLOPs are counted in grad mode (count_flops says why)
        return model(*args, **kwargs)

    def infer():
        with torch.inference_mode():
            return model(*args, **kwargs)

    trainable, total = count_parameters(model)
    first = args[0] if args else next(iter(kwargs.values()))
    profile = {
        "trainable_params": trainable,
        "total_params": total,
        "stored_bytes": sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad),
        "model_bytes": resident_bytes(model),
        "batch": int(first.shape[0]),
        "threads": torch.get_num_threads(),
        **count_flops(call),
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        infer()
        torch.cuda.synchronize()
        profile.update(peak_memory_bytes=torch.cuda.max_memory_allocated() - before,
                       peak_memory_source="torch.cuda.max_memory_allocated")
    else:
        profile.update(peak_memory_bytes=None, peak_memory_source="not measured on CPU")
    return profile
