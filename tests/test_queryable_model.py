"""Attaching the adapter to real architectures: invariances, generation, checkpointing, save/load."""

from __future__ import annotations

import copy

import pytest
import torch

from qlsearch.adapters import attach
from qlsearch.adapters._precision import inference_form
from qlsearch.adapters.queryable import (
    QueryableConfig,
    QueryableLinear,
    QueryableModel,
    parameter_count,
)
from tests.conftest import BUILDERS, VOCAB, randomize_adapter, tiny_mlp, tiny_qwen2

KNOBS = {"r": 4, "num_atoms": 8, "top_k": 3, "num_blocks": 2, "d_k": 16, "seed": 0}


def adapted(kind: str, **knobs) -> QueryableModel:
    base = tiny_mlp() if kind == "mlp" else BUILDERS[kind]()
    extra = {"target_modules": ["0", "2", "4", "6", "8", "10"]} if kind == "mlp" else {}
    model = QueryableModel(base, QueryableConfig(**{**KNOBS, **extra, **knobs}))
    randomize_adapter(model)
    return model.eval()


def tokens(batch=3, length=8, seed=1):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def run(model, x, **kw):
    with torch.no_grad():
        out = model(x, **kw)
    return out if isinstance(out, torch.Tensor) else (
        out.logits if hasattr(out, "logits") else out.last_hidden_state)


@pytest.mark.parametrize("kind", ["qwen2", "bert", "mlp"])
def test_only_the_adapter_trains_and_its_count_is_the_formula(kind):
    base = tiny_mlp() if kind == "mlp" else BUILDERS[kind]()
    extra = {"target_modules": ["0", "2", "4", "6", "8", "10"]} if kind == "mlp" else {}
    model = attach(base, "queryable", **KNOBS, **extra)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n or n.startswith("router.")) for n in trainable)
    assert model.num_trainable_parameters() == parameter_count(model.config, model.adapted_shapes())
    layers_per_unit = 7 if kind == "qwen2" else 6 if kind == "bert" else 1
    assert len(model.adapted) == (4 if kind != "mlp" else 6) * layers_per_unit


def test_units_share_one_route_per_block_and_blocks_are_contiguous():
    model = adapted("qwen2", num_blocks=3)
    layers = [m for m in model.modules() if isinstance(m, QueryableLinear)]
    blocks = [layer.block for layer in layers]
    assert blocks == sorted(blocks) and set(blocks) == {0, 1, 2}
    assert model.state.blocks == [[0, 1], [2], [3]]
    entries = [layer for layer in layers if layer.is_entry]
    assert len(entries) == 3 and all(len(e.state_layers) == 3 for e in entries)  # q, k, v


def test_each_projection_reads_its_own_gate():
    """The gates are one vector in the router; entry ``index`` is projection ``index``'s, and a
    block's projections are one slice, read in forward order."""
    model = adapted("qwen2", num_blocks=3)
    layers = [m for m in model.modules() if isinstance(m, QueryableLinear)]
    router = model.router
    assert router.gate_logits.numel() == len(layers)
    assert [layer.index for layer in layers] == list(range(len(layers)))
    for layer in layers:
        assert sum(router.block_sizes[:layer.block]) + layer.slot == layer.index
    x = tokens()
    before = run(model, x)
    with torch.no_grad():  # closing one projection's gate changes the output through it alone
        router.gate_logits[layers[9].index] = -torch.inf
    assert layers[9].gate == 0 and all(layer.gate > 0 for layer in layers if layer is not layers[9])
    assert not torch.equal(run(model, x), before)


@pytest.mark.parametrize(("kind", "targets"), [("qwen2", None), ("qwen2", ["o_proj", "up_proj"]), ("mlp", None)])
def test_the_inference_form_computes_the_training_forms_outputs(kind, targets):
    """The inference form applies each gate as a fixed number to ``S_b`` itself and reads its
    operands once (``QueryableModel.fold``): the same outputs up to float32 rounding, on sequences
    and on the rows of a plain MLP, with gates that differ per projection; unfolded after. With
    ``o_proj`` and ``up_proj`` adapted, each unit's state is its one state projection's (no Q, K, V)."""
    model = adapted(kind, num_blocks=3, **({} if targets is None else {"target_modules": targets}))
    with torch.no_grad():
        model.router.gate_logits.normal_(generator=torch.Generator().manual_seed(3))
    x = tokens() if kind == "qwen2" else torch.randn(5, 2)
    expected = run(model, x)
    with inference_form(model):
        assert all(layer.fixed is not None for layer in model.adapted_layers())
        got = run(model, x)
    torch.testing.assert_close(got, expected)
    assert all(layer.fixed is None for layer in model.adapted_layers())
    assert model.state.fixed_constants is None


