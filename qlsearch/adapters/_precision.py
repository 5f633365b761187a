"""One precision policy for every method, and the form each method is deployed in.

**Policy "mixed" (the default).** Trainable adapter weights, and so AdamW's
state, are stored in float32; the adapter computes in the model's dtype. The
small weights are cast to that dtype on use, never the activations. The cast is
a ``torch.nn.utils.parametrize`` parametrization on each trainable tensor, so
the method's own code (ours or PEFT's) reads ``layer.lora_A`` in the compute
dtype while the optimizer steps the float32 original; gradients flow through
the cast to it.

Why not the alternatives:

* bf16 storage rounds away every AdamW step below half a bf16 ulp
  (``|w| 2^-9``): atoms of size ~0.35 stop learning below updates of ~1e-3.
* PEFT's default (``autocast_adapter_dtype=True``) keeps float32 weights but casts
  every adapted layer's *input* to float32 and the result back: float32 matmuls on
  the activations, +108 % over the frozen model at batch 8 x 512 on an H200.
* ``torch.autocast`` gives float32 masters with bf16 matmuls too, but it also
  changes the frozen model's own ops (its float32 op list), so the frozen
  reference would no longer be the model a user runs; and PEFT still casts the
  input to float32 first unless ``peft.helpers.disable_input_dtype_casting`` is on.
  A parametrization touches only the adapter's tensors, and PEFT sees weights in
  the input's dtype, so it casts nothing.

**Policy "model".** Trainable weights stored in the model's dtype (pure bf16 on a
bf16 model; for PEFT the same as ``autocast_adapter_dtype=False``). Cheapest, and
it can freeze small updates: a choice to record, not a default.

On a float32 model both policies are the same and nothing is parametrized.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize

#: ``mixed``: float32 weights and optimizer state, compute in the model's dtype;
#: ``model``: weights stored in the model's dtype (pure bf16 on a bf16 model).
PRECISIONS = ("mixed", "model")
#: The dtype trainable weights are stored in under "mixed".
MASTER_DTYPE = torch.float32

_PARAMETRIZED = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")


class CastTo(nn.Module):
    """The parametrization: the stored (master) tensor, cast to the compute dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, master: torch.Tensor) -> torch.Tensor:
        return master.to(self.dtype)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the frozen model's floating weights: the compute dtype."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    raise ValueError("precision: the model has no frozen floating-point weights to read its dtype from")


def apply_precision(model: nn.Module, precision: str | None) -> nn.Module:
    """Store ``model``'s trainable tensors as ``precision`` says (module docstring) and return it.

    ``None`` leaves them as the method built them (PEFT's own default; a reference
    in benchmarks, not a policy to train with).
    """
    if precision is None:
        return model
    if precision not in PRECISIONS:
        raise ValueError(f"precision: got {precision!r}; allowed: {', '.join(PRECISIONS)}")
    compute = model_dtype(model)
    stored = MASTER_DTYPE if precision == "mixed" and compute.is_floating_point else compute
    owners = [(module, name) for module in model.modules()
              for name, p in module.named_parameters(recurse=False) if p.requires_grad]
    for module, name in owners:
        p = getattr(module, name)
        if p.dtype != stored:
            p.data = p.data.to(stored)
        if stored != compute:
            parametrize.register_parametrization(module, name, CastTo(compute), unsafe=True)
    return model


def precision_of(model: nn.Module) -> dict[str, str | None]:
    """``{"adapter_dtype", "compute_dtype"}`` as names (``"float32"``): how the trainable
    tensors are stored, and the dtype the adapter computes in (the cast's target where
    they are cast, else their own: PEFT casts its input to its weights' dtype). ``None``
    for a model with nothing trainable."""
    stored = {p.dtype for p in model.parameters() if p.requires_grad}
    if not stored:
        return {"adapter_dtype": None, "compute_dtype": None}
    casts = {m.dtype for m in model.modules() if isinstance(m, CastTo)}
    name = lambda dtypes: "+".join(sorted(str(d).removeprefix("torch.") for d in dtypes))  # noqa: E731
    return {"adapter_dtype": name(stored), "compute_dtype": name(casts or stored)}


def canonical_name(name: str) -> str:
    """A trainable tensor's name without the parametrization's wrapping
    (``x.parametrizations.lora_A.original`` -> ``x.lora_A``): checkpoints do not
    depend on the policy they were trained under."""
    return _PARAMETRIZED.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)


def adapted_targets(model: nn.Module) -> list[str]:
    """The distinct names (last component) of the linears ``model`` adapts, in model order.

    An adapted layer, ours or PEFT's, keeps the linear it wraps as ``base_layer``.
    """
    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(getattr(m, "base_layer", None), nn.Linear)]
    return list(dict.fromkeys(names))


@contextlib.contextmanager
def inference_form(model: nn.Module) -> Iterator[str]:
    """``model`` in the fastest exact form a user would deploy it in; yields the form's name.

    Inside, every cast of the policy is made once and reused, and a method whose
    factors are generated from other weights (RepLoRA, DoRAN, HyRA) generates them
    once (``fold``); the forward then costs what LoRA's does. Outputs are unchanged (the
    queryable form's up to rounding: with its gates fixed it computes ``s + g s S^T`` where
    training computes ``s (I + g S)^T``).
    Training must happen outside: the cached casts and folded factors do not follow
    optimizer steps. A method names its form in ``inference_form_name`` (PEFT's
    methods run unmerged: ``unmerged``).
    """
    fold = getattr(model, "fold", None)
    with parametrize.cached(), torch.no_grad():
        if callable(fold):
            fold()
        try:
            yield getattr(model, "inference_form_name", "unmerged")
        finally:
            if callable(fold):
                model.unfold()
