"""Decoding one prompt with the update merged into the weights: the same tokens as the unmerged
(folded) path, the adapted modules out of the call path while decoding, and every weight and
module restored exactly afterwards, also when ``generate`` fails half-way."""

from __future__ import annotations

import pytest
import torch

from qlsearch.adapters._precision import inference_form
from qlsearch.adapters.queryable import QueryableLinear
from tests.test_queryable_model import adapted, tokens

CASES = [{}, {"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}]


def generate(model, x, **kw):
    with torch.no_grad():
        return model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                              min_new_tokens=8, do_sample=False, pad_token_id=0,
                              output_scores=True, return_dict_in_generate=True, **kw)


def snapshot(model) -> tuple[dict, list]:
    """Every tensor of the model (cloned) and the module objects in the adapted places."""
    tensors = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    return tensors, [id(m) for m in model.adapted_layers()]


def assert_restored(model, before) -> None:
    tensors, modules = before
    after = model.state_dict(keep_vars=True)
    assert after.keys() == tensors.keys()
    for name, t in tensors.items():
        # bit for bit: equal values and equal bytes (torch.equal treats -0.0 == 0.0)
        assert torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)), name
    assert [id(m) for m in model.adapted_layers()] == modules
    assert all(isinstance(m, QueryableLinear) for m in model.adapted_layers())


def calls_of_adapted_layers(model) -> list[int]:
    counts = [0]

    def count(module, args):
        counts[0] += 1

    handles = [m.register_forward_pre_hook(count) for m in model.adapted_layers()]
    return counts, handles


@pytest.mark.parametrize("kw", CASES)
def test_merged_decoding_gives_the_unmerged_tokens_and_restores_every_weight(kw):
    model = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0)
    x, e = tokens(batch=1, length=5), torch.randn(1, 384)
    before = snapshot(model)
    merged = generate(model, x, instruction=e, **kw)
    assert_restored(model, before)
    model.merge_decode = False
    unmerged = generate(model, x, instruction=e, **kw)
    assert torch.equal(merged.sequences, unmerged.sequences)
    for a, b in zip(merged.scores, unmerged.scores, strict=True):  # same logits up to rounding
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert not model.state.hold


def test_merged_decoding_takes_the_adapter_out_of_the_call_path():
    model = adapted("qwen2")
    x = tokens(batch=1, length=5)
    counts, handles = calls_of_adapted_layers(model)
    generate(model, x)
    assert counts[0] == len(model.adapted)  # the prefill only: decode steps ran merged linears
    model.merge_decode = False
    counts[0] = 0
    generate(model, x)
    assert counts[0] == 8 * len(model.adapted)  # prefill + 7 decode steps through the adapter
    for h in handles:
        h.remove()


def stand_ins_while_decoding(model, x) -> list[torch.nn.Module]:
    """The modules in the adapted places at the first decode step of one ``generate`` (their
    weights are the merged tensors themselves: a later merge may write them)."""
    seen: list[torch.nn.Module] = []

    def look(module, args, kwargs):
        places = [model.base_model.get_submodule(n) for n in model.adapted]
        if not seen and not isinstance(places[0], QueryableLinear):
            seen.extend(places)

    handle = model.base_model.register_forward_pre_hook(look, with_kwargs=True)
    try:
        generate(model, x)
    finally:
        handle.remove()
    return seen


def merged_weights_while_decoding(model, x) -> list[torch.Tensor]:
    return [m.weight for m in stand_ins_while_decoding(model, x)]


def test_what_decodes_in_an_adapted_place_is_the_frozen_models_own_linear():
    """Merged decoding is compared with the frozen model, so a step must cost what the frozen
    model's does: the stand-in runs ``nn.Linear``'s own forward and reads registered
    parameters as it does (a leaner module would be an edge of the implementation)."""
    model = adapted("qwen2")
    seen = stand_ins_while_decoding(model, tokens(batch=1, length=5))
    assert len(seen) == len(model.adapted)
    for place, layer in zip(seen, model.adapted_layers(), strict=True):
        assert isinstance(place, torch.nn.Linear) and type(place).forward is torch.nn.Linear.forward
        registered = {"weight"} | ({"bias"} if layer.base_layer.bias is not None else set())
        assert {n for n, _ in place.named_parameters()} == registered
        assert place.bias is layer.base_layer.bias and not place.weight.requires_grad


def test_several_prompts_are_not_merged():
    model = adapted("qwen2")
    counts, _ = calls_of_adapted_layers(model)
    generate(model, tokens(batch=2, length=5))
    assert counts[0] == 8 * len(model.adapted)  # each example has its own route: folded, not merged


class Boom(RuntimeError):
    pass


def test_a_failing_generate_still_restores_the_adapter():
    model = adapted("qwen2")
    x = tokens(batch=1, length=5)
    before = snapshot(model)
    steps = []

    def fail_on_third_step(input_ids, scores, **kwargs):
        steps.append(input_ids.shape[1])
        if len(steps) == 3:
            # the merged linears are in place now
            assert not any(isinstance(m, QueryableLinear) for m in model.adapted_layers())
            raise Boom("stopped")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    from transformers import StoppingCriteriaList

    with pytest.raises(Boom):
        generate(model, x, stopping_criteria=StoppingCriteriaList([fail_on_third_step]))
    assert_restored(model, before)
    assert not model.state.hold


