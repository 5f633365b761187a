"""One adapter's post-training: AdamW on the trainable parameters, with what the paper records.

Per epoch it records the train/test loss, the gradient norm of each layer's
adapter parameters (paper Fig. 3) and the gradient concentration index,
max/mean of those norms (Fig. 4). A non-finite loss raises ``TrialDiverged``
so the caller can end the trial as failed with that reason.
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


class TrialDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class History:
    """What training recorded, epoch by epoch (lists are aligned with ``epochs``)."""

    epochs: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    layer_grad_norms: list[list[float]] = field(default_factory=list)  # epoch x layer
    concentration: list[float] = field(default_factory=list)  # max/mean of layer_grad_norms

    def summary(self, lower_is_better: bool = True) -> dict[str, float]:
        pick = min if lower_is_better else max
        return {
            "best_train_loss": pick(self.train_loss),
            "best_test_loss": pick(self.test_loss),
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


def fit(
    model: nn.Module,
    loss_on: Callable[[nn.Module, Tensor], Tensor],
    num_train: int,
    evaluate: Callable[[nn.Module], tuple[float, float]],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    eval_every: int = 1,
    weight_decay: float = 0.0,
    progress: Callable[[int, float, float], None] | None = None,
) -> History:
    """Train ``model``'s trainable parameters with AdamW.

    ``loss_on(model, index)`` returns the task loss on the training examples at
    ``index``; the adapters' auxiliary losses are added to it. ``evaluate(model)``
    returns ``(train_loss, test_loss)`` on the full splits, run every
    ``eval_every`` epochs and at the last one.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    groups = adapter_layer_groups(model)
    generator = torch.Generator().manual_seed(seed)
    history = History()
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
            train_loss, test_loss = evaluate(model)
        if not (math.isfinite(train_loss) and math.isfinite(test_loss)):
            raise TrialDiverged(f"non-finite evaluation loss at epoch {epoch}")
        norms = (norms_sum / max(steps, 1)).tolist()
        history.epochs.append(epoch)
        history.train_loss.append(train_loss)
        history.test_loss.append(test_loss)
        history.layer_grad_norms.append(norms)
        history.concentration.append(concentration_index(norms))
        if progress is not None:
            progress(epoch, train_loss, test_loss)
    return history


def regression_fit(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor],
                   **kwargs) -> History:
    """``fit`` for (x, y) tensors with the MSE loss (the synthetic suite)."""
    (x_train, y_train), (x_test, y_test) = train, test
    mse = nn.functional.mse_loss

    def loss_on(m: nn.Module, index: Tensor) -> Tensor:
        return mse(m(x_train[index]), y_train[index])

    def evaluate(m: nn.Module) -> tuple[float, float]:
        return mse(m(x_train), y_train).item(), mse(m(x_test), y_test).item()

    return fit(model, loss_on, len(x_train), evaluate, **kwargs)

