"""Continual routing: forgetting, route drift and atom usage of one adapter trained on a stream."""

from __future__ import annotations

import pytest
import torch

from qlsearch.continual import atom_usage, forgetting, route_drift, run_continual

TINY = {"train_n": 16, "val_n": 8, "test_n": 8}
QUERYABLE = {"r": 2, "num_atoms": 4, "top_k": 2, "num_blocks": 2, "d_k": 8, "tau_lang": 1.0, "lambda_ctx": 1.0}


def test_forgetting_is_the_final_minus_the_own_stage_value():
    val = [[1.0, 5.0, 6.0],
           [1.5, 0.5, 6.0],
           [2.0, 0.25, 0.1]]
    assert forgetting(val) == pytest.approx([1.0, -0.25, 0.0])


def _route(alpha: list[list[float]], k: int = 2) -> dict:
    alpha = torch.tensor(alpha)
    return {"alpha": alpha, "active": alpha.topk(k, -1).indices}


def test_route_drift_of_identical_routes_is_zero_and_of_disjoint_ones_is_one():
    same = [_route([[0.7, 0.3, 0, 0], [0, 0.5, 0.5, 0]])]
    assert route_drift(same, same) == {"topk_changed": 0.0, "weight_change": 0.0}
    other = [_route([[0, 0, 0.6, 0.4], [0.5, 0, 0, 0.5]])]
    assert route_drift(same, other) == {"topk_changed": 1.0, "weight_change": 1.0}
    # one of two examples keeps its atoms (order aside) but moves 0.2 of its weight: TV 0.2
    half = [_route([[0.5, 0.5, 0, 0], [0.5, 0, 0, 0.5]])]
    assert route_drift(same, half) == pytest.approx({"topk_changed": 0.5, "weight_change": (0.2 + 1.0) / 2})


def test_an_untouched_adapter_forgets_nothing_and_its_routes_do_not_drift(tmp_path):
    """Stages 2 and 3 at lr 0: AdamW leaves every weight as it is, so every earlier stage's
    validation MSE and routes after them equal their values right after stage 1."""
    result = run_continual("levy-rastrigin-ackley", "instr-queryable", QUERYABLE, seed=0, epochs=2,
                           pretrain_epochs=1, cache_dir=str(tmp_path), stage_lrs=[1e-2, 0.0, 0.0], sizes=TINY)
    assert result.stages == ["levy", "rastrigin", "ackley"]
    assert result.forgetting[0] == 0.0 and result.val_mse[0] == result.val_mse[1] == result.val_mse[2]
    for row in result.drift[1:]:
        assert all(d == {"topk_changed": 0.0, "weight_change": 0.0} for d in row)
    assert result.drift[0] is None
    for after in result.usage:  # blocks x M per evaluation set; each block's usage sums to 1
        for usage in after:
            assert len(usage) == 2 and all(len(b) == 4 and sum(b) == pytest.approx(1.0) for b in usage)


def test_trained_stages_move_routes_and_lora_has_none(tmp_path):
    routed = run_continual("levy-rastrigin-ackley", "instr-queryable", QUERYABLE, seed=0, epochs=2,
                           pretrain_epochs=1, cache_dir=str(tmp_path), lr=5e-2, sizes=TINY)
    assert any(d["weight_change"] > 0 for row in routed.drift[1:] for d in row)
    lora = run_continual("levy-rastrigin-ackley", "lora", {"r": 2}, seed=0, epochs=2, pretrain_epochs=1,
                         cache_dir=str(tmp_path), sizes=TINY)
    assert lora.usage is None and lora.drift is None and len(lora.forgetting) == 3
    assert lora.forgetting[-1] == 0.0


def test_atom_usage_is_the_mean_routing_weight():
    assert atom_usage([_route([[1.0, 0.0], [0.5, 0.5]], k=1)]) == [[0.75, 0.25]]
