"""Attach the queryable adapter to a model: units, blocks, the routing context, save/load.

A *unit* is one transformer layer (its adapted projections share the unit's
state), or one adapted linear in a model without a layer list (a plain MLP).
Units are split into ``num_blocks`` contiguous blocks of near-equal size; each
block gets one route per example.

The per-forward context (route mask, instruction) reaches the adapted layers
through a forward pre-hook on the base model, so it also works inside
``generate``, which calls the base model's forward itself. A forward with a
non-empty KV cache, and every forward after the first inside ``generate``,
holds the routes of the prefill: the route is computed once from the prompt.

Decoding one prompt (batch 1, beams and ``num_return_sequences`` included: their
rows repeat the one prompt, so they share its route) merges each projection's
whole update into its weight after prefill and puts plain linears holding the merged
weights in the adapted places until ``generate`` returns (``merge.py``). Batches of
several prompts use the folded batched matmul instead (``QueryableLinear``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlsearch.adapters._wrapper import (
    AdapterModel,
    find_layer_linears,
    group_by_layer,
    layer_list,
    seeded,
)
from qlsearch.adapters.queryable.config import QueryableConfig
from qlsearch.adapters.queryable.encoder import InstructionEncoder
from qlsearch.adapters.queryable.layer import QueryableLinear
from qlsearch.adapters.queryable.merge import WeightMerge
from qlsearch.adapters.queryable.router import AtomRouter
from qlsearch.adapters.queryable.state import RoutingState, token_weights_from_mask

Instruction = str | Sequence[str | None] | Tensor | None


def find_units(model: nn.Module, config: QueryableConfig) -> list[list[str]]:
    """Names of the linears to adapt, grouped into units in forward order."""
    targets = find_layer_linears(model, config.target_modules)
    layers = layer_list(model)
    outside = [n for n in targets if layers and not n.startswith(layers[0] + ".")]
    if outside:
        raise ValueError(
            f"target_modules: {outside[0]!r} lies outside the transformer layers ({layers[0]}); "
            "the queryable adapter routes per layer, so adapt only linears inside them"
        )
    return group_by_layer(model, targets)


def split_blocks(num_units: int, num_blocks: int) -> list[list[int]]:
    """Contiguous blocks of near-equal size (the first ``num_units % num_blocks`` one larger)."""
    if num_blocks > num_units:
        raise ValueError(
            f"num_blocks: got {num_blocks}; allowed: 1 to the number of adapted units ({num_units})"
        )
    return [chunk.tolist() for chunk in torch.arange(num_units).tensor_split(num_blocks)]


def parameter_count(config: QueryableConfig, shapes: Sequence[tuple[int, int]]) -> int:
    """Trainable parameters of the adapter on linears of ``(d_in, d_out)`` shapes.

    ``sum_p [r (d_in + d_out) + 1]``  (A, B and the gate of each projection)
    ``+ M r^2 + M d_k``               (atoms and keys)
    ``+ B d_k``                       (block priors w)
    ``+ r d_k``                       (Q_cur)
    ``+ r d_k [B >= 2]``              (Q_dep: the depth summary's map into the query)
    ``+ (r d_k + d_k^2) [B >= 3]``    (Q_dep,k, Q_dep,q: the depth attention)
    ``+ d_e d_k [lambda_ctx > 0]``    (Q_ctx: the instruction's query channel)
    ``+ d_e d_k [tau_lang > 0]``      (R_ctx: the instruction prior)
    """
    c = config
    per_projection = sum(c.r * (d_in + d_out) + 1 for d_in, d_out in shapes)
    memory = c.num_atoms * (c.r * c.r + c.d_k) + c.num_blocks * c.d_k
    channels = (c.lambda_ctx > 0) + (c.tau_lang > 0)
    depth = c.r * c.d_k * (c.num_blocks >= 2) + (c.r * c.d_k + c.d_k * c.d_k) * (c.num_blocks >= 3)
    maps = c.r * c.d_k + depth + channels * c.instruction_dim * c.d_k
    return per_projection + memory + maps


class QueryableModel(AdapterModel):
    """A base model with Queryable LoRA on its linears; the base weights are frozen.

    ``forward`` and ``generate`` take two extra keywords:

    * ``instruction``: text (one string, or one per example, ``None`` for none),
      or embeddings (``d_e`` or ``batch x d_e``); ignored when
      ``tau_lang = lambda_ctx = 0``.
    * ``route_mask``: ``batch x tokens``, 1 where the route may look (for causal-LM
      training, the prompt tokens only). Defaults to ``attention_mask``.

    >>> model = QueryableModel(AutoModelForCausalLM.from_config(cfg), QueryableConfig(r=8))
    >>> out = model(input_ids=ids, attention_mask=mask, instruction="Solve the problem.")
    >>> model.routing_trace()[0]["alpha"].shape  # (batch, M)
    """

    method = "queryable"
    config_class = QueryableConfig
    inference_form_name = "routed"  # route per forward (constants made once: fold); decoding folds or merges

    def __init__(self, base_model: nn.Module, config: QueryableConfig):
        super().__init__(base_model, config)
        units = find_units(base_model, config)
        blocks = split_blocks(len(units), config.num_blocks)
        first = base_model.get_submodule(units[0][0]).weight
        block_of = {u: b for b, members in enumerate(blocks) for u in members}
        c = config
        block_sizes = [sum(len(units[u]) for u in members) for members in blocks]
        block_starts = list(itertools.accumulate(block_sizes, initial=0))  # each block's first gate index
        with seeded(config.seed):
            self.router = AtomRouter(config, block_sizes).to(device=first.device, dtype=first.dtype)
            self.state = RoutingState(blocks=blocks)
            index = 0
            for unit, names in enumerate(units):
                layers = [
                    self.replace(name, lambda base: QueryableLinear(base, c.r, c.scaling, c.dropout))
                    for name in names
                ]
                for layer in layers:
                    layer.unit, layer.block, layer.index = unit, block_of[unit], index
                    layer.slot = index - block_starts[layer.block]
                    layer._shared = (self.router, self.state)
                    index += 1
                state_layers = [
                    layer for name, layer in zip(names, layers, strict=True)
                    if name.rsplit(".", 1)[-1] in config.state_modules
                ] or layers[:1]
                entry = blocks[block_of[unit]][0] == unit
                for slot, layer in enumerate(state_layers):
                    layer.state_slot = slot
                state_layers[0].state_layers = tuple(state_layers)
                # States feed routes of later blocks: the last block needs only its entry's.
                state_layers[0].records_state = entry or block_of[unit] < len(blocks) - 1
                state_layers[0].is_entry = entry
        self._call = _Call()
        #: Merge the update into the weights while decoding one prompt (False: fold per example).
        self.merge_decode = True
        self._merge: WeightMerge | None = None  # made at the first merge, freed by train()
        self._encoder: InstructionEncoder | None = None
        base_model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)

    # ---- the per-forward context --------------------------------------------------------

    @property
    def instruction_encoder(self) -> InstructionEncoder:
        if self._encoder is None:
            self._encoder = InstructionEncoder(self.config.instruction_encoder)
        return self._encoder

    def embed_instruction(self, instruction: Instruction) -> Tensor | None:
        """``e(c)`` as ``rows x d_e`` on the adapter's device (rows: 1 or one per example)."""
        c = self.config
        if instruction is None or (c.tau_lang == 0 and c.lambda_ctx == 0):
            return None  # Prop. D.7(a): the instruction cannot change the route
        if isinstance(instruction, str):
            instruction = [instruction]
        if not isinstance(instruction, Tensor):
            instruction = self.instruction_encoder(list(instruction))
        if instruction.dim() == 1:
            instruction = instruction.unsqueeze(0)
        if instruction.shape[-1] != c.instruction_dim:
            raise ValueError(
                f"instruction: embedding width {instruction.shape[-1]} != instruction_dim "
                f"{c.instruction_dim}; set instruction_dim to the encoder's width"
            )
        ref = self.router.atom_keys
        return instruction.to(device=ref.device, dtype=ref.dtype)

    def _begin_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state, call = self.state, self._call
        if call.generating and call.prefilled:  # a decode step: the fast path first
            if not state.hold:
                self._hold_routes(merge=call.mergeable)
            return
        cache = kwargs.get("past_key_values")
        cached = cache is not None and (
            cache.get_seq_length() > 0 if hasattr(cache, "get_seq_length") else True
        )
        if cached and state.routes:
            if not state.hold:
                self._hold_routes(merge=False)
            return
        batch = self._batch_size(args, kwargs)
        mask = call.route_mask
        if mask is None:
            mask = kwargs.get("attention_mask")
            if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
                raise ValueError(
                    "route_mask: the attention_mask is not 2-D (batch x tokens); pass route_mask"
                )
        instruction = _rows_for(call.instruction, batch, "instruction")
        state.begin(token_weights_from_mask(_rows_for(mask, batch, "route_mask")), instruction, self.router)
        call.prefilled = call.generating

    @torch.compiler.disable
    def _hold_routes(self, merge: bool) -> None:
        """Hold the prompt's routes for the decode steps that follow, and merge them into the
        weights (``merge``: one prompt) or fold them into each projection's factor, once, at
        the first step. Run eagerly even in a compiled step (transformers compiles the decode
        step with a static cache): the steps after it read fixed tensors only, so one graph
        serves every ``generate`` call. Counted in the first step's time, the time it serves."""
        self.state.hold = True
        if merge:
            self._merge_updates()
        elif self.state.fold:
            for layer in self.adapted_layers():
                layer.fold_route(self.state.routes[layer.block])

    @staticmethod
    def _batch_size(args: tuple, kwargs: dict) -> int | None:
        for x in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
            if isinstance(x, Tensor):
                return x.shape[0]
        return None

    @contextlib.contextmanager
    def _context(self, instruction: Instruction, route_mask: Tensor | None, generating: bool,
                 prompts: int | None = None):
        call = self._call
        call.instruction = self.embed_instruction(instruction)
        call.route_mask = route_mask
        call.generating, call.prefilled = generating, False
        call.mergeable = generating and prompts == 1 and self.merge_decode and not self.training
        try:
            yield
        finally:
            self._restore_updates()
            call.instruction = call.route_mask = None
            call.generating = call.prefilled = call.mergeable = False
            if generating:
                self.state.hold = False

    def _merge_updates(self) -> None:
        """Merge the held route (row 0: every row decodes the same prompt) into the weights
        and swap the merged linears in, once per ``generate`` call and inside its time."""
        if self._merge is None or not self._merge.fits():
            self._merge = WeightMerge(self.base_model, list(zip(self.adapted, self.adapted_layers(), strict=True)))
        routes = self.state.routes
        mixers = torch.cat([routes[b].mixer_stack[:, 0] for b in range(len(self.state.blocks))])
        self._merge.merge(mixers, keep_factors=self.state.fixed_constants is not None)  # the inference form

    def _restore_updates(self) -> None:
        if self._merge is not None:
            self._merge.restore()

    def train(self, mode: bool = True) -> QueryableModel:
        """As ``nn.Module.train``; entering training also frees the merged weights' buffers
        (a copy of the adapted weights, kept for decoding: ``merge.py``)."""
        if mode:
            self._restore_updates()
            self._merge = None
        return super().train(mode)

    def forward(self, *args, instruction: Instruction = None, route_mask: Tensor | None = None, **kwargs):
        with self._context(instruction, route_mask, generating=False):
            return self.base_model(*args, **kwargs)

    def generate(self, *args, instruction: Instruction = None, route_mask: Tensor | None = None, **kwargs):
        """``base_model.generate`` with the route computed at prefill and held for every step.

        Beam search and ``num_return_sequences`` repeat batch rows; the
        instruction and route mask are repeated the same way. One prompt decodes with
        the update merged into the weights (``merge_decode``; see the module docstring).
        The route mask defaults to the ``attention_mask`` given here: with a static cache
        (``cache_implementation="static"``) the prompt's forward receives transformers' own
        mask, not this 2-D one.
        """
        if route_mask is None and isinstance(kwargs.get("attention_mask"), Tensor):
            route_mask = kwargs["attention_mask"]
        with self._context(instruction, route_mask, generating=True,
                           prompts=self._batch_size(args, kwargs)):
            return self.base_model.generate(*args, **kwargs)

    def fold(self) -> None:
        """The inference form's one-time work (``inference_form`` calls it): the constants every
        route reads (normed keys, atoms, gates, the maps' weights; ``RouteConstants``) and each
        projection's operands (``Operands``, with its gate ``g`` as a number) are made once
        instead of per forward. A fixed ``g`` lets each projection apply ``I + g S_b`` as one
        ``baddbmm`` on ``S_b`` itself, so no route makes mixers. Outputs are those of the
        training form up to rounding (``s + g s S_b^T`` instead of ``s (I + g S_b)^T``);
        ``unfold()`` before training again (none of this follows optimizer steps). Decoding one
        prompt in this form keeps the stacked ``A`` and ``B`` between merges (``WeightMerge``),
        made afresh by each ``fold``."""
        self._forget_merge_factors()
        with torch.no_grad():
            self.state.fixed_constants = self.router.constants()
            gates = self.state.fixed_constants.gates.view(-1).tolist()
            for layer in self.adapted_layers():
                layer.fixed = layer.operands(gates[layer.index])

    def unfold(self) -> None:
        self.state.fixed_constants = None
        for layer in self.adapted_layers():
            layer.fixed = None
        self._forget_merge_factors()

    def _forget_merge_factors(self) -> None:
        if self._merge is not None:
            self._merge.forget_factors()

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Non-reentrant checkpointing, so recomputed layers read the forward's routes."""
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        if kwargs["gradient_checkpointing_kwargs"].get("use_reentrant", True):
            raise ValueError("gradient_checkpointing_kwargs: use_reentrant must be False")
        self.base_model.gradient_checkpointing_enable(**kwargs)

    # ---- observability ---------------------------------------------------------------

    def routing_trace(self) -> list[dict[str, Tensor | int | None]]:
        """Per block, from the last forward: ``alpha`` (batch x M), ``active`` (batch x k),
        ``beta`` (batch x earlier blocks, None for the first) and ``operator_norm``
        (the spectral norm ``||S_b||``, per example)."""
        trace = []
        for block, route in sorted(self.state.routes.items()):
            S = route.operator.detach().float()
            trace.append({
                "block": block,
                "alpha": route.alpha.detach().cpu(),
                "active": route.active.detach().cpu(),
                "beta": None if route.beta is None else route.beta.detach().cpu(),
                "operator_norm": torch.linalg.matrix_norm(S, ord=2).cpu(),
            })
        return trace

    # ---- parameters, save and load ------------------------------------------------------

    def num_trainable_parameters(self) -> int:
        """Equals ``parameter_count(config, adapted_shapes())``."""
        return super().num_trainable_parameters()

    def adapted_shapes(self) -> list[tuple[int, int]]:
        return [(m.base_layer.in_features, m.base_layer.out_features) for m in self.adapted_layers()]


@dataclass
class _Call:
    """What the running ``forward`` or ``generate`` call passes to the pre-hook: a plain object,
    because setting attributes on the model goes through ``nn.Module.__setattr__``, several us
    each, and a call set ten of them."""

    instruction: Tensor | None = None  # e(c), as embed_instruction gives it
    route_mask: Tensor | None = None
    generating: bool = False
    prefilled: bool = False  # generating, and the prompt's forward has run
    mergeable: bool = False  # generating one prompt in eval mode: decode merged


def _rows_for(x: Tensor | None, batch: int | None, name: str) -> Tensor | None:
    """Match ``x``'s rows to the forward's batch: broadcast one row, or repeat each row
    as ``generate`` does for beams and ``num_return_sequences``."""
    if x is None or batch is None or x.shape[0] == batch:
        return x
    if batch % x.shape[0] == 0:
        return x.repeat_interleave(batch // x.shape[0], dim=0)
    raise ValueError(f"{name}: {x.shape[0]} rows for a batch of {batch}; give one row or one per example")
