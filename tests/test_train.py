"""Training selects its epoch on validation only, and leaves the model at that epoch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlsearch.train import fit


def scripted_fit(val_losses: list[float], test_losses: list[float], **kwargs):
    """A one-weight model trained for ``len(val_losses)`` epochs; evaluation reads the given
    validation/test losses and notes the weight at each epoch, so the selection can be checked."""
    model = nn.Linear(1, 1, bias=False)
    x, y = torch.ones(4, 1), torch.full((4, 1), 10.0)  # a steady pull: the weight changes every epoch
    weights = []

    def evaluate(m):
        epoch = len(weights)
        weights.append(m.weight.item())
        return {"train": 1.0, "val": val_losses[epoch], "test": test_losses[epoch]}

    history = fit(model, lambda m, i: nn.functional.mse_loss(m(x[i]), y[i]), 4, evaluate,
                  epochs=len(val_losses), lr=0.1, batch_size=4, seed=0, **kwargs)
    return model, history, weights


def test_the_lowest_validation_loss_selects_the_epoch_and_its_weights_are_restored():
    # test is lowest at epoch 4: it must not choose; validation is lowest at epoch 2
    model, history, weights = scripted_fit([3.0, 1.0, 2.0, 1.5, 1.2], [3.0, 2.0, 2.5, 0.1, 2.0])
    assert history.selected_epoch == 2 and not history.stopped_early
    assert history.epochs == [1, 2, 3, 4, 5]
    assert model.weight.item() == weights[1] != weights[-1]
    summary = history.summary()
    assert (summary["val_loss"], summary["test_loss"]) == (1.0, 2.0)
    assert summary["best_test_loss"] == 0.1 and summary["final_test_loss"] == 2.0  # the paper's numbers


def test_ties_keep_the_first_epoch():
    _, history, _ = scripted_fit([2.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert history.selected_epoch == 2


@pytest.mark.parametrize(("patience", "last"), [(2, 4), (3, 5), (None, 6)])
def test_early_stopping_waits_patience_evaluations_without_improvement(patience, last):
    model, history, weights = scripted_fit([3.0, 1.0, 2.0, 2.0, 2.0, 2.0], [0.0] * 6, patience=patience)
    assert history.epochs[-1] == last and history.stopped_early == (last < 6)
    assert history.selected_epoch == 2 and model.weight.item() == weights[1]