def test_parameter_count_formula_matches_at_the_qwen_shape():
    cfg = QueryableConfig(r=8, num_atoms=16, top_k=4, num_blocks=4)
    shapes = [(896, 896), (896, 128), (896, 128), (896, 896), (896, 4864), (896, 4864), (4864, 896)] * 24
    lora = sum(8 * (a + b) for a, b in shapes)
    assert lora == 4_399_104  # the paper's Table 6 LoRA row
    extra = 168 + 16 * 64 + 16 * 64 + 4 * 64 + 3 * 8 * 64 + 64 * 64
    assert parameter_count(cfg, shapes) == lora + extra  # plain: no instruction maps
    instructed = QueryableConfig(r=8, num_atoms=16, top_k=4, num_blocks=4, tau_lang=1.0, lambda_ctx=1.0)
    assert parameter_count(instructed, shapes) == lora + extra + 2 * 384 * 64  # + Q_ctx, R_ctx


def test_plain_queryable_creates_no_instruction_parameters():
    plain = adapted("qwen2")
    assert not [n for n, _ in plain.named_parameters() if "_ctx" in n]
    only_query = adapted("qwen2", lambda_ctx=1.0)  # each channel brings only its own map
    assert {n.split(".")[-2] for n, _ in only_query.named_parameters() if "_ctx" in n} == {"query_ctx"}
    both = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0)
    assert both.num_trainable_parameters() - plain.num_trainable_parameters() == 2 * 384 * both.config.d_k


@pytest.mark.parametrize("kind", ["qwen2", "bert"])
def test_batch_invariance(kind):
    """An example's output does not depend on its batch-mates."""
    model = adapted(kind, tau_lang=1.0, lambda_ctx=1.0)
    x = tokens(batch=4)
    e = torch.randn(4, 384)
    together = run(model, x, instruction=e)
    for i in range(4):
        alone = run(model, x[i:i + 1], instruction=e[i:i + 1])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "bert"])
def test_right_padding_invariance(kind):
    model = adapted(kind)
    x = tokens(batch=1, length=6)
    padded = torch.cat([x, torch.zeros(1, 3, dtype=x.dtype)], 1)
    mask = torch.tensor([[1] * 6 + [0] * 3])
    plain = run(model, x, attention_mask=torch.ones_like(x))
    trace = model.routing_trace()
    out = run(model, padded, attention_mask=mask)
    torch.testing.assert_close(out[:, :6], plain, atol=1e-5, rtol=1e-5)
    for a, b in zip(trace, model.routing_trace(), strict=True):
        torch.testing.assert_close(a["alpha"], b["alpha"], atol=1e-6, rtol=1e-5)


def test_left_padding_invariance():
    model = adapted("qwen2")
    x = tokens(batch=1, length=6)
    padded = torch.cat([torch.zeros(1, 3, dtype=x.dtype), x], 1)
    mask = torch.tensor([[0] * 3 + [1] * 6])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = run(model, x)
    out = run(model, padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(out[:, 3:], plain, atol=1e-5, rtol=1e-5)


def test_route_mask_hides_answer_tokens_from_the_route():
    """Training a causal LM: the route sees the prompt only, so it matches the prompt-only route."""
    model = adapted("qwen2")
    prompt, answer = tokens(batch=2, length=5), tokens(batch=2, length=3, seed=7)
    run(model, prompt)
    prompt_route = model.routing_trace()
    full = torch.cat([prompt, answer], 1)
    route_mask = torch.cat([torch.ones_like(prompt), torch.zeros_like(answer)], 1)
    run(model, full, route_mask=route_mask)
    for a, b in zip(prompt_route, model.routing_trace(), strict=True):
        torch.testing.assert_close(a["alpha"], b["alpha"], atol=1e-6, rtol=1e-5)
    run(model, full)  # without the mask the answer tokens move the route
    assert any(not torch.allclose(a["alpha"], b["alpha"])
               for a, b in zip(prompt_route, model.routing_trace(), strict=True))


def _generate(model, x, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False,
                              pad_token_id=0, **kw)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_greedy_generation_with_cache_equals_without(kind):
    model = adapted(kind, tau_lang=1.0, lambda_ctx=1.0)
    x = tokens(batch=3, length=5)
    mask = torch.ones_like(x)
    mask[0, :2] = 0  # left padding
    e = torch.randn(3, 384)
    cached = _generate(model, x, mask, instruction=e, use_cache=True)
    uncached = _generate(model, x, mask, instruction=e, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not model.state.hold  # the held route is released after generate


@pytest.mark.parametrize("kw", [{}, {"num_beams": 3}, {"num_return_sequences": 2, "num_beams": 2}])
def test_folded_decoding_equals_unfolded(kw):
    model = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0)
    x = tokens(batch=2, length=5)
    mask = torch.ones_like(x)
    e = torch.randn(2, 384)
    folded = _generate(model, x, mask, instruction=e, **kw)
    model.state.fold = False
    unfolded = _generate(model, x, mask, instruction=e, **kw)
    assert torch.equal(folded, unfolded)


def test_decode_step_holds_the_prefill_route():
    model = adapted("qwen2")
    x = tokens(batch=2, length=5)
    with torch.no_grad():
        out = model(x, use_cache=True)
        trace = model.routing_trace()
        model(tokens(batch=2, length=1, seed=9), past_key_values=out.past_key_values)
    assert model.state.hold
    for a, b in zip(trace, model.routing_trace(), strict=True):
        assert torch.equal(a["alpha"], b["alpha"])


def test_save_load_gives_identical_outputs(tmp_path):
    base = tiny_qwen2()
    pristine = copy.deepcopy(base)  # the same frozen weights, not yet adapted
    model = QueryableModel(base, QueryableConfig(**KNOBS, tau_lang=1.0, lambda_ctx=0.5)).eval()
    randomize_adapter(model)
    x, e = tokens(), torch.randn(3, 384)
    expected = run(model, x, instruction=e)
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)  # a different initialisation, overwritten by the checkpoint
    loaded = QueryableModel.from_pretrained(pristine, tmp_path).eval()
    assert torch.equal(run(loaded, x, instruction=e), expected)
    assert loaded.config == model.config


