"""The routed layer compiles as one graph: no host sync, no data-dependent shapes, no breaks."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from tests.test_queryable_model import adapted, tokens


@pytest.mark.parametrize("kind", ["qwen2", "mlp"])
def test_adapter_forward_has_no_graph_break(kind):
    model = adapted(kind, tau_lang=1.0, lambda_ctx=1.0)
    x = torch.randn(4, 2) if kind == "mlp" else tokens()
    dynamo.reset()
    report = dynamo.explain(model)(x, instruction=torch.randn(x.shape[0], 384))
    assert report.graph_break_count == 0, [b.reason for b in report.break_reasons]
    assert report.graph_count == 1


def test_compiled_forward_equals_eager_and_records_the_trace():
    model = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0)
    x, e = tokens(), torch.randn(3, 384)
    with torch.no_grad():
        eager = model(x, instruction=e).logits
        alpha = model.routing_trace()[1]["alpha"]
        dynamo.reset()
        compiled = torch.compile(model, backend="eager", fullgraph=True)(x, instruction=e).logits
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(model.routing_trace()[1]["alpha"], alpha)


@pytest.mark.slow
def test_compiled_training_step_gives_eager_gradients():
    model = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0).train()
    x, e = tokens(), torch.randn(3, 384)
    model(x, instruction=e, labels=x).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    dynamo.reset()
    torch.compile(model, backend="aot_eager", fullgraph=True)(x, instruction=e, labels=x).loss.backward()
    for name, grad in eager.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-4)


def test_repeated_compiled_calls_do_not_recompile():
    """Nothing in the per-forward routing state is a Python int dynamo would specialise on."""
    model = adapted("qwen2", tau_lang=1.0, lambda_ctx=1.0)
    dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        compiled(tokens(seed=1), instruction=torch.randn(3, 384))
        with dynamo.config.patch(error_on_recompile=True):
            for seed in (2, 3):
                compiled(tokens(seed=seed), instruction=torch.randn(3, 384))