def test_merged_decoding_in_bfloat16_gives_the_unmerged_tokens():
    model = adapted("qwen2").to(torch.bfloat16)
    x = tokens(batch=1, length=5)
    merged = generate(model, x).sequences
    model.merge_decode = False
    assert torch.equal(merged, generate(model, x).sequences)


def test_merged_weights_live_in_buffers_kept_between_calls_until_training():
    """Each call merges into the same memory (no allocation per call; fixed addresses for a
    compiled step), whatever the route; entering training frees it."""
    import gc
    import weakref

    model = adapted("qwen2")
    first = merged_weights_while_decoding(model, tokens(batch=1, length=5, seed=1))
    values = [w.clone() for w in first]
    second = merged_weights_while_decoding(model, tokens(batch=1, length=5, seed=2))
    assert len(first) == len(model.adapted)
    assert [w.data_ptr() for w in first] == [w.data_ptr() for w in second]
    assert not all(torch.equal(a, b) for a, b in zip(values, second, strict=True))  # another route
    merged = [weakref.ref(w) for w in second]  # the buffer's only holders besides the merge's own
    del first, second
    model.train()
    gc.collect()
    assert all(w() is None for w in merged)


@pytest.mark.parametrize("modes", [("inference", "no_grad"), ("no_grad", "inference")])
def test_merged_decoding_works_under_either_grad_mode_whichever_came_first(modes):
    """The buffers made by the first merge are written by every later one, whatever mode it runs in
    (tensors made under ``inference_mode`` cannot be written outside it)."""
    model = adapted("qwen2")
    x = tokens(batch=1, length=5)
    contexts = {"inference": torch.inference_mode, "no_grad": torch.no_grad}
    kw = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    outs = []
    for mode in modes:
        with contexts[mode]():
            outs.append(model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw))
    assert torch.equal(*outs)


def test_the_inference_form_keeps_the_stacked_factors_and_a_new_one_reads_the_weights_anew():
    """Inside the inference form (weights fixed) every merge reuses the stacked ``A`` and ``B``;
    leaving it drops them, so weights changed before the next fold are the ones merged."""
    model = adapted("qwen2")
    x = tokens(batch=1, length=5)
    with inference_form(model):
        generate(model, x)
        kept = [g.factors for g in model._merge.groups]
        generate(model, x, num_beams=2)
        for g, (A, B) in zip(model._merge.groups, kept, strict=True):  # the very same tensors
            assert g.factors[0] is A and g.factors[1] is B
    assert all(g.factors is None for g in model._merge.groups)
    with torch.no_grad():  # an edit in eval mode, between two inference forms
        for layer in model.adapted_layers():
            layer.lora_B.mul_(-3.0)
    with inference_form(model):
        merged = generate(model, x)
        model.merge_decode = False
        unmerged = generate(model, x)
    for a, b in zip(merged.scores, unmerged.scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_merged_decoding_follows_the_model_to_another_dtype():
    model = adapted("qwen2")
    x = tokens(batch=1, length=5)
    generate(model, x)  # buffers made for float32
    model.to(torch.bfloat16)
    merged = generate(model, x).sequences
    assert all(w.dtype == torch.bfloat16 for w in merged_weights_while_decoding(model, x))
    model.merge_decode = False
    assert torch.equal(merged, generate(model, x).sequences)


def compiled_static() -> dict:
    """transformers' static cache with its compiled decode step; on a CPU transformers compiles
    only when told to. Backend ``eager``: dynamo's tracing (what the adapter can break), fast."""
    from transformers import CompileConfig

    config = CompileConfig(backend="eager")
    config._compile_all_devices = True
    return {"cache_implementation": "static", "compile_config": config}


@pytest.mark.parametrize("batch", [1, 2])
def test_static_cache_compiled_decoding_gives_the_eager_tokens_and_compiles_once(batch):
    """One prompt decodes merged, two folded; either way the compiled steps read fixed tensors
    only (the merge or fold runs eagerly at the first step), so later calls compile nothing.
    The prompts are left-padded: the route mask must be generate's 2-D ``attention_mask``,
    though the static cache's prompt forward receives transformers' own mask."""
    import torch._dynamo as dynamo

    model = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0)
    e = torch.randn(batch, 384)
    before = snapshot(model)

    def both(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = tokens(batch=batch, length=6, seed=seed)
        mask = torch.ones_like(x)
        mask[-1, :2] = 0  # the last prompt is 4 tokens, left-padded
        kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            eager = model.generate(input_ids=x, attention_mask=mask, instruction=e, **kw)
            static = model.generate(input_ids=x, attention_mask=mask, instruction=e, **kw, **compiled_static())
        return eager, static

    dynamo.reset()
    eager, static = both(seed=1)
    assert torch.equal(static, eager)
    assert_restored(model, before)
    with dynamo.config.patch(error_on_recompile=True):
        for seed in (2, 3):
            eager, static = both(seed)
            assert torch.equal(static, eager)
    assert_restored(model, before)
    assert not model.state.hold