def test_load_rejects_a_mismatched_checkpoint(tmp_path):
    adapted("qwen2").save_pretrained(tmp_path)
    other = QueryableModel(tiny_qwen2(), QueryableConfig(**{**KNOBS, "r": 2}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_adapter(tmp_path)
    other = QueryableModel(tiny_qwen2(), QueryableConfig(**{**KNOBS, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="does not fit"):
        other.load_adapter(tmp_path)


def test_gradient_checkpointing_sees_the_same_route():
    model = adapted("qwen2", num_blocks=3, dropout=0.1)
    twin = copy.deepcopy(model)
    twin.gradient_checkpointing_enable()
    x = tokens()
    grads = []
    for m in (model, twin):
        m.train()
        torch.manual_seed(5)
        m(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-4, msg=name)
    assert grads[0]["router.atoms"].abs().sum() > 0


def test_reentrant_checkpointing_is_refused():
    with pytest.raises(ValueError, match="use_reentrant"):
        adapted("qwen2").gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": True})


def test_routing_trace_reports_each_block():
    model = adapted("qwen2", num_blocks=4)
    run(model, tokens(batch=2))
    trace = model.routing_trace()
    assert [t["block"] for t in trace] == [0, 1, 2, 3]
    for t in trace:
        assert t["alpha"].shape == (2, 8) and t["active"].shape == (2, 3)
        torch.testing.assert_close(t["alpha"].sum(-1), torch.ones(2))
        assert t["operator_norm"].shape == (2,)
        assert (t["beta"] is None) == (t["block"] == 0)
    assert trace[3]["beta"].shape == (2, 3)


def test_follows_base_dtype():
    base = tiny_qwen2().to(torch.bfloat16)
    model = QueryableModel(base, QueryableConfig(**KNOBS))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = run(model, tokens(), instruction=None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_autocast_bfloat16_on_cpu():
    model = adapted("qwen2")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, tokens())
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    ("knobs", "field"),
    [({"top_k": 9}, "top_k"), ({"num_atoms": 0}, "num_atoms"), ({"T_attn": 0.0}, "T_attn"),
     ({"tau_lang": -1.0}, "tau_lang"), ({"dropout": 1.0}, "dropout"), ({"num_blocks": 9}, "num_blocks"),
     ({"target_modules": ["nope"]}, "target_modules")],
)
def test_bad_config_names_the_field(knobs, field):
    with pytest.raises(ValueError, match=f"^{field}: .*allowed|^{field}: .*matches no"):
        QueryableModel(tiny_qwen2(), QueryableConfig(**{**KNOBS, **knobs}))


def test_registry_lists_methods_and_suggests_names():
    from qlsearch.adapters import get_method, list_methods

    names = [m.name for m in list_methods()]
    assert {"lora", "dora", "queryable", "instr-queryable"} <= set(names)
    with pytest.raises(ValueError, match="Did you mean 'queryable'"):
        get_method("queryable-lora")


class _BackwardsLayers(torch.nn.Module):
    """Runs its layers last to first: each block's entry (its first layer in module order) runs late."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        for layer in reversed(self.layers):
            x = layer(x)
        return x


def test_a_projection_that_runs_before_its_blocks_entry_is_a_clear_error():
    model = QueryableModel(_BackwardsLayers(), QueryableConfig(r=2, num_blocks=1, d_k=4, seed=0))
    with pytest.raises(RuntimeError, match="block 0 has no route"):
        model(torch.randn(3, 4))  # the training form
    model.eval()
    with inference_form(model), pytest.raises(RuntimeError, match="block 0 has no route"):
        model(torch.randn(3, 4))
