"""FLOPs of one forward: the matmuls ``FlopCounterMode`` sees, plus the arithmetic it does not.

``torch.utils.flop_counter`` scores only matmul-like kernels; softmax, top-k,
sigmoid, norms, means and elementwise products count 0. The routing of the
queryable adapter is made of exactly those, so we register them through
``custom_mapping``: 1 FLOP per output element for elementwise ops and
reductions (per input element), 5 per element for (log-)softmax (max,
subtract, exp, sum, divide), ``n log2 k`` for top-k. The same rules apply to
every method and to the frozen model's own norms and activations, so ratios
between methods compare like with like. ``matmul_flops`` keeps the counter's
own number beside it.

Count with ``attn_implementation="eager"``: on CPU, SDPA dispatches to a
kernel the counter scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _per_output(cost: float) -> Callable:
    def formula(*args, out_shape=None, **kwargs) -> int:
        if isinstance(out_shape, tuple | list) and out_shape and isinstance(out_shape[0], tuple | list):
            out_shape = out_shape[0]  # ops with several outputs: count the first
        return int(cost * _numel(out_shape))

    return formula


def _add(*args, out_shape=None, alpha=1, **kwargs) -> int:
    """``add(a, b, alpha=c)`` is a multiply and an add per element when ``c != 1``."""
    return _numel(out_shape) * (1 if alpha == 1 else 2)


def _per_input(*args, out_shape=None, **kwargs) -> int:
    return _numel(args[0])


def _addmm_(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The in-place ``C.addmm_(A, B)`` (queryable's B GEMM into the base output): the counter
    scores ``addmm`` as its GEMM, ``2 m k n``, and does not know the in-place form."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _topk(self_shape, k, *args, out_shape=None, **kwargs) -> int:
    return int(_numel(self_shape) * max(1.0, math.log2(max(k, 2))))


# The counter looks ops up by overload packet (``aten.add``, not ``aten.add.Tensor``).
ELEMENTWISE = [aten.sub, aten.mul, aten.div, aten.neg, aten.exp, aten.log, aten.rsqrt,
               aten.sqrt, aten.pow, aten.sigmoid, aten.tanh, aten.silu, aten.gelu, aten.relu,
               aten.clamp_min, aten.where, aten.add_, aten.mul_]
REDUCTIONS = [aten.mean, aten.sum, aten.amax, aten.norm]

#: matmuls the counter does not know
MATMULS: dict = {aten.addmm_: _addmm_}
MAPPING: dict = {
    **MATMULS,
    **{op: _per_output(1) for op in ELEMENTWISE},
    **{op: _per_input for op in REDUCTIONS},
    aten.add: _add,
    aten._softmax: _per_output(5),
    aten._log_softmax: _per_output(5),
    aten.topk: _topk,
}


def count_flops(call: Callable[[], object]) -> dict[str, int]:
    """``{"flops", "matmul_flops"}`` of running ``call()`` once.

    In grad mode: the counter's module tracker asserts on a parameter passed straight into
    a submodule (RepLoRA's seeds) under ``no_grad``, and on a parametrized weight (the
    "mixed" precision policy's cast) under ``inference_mode``. The graph built
    is dropped with the outputs; backward FLOPs are not counted.
    """
    with FlopCounterMode(display=False, custom_mapping=MATMULS) as matmuls:
        call()
    with FlopCounterMode(display=False, custom_mapping=MAPPING) as everything:
        call()
    return {"flops": everything.get_total_flops(), "matmul_flops": matmuls.get_total_flops()}
