"""Decoding one prompt at the frozen model's speed: the held route's whole update merged.

After prefill the route is fixed, and with one prompt (beams and
``num_return_sequences`` repeat its rows) it is the same for every row, so each
adapted projection's update ``(alpha/r) B (I + g S_b) A`` can be merged into its weight
for the decode steps. The merged weight goes into an ``nn.Linear`` (``MergedLinear``)
put in the projection's place: a merge reaches the frozen model's speed only if the
adapter's module also leaves the call path (DESIGN.md). ``W0`` is never written, so
restoring is putting the original modules back, exact bit for bit, and models that
share ``W0`` are untouched.

The merged weights live in buffers made at the first merge and kept between
``generate`` calls, one per group of projections whose base weights share a shape:

* a merge is then one ``torch.stack`` of the ``W0`` into the buffer and one ``baddbmm_``
  per group, a few dozen ops where one ``addmm`` per projection (168 on the 24-layer
  launch-bound config) paid Python and dispatch per projection;
* fresh merged weights per call cost more than the merge's arithmetic on a CPU: tensors
  that size come from ``mmap`` and fault their pages in at first write (measured on the
  launch-bound config inside ``generate``: 13.3 ms a merge into fresh tensors against
  7.1 ms into kept ones, both one ``addmm`` per projection);
* a compiled decode step (CUDA graphs) reads the same addresses every call.

The price is memory: one copy of the adapted weights while the model is in eval mode
(``QueryableModel.train()`` frees it; ``merge_decode = False`` never makes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlsearch.adapters.queryable.layer import QueryableLinear


class MergedLinear(nn.Linear):
    """What stands in an adapted projection's place while one prompt decodes: an ``nn.Linear``,
    the frozen model's own module, whose weight is a view of the merged buffer and whose bias
    is the base layer's own. Being the frozen model's module type, a decode step costs what
    the frozen model's does, down to Python's attribute reads: a leaner stand-in holding its
    tensors as plain attributes measured 2.9 % faster per step than the frozen model on the
    launch-bound config (343.5 against 333.7 ms for 63 steps), an edge of the implementation
    that any model could take, which the decode ratio would have credited to the method."""

    def __init__(self, base: nn.Linear, weight: Tensor):
        nn.Module.__init__(self)  # nn.Linear's own would allocate and initialise a weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_parameter("bias", base.bias)


@dataclass
class _Group:
    """Projections whose base weights share a shape: merged by one batched GEMM into one buffer."""

    index: Tensor  # their gate indices: rows of the routes' stacked mixers
    layers: list[QueryableLinear]
    places: list[tuple[dict, str]]  # each one's parent's module registry and its name there
    merged: list[MergedLinear]  # each one's stand-in, whose weight is a view of ``weights``
    weights: Tensor  # (projections, d_out, d_in)
    #: their ``A`` (n, r, d_in) and ``B`` (n, d_out, r, in the weights' dtype) stacked, kept
    #: between merges while the weights are fixed (``merge(keep_factors=True)``); None: stacked per merge
    factors: tuple[Tensor, Tensor] | None = None


class WeightMerge:
    """The merged weights of a model's adapted projections and where each one goes.

    ``named`` are the projections' names in ``base_model`` and the layers, in gate order
    (``layer.index``). The buffers are made for the base weights' device and dtype."""

    def __init__(self, base_model: nn.Module, named: Sequence[tuple[str, QueryableLinear]]):
        groups: dict[tuple, list[tuple[str, QueryableLinear]]] = {}
        for name, layer in named:
            w = layer.base_layer.weight
            groups.setdefault((tuple(w.shape), w.dtype, w.device), []).append((name, layer))
        self.groups = [self._group(base_model, members) for members in groups.values()]
        self.active = False

    @staticmethod
    @torch.inference_mode(False)  # a first merge under inference_mode makes buffers a later one can write
    def _group(base_model: nn.Module, members: list[tuple[str, QueryableLinear]]) -> _Group:
        layers = [layer for _, layer in members]
        w = layers[0].base_layer.weight
        weights = torch.empty(len(layers), *w.shape, device=w.device, dtype=w.dtype)
        places = []
        for name, _ in members:
            parent, _, child = name.rpartition(".")
            places.append((base_model.get_submodule(parent)._modules, child))
        return _Group(
            index=torch.tensor([layer.index for layer in layers], device=w.device),
            layers=layers, places=places,
            merged=[MergedLinear(layer.base_layer, view) for layer, view in zip(layers, weights.unbind(0), strict=True)],
            weights=weights,
        )

    def fits(self) -> bool:
        """Whether the buffers still match the base weights' dtype and device (the model may
        have moved since they were made)."""
        w, buffer = self.groups[0].layers[0].base_layer.weight, self.groups[0].weights
        return (w.dtype, w.device) == (buffer.dtype, buffer.device)

    @torch.no_grad()
    def merge(self, mixers: Tensor, keep_factors: bool = False) -> None:
        """Write ``W0 + B M A`` for each projection, ``M = mixers[index]^T = (alpha/r)(I + g S_b)``
        (``mixers``: every projection's ``(alpha/r)(I + g S_b)^T`` for the one prompt, in gate
        order), and put the merged linears in the projections' places. ``B M A`` is made in
        the weights' dtype from ``M A`` made in the adapter's (a bf16 model with float32
        adapter weights: as the adapted forward rounds ``t`` before its ``B`` GEMM).

        ``keep_factors``: the adapter's weights are fixed (the inference form), so the stacked
        ``A`` and ``B`` of an earlier merge are read again instead of being stacked anew
        (measured inside ``generate`` on the launch-bound config: 1.2 of the merge's 8 ms,
        most of it reading 336 parameters through ``nn.Module.__getattr__``)."""
        self.active = True  # from here on, restore() puts back whatever was swapped
        for g in self.groups:
            dtype = g.weights.dtype
            A, B = g.factors if keep_factors and g.factors is not None else (
                torch.stack([layer.lora_A for layer in g.layers]),
                torch.stack([layer.lora_B for layer in g.layers]).to(dtype))
            g.factors = (A, B) if keep_factors else None
            factor = torch.bmm(mixers.index_select(0, g.index).transpose(1, 2).to(A.dtype), A)
            torch.stack([layer.base_layer.weight for layer in g.layers], out=g.weights)
            g.weights.baddbmm_(B, factor.to(dtype))
            for (registry, name), merged in zip(g.places, g.merged, strict=True):
                registry[name] = merged  # nn.Module's own registry: no __setattr__ checks

    def forget_factors(self) -> None:
        """Drop the kept ``A`` and ``B`` stacks (the weights may change: ``merge(keep_factors)``)."""
        for g in self.groups:
            g.factors = None

    def restore(self) -> None:
        """Put the adapted projections back (``W0`` was never written: exact, bit for bit)."""
        if self.active:
            for g in self.groups:
                for (registry, name), layer in zip(g.places, g.layers, strict=True):
                    registry[name] = layer
            self.active = False
