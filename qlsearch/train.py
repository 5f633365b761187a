"""One adapter's post-training: AdamW on the trainable parameters, with what the paper records.

Per epoch it records the train, validation and test loss, the gradient norm
of each layer's adapter parameters (paper Fig. 3) and the gradient
concentration index, max/mean of those norms (Fig. 4). A non-finite loss
raises ``TrialDiverged`` so the caller can end the trial as failed with that
reason.

**Selection.** The epoch is chosen on validation only: the evaluated epoch
with the lowest validation loss (the first of equals). Its trainable weights
are kept and restored when training ends, so whatever is measured afterwards
(test accuracy, routing, profile) is the selected model. With ``patience``,
training stops once that many evaluations in a row have not improved the
validation loss (early stopping). The test loss is recorded every evaluation
for the learning curves and for the paper's ``best_test_*`` protocol, but it
never chooses anything here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qlsearch.adapters import auxiliary_loss
from qlsearch.adapters._wrapper import layer_list

SPLITS = ("train", "val", "test")


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class History:
    """What training recorded, epoch by epoch (lists are aligned with ``epochs``)."""

    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    layer_grad_norms: list[list[float]] = field(default_factory=list)  # epoch x layer
    concentration: list[float] = field(default_factory=list)  # max/mean of layer_grad_norms
    selected_epoch: int | None = None  # lowest validation loss; its weights are the trained model's
    stopped_early: bool = False

    @property
    def selected(self) -> int:
        """Index of the selected epoch in the lists."""
        return self.epochs.index(self.selected_epoch)

    def summary(self) -> dict[str, float]:
        """Losses at the selected epoch (``train_loss``, ``val_loss``, ``test_loss``) and,
        over all epochs, the paper's best and final train/test losses."""
        i = self.selected
        return {
            "train_loss": self.train_loss[i],
            "val_loss": self.val_loss[i],
            "test_loss": self.test_loss[i],
            "selected_epoch": self.selected_epoch,
            "best_train_loss": min(self.train_loss),
            "best_test_loss": min(self.test_loss),
            "final_train_loss": self.train_loss[-1],
            "final_test_loss": self.test_loss[-1],
        }


def adapter_layer_groups(model: nn.Module) -> dict[int, list[nn.Parameter]]:
    """Trainable parameters grouped by transformer layer / MLP block index.

    Parameters outside the layer list (e.g. the queryable router, shared by all
    layers) belong to no layer and are left out.
    """
    layers = layer_list(model)
    if layers is None:
        return {}
    pattern = re.compile(rf"(?:^|\.){re.escape(layers[0])}\.(\d+)\.")
    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        match = pattern.search(name)
        if p.requires_grad and match:
            groups.setdefault(int(match.group(1)), []).append(p)
    return dict(sorted(groups.items()))


def _group_norms(groups: dict[int, list[nn.Parameter]]) -> Tensor:
    """Per-layer gradient norms as one tensor (no host sync inside the training loop)."""
    norms = []
    for params in groups.values():
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        norms.append(torch.stack(grads).norm() if grads else params[0].new_zeros((), dtype=torch.float32))
    return torch.stack(norms) if norms else torch.zeros(0)


def concentration_index(norms: list[float]) -> float:
    """Gradient concentration index: max / mean of the per-layer gradient norms (paper Fig. 4)."""
    mean = sum(norms) / len(norms) if norms else 0.0
    return max(norms) / mean if mean > 0 else float("nan")


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _trainable_state(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def fit(
    model: nn.Module,
    loss_on: Callable[[nn.Module, Tensor], Tensor],
    num_train: int,
    evaluate: Callable[[nn.Module], dict[str, float]],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    eval_every: int = 1,
    weight_decay: float = 0.0,
    patience: int | None = None,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> History:
    """Train ``model``'s trainable parameters with AdamW; leave it at the selected epoch.

    ``loss_on(model, index)`` returns the task loss on the training examples at
    ``index``; the adapters' auxiliary losses are added to it. ``evaluate(model)``
    returns ``{"train": ..., "val": ..., "test": ...}`` losses on the full splits,
    run every ``eval_every`` epochs and at the last one. ``progress(epoch, losses)``
    is called after each evaluation.
    """
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    groups = adapter_layer_groups(model)
    generator = torch.Generator().manual_seed(seed)
    history = History()
    best_state, best_val, since_best = None, math.inf, 0
    for epoch in range(1, epochs + 1):
        model.train()
        norms_sum = torch.zeros(len(groups), device=params[0].device)
        steps = 0
        for index in batches(num_train, batch_size, generator):
            loss = loss_on(model, index) + auxiliary_loss(model)
            if not torch.isfinite(loss):
                raise TrialDiverged(f"non-finite training loss ({loss.item()}) at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms_sum = norms_sum + _group_norms(groups).to(norms_sum.device)
            optimizer.step()
            steps += 1
        if epoch % eval_every and epoch != epochs:
            continue
        model.eval()
        with torch.no_grad():
            losses = evaluate(model)
        if not all(math.isfinite(losses[s]) for s in SPLITS):
            raise TrialDiverged(f"non-finite evaluation loss at epoch {epoch}")
        norms = (norms_sum / max(steps, 1)).tolist()
        history.epochs.append(epoch)
        for split in SPLITS:
            getattr(history, f"{split}_loss").append(losses[split])
        history.layer_grad_norms.append(norms)
        history.concentration.append(concentration_index(norms))
        if progress is not None:
            progress(epoch, losses)
        if losses["val"] < best_val:
            best_val, since_best, history.selected_epoch = losses["val"], 0, epoch
            best_state = _trainable_state(named)
        else:
            since_best += 1
            if patience and since_best >= patience and epoch != epochs:
                history.stopped_early = True
                break
    with torch.no_grad():  # the selected epoch's weights are the trained model
        for name, value in best_state.items():
            named[name].copy_(value)
    return history


def regression_fit(model: nn.Module, splits: dict[str, tuple[Tensor, Tensor]], **kwargs) -> History:
    """``fit`` for ``{"train", "val", "test"}`` (x, y) tensors with the MSE loss (the synthetic suite)."""
    x_train, y_train = splits["train"]
    mse = nn.functional.mse_loss

    def loss_on(m: nn.Module, index: Tensor) -> Tensor:
        return mse(m(x_train[index]), y_train[index])

    def evaluate(m: nn.Module) -> dict[str, float]:
        return {split: mse(m(x), y).item() for split, (x, y) in splits.items()}

    return fit(model, loss_on, len(x_train), evaluate, **kwargs)

