"""Continual routing on synthetic shifts: one adapter trained on a stream of targets, never reset.

The paper's Appendix C trains instr-queryable on MBPP → GSM8K → GPQA-Diamond
without resetting the LoRA factors, router, gates, keys or atoms, and looks at
atom usage and route drift after each stage. This runs the same protocol on a
multi-task's members (``tasks/multitask.py``, e.g. Levy → Rastrigin → Ackley)
on the pre-trained synthetic backbone, for any method, so queryable can be set
beside LoRA trained the same way. After every stage it evaluates **every**
stage's validation split and records, for routed methods, each split's routes.

Decisions where the paper is silent:

* Each stage is one ``train.fit`` call: AdamW starts afresh (its moments do not
  carry over; the adapter's weights do), and the stage ends at its epoch of
  lowest validation MSE *on that stage* — what a user training on a stream can
  select on, since later stages are unseen.
* Route drift compares an input's routes at two moments, per block: the share
  of (example, block) pairs whose active top-k set changed, and the mean total
  variation ``½ Σ_m |α_m − α'_m|`` of its routing weights (0: same route, 1:
  disjoint). ``drift[i][j]``: stage ``j``'s inputs, after stage ``i-1`` →
  after stage ``i`` (the paper's stagewise drift matrix; row 0 is empty).
* Forgetting of stage ``j``: its validation MSE after the last stage minus its
  validation MSE right after its own stage (positive: forgotten).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

#: One route snapshot: per block, ``alpha`` (examples × M) and ``active`` (examples × k).
Routes = list[dict[str, Tensor]]


def forgetting(val_mse: list[list[float]]) -> list[float]:
    """``val_mse[i][j]``: stage ``j``'s validation MSE after stage ``i``. Per stage ``j``:
    ``val_mse[-1][j] - val_mse[j][j]`` (the last stage's own value is 0 by definition)."""
    last = val_mse[-1]
    return [last[j] - val_mse[j][j] for j in range(len(last))]


def atom_usage(routes: Routes) -> list[list[float]]:
    """Per block, the mean routing weight of each atom over the examples (each row sums to 1)."""
    return [block["alpha"].float().mean(0).tolist() for block in routes]


def route_drift(before: Routes, after: Routes) -> dict[str, float]:
    """How the same inputs' routes changed: ``topk_changed`` (share of example × block pairs
    whose active set differs) and ``weight_change`` (mean total variation of ``alpha``)."""
    changed, variation = [], []
    for a, b in zip(before, after, strict=True):
        sets_a, sets_b = a["active"].sort(-1).values, b["active"].sort(-1).values
        changed.append((sets_a != sets_b).any(-1).float())
        variation.append(0.5 * (a["alpha"].float() - b["alpha"].float()).abs().sum(-1))
    return {"topk_changed": torch.cat(changed).mean().item(), "weight_change": torch.cat(variation).mean().item()}


def _routes(model: nn.Module) -> Routes | None:
    """The last forward's routes, or None for a method that does not route."""
    trace = getattr(model, "routing_trace", None)
    if not callable(trace):
        return None
    return [{"alpha": block["alpha"].clone(), "active": block["active"].clone()} for block in trace()]


@dataclass
class ContinualResult:
    """What one continual run measured; lists are indexed [after stage i][on stage j]."""

    method: str
    knobs: dict
    stages: list[str]  # member names, in training order
    instructions: list[str]
    seed: int
    val_mse: list[list[float]]
    test_mse: list[list[float]]
    forgetting: list[float]
    usage: list[list[list[list[float]]]] | None  # [i][j] → blocks × M (routed methods only)
    drift: list[list[dict[str, float] | None]] | None  # [i][j]; row 0 None
    selected_epochs: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


def run_continual(multitask: str, method: str, knobs: dict, seed: int = 0, *, epochs: int = 30,
                  lr: float = 5e-3, batch_size: int = 64, backbone: str = "mlp", pretrain_epochs: int = 40,
                  pretrain_lr: float = 3e-3, cache_dir: str = "runs/cache", stage_lrs: list[float] | None = None,
                  sizes: dict | None = None) -> ContinualResult:
    """Train ``method`` on the members of ``multitask`` one after another (see the module docstring).

    ``stage_lrs`` overrides ``lr`` per stage (a stage at lr 0 leaves the adapter untouched);
    ``sizes`` goes to ``make_multitask_splits`` (``train_n``, ``val_n``, ``test_n``).
    The instruction-channel methods read each stage's own instruction.
    """
    from qlsearch.adapters import attach, get_method
    from qlsearch.backbones import SYNTHETIC_TARGETS, pretrained_backbone
    from qlsearch.tasks.multitask import get_multitask, make_multitask_splits
    from qlsearch.train import fit

    spec = get_multitask(multitask)
    splits = make_multitask_splits(multitask, seed, **(sizes or {}))
    stage_lrs = stage_lrs or [lr] * len(spec.members)
    if len(stage_lrs) != len(spec.members):
        raise ValueError(f"stage_lrs: got {len(stage_lrs)} values; allowed: one per stage ({len(spec.members)})")
    torch.manual_seed(seed)
    base = pretrained_backbone(spec.base, backbone, seed, cache_dir, epochs=pretrain_epochs, lr=pretrain_lr)
    full = {**knobs, "target_modules": SYNTHETIC_TARGETS[backbone]}
    if "seed" in get_method(method).knobs:
        full.setdefault("seed", seed)
    model = attach(base, method, precision="mixed", **full)
    instructions = splits.instructions

    def member(split: str, j: int) -> tuple[Tensor, Tensor, Tensor | None]:
        x, y, ids = getattr(splits, split)
        x, y = x[ids == j], y[ids == j]
        embedded = (model.embed_instruction([instructions[j]] * len(x))
                    if hasattr(model, "embed_instruction") else None)
        return x, y, embedded

    data = {(split, j): member(split, j) for split in ("train", "val", "test") for j in range(len(instructions))}

    def predict(m: nn.Module, split: str, j: int, index=slice(None)) -> Tensor:
        x, _, e = data[split, j]
        return m(x[index]) if e is None else m(x[index], instruction=e[index])

    def mse(m: nn.Module, split: str, j: int, index=slice(None)) -> Tensor:
        return nn.functional.mse_loss(predict(m, split, j, index), data[split, j][1][index])

    val_mse, test_mse, usage, drift, selected, snapshots = [], [], [], [], [], []
    for i, stage_lr in enumerate(stage_lrs):
        history = fit(model, lambda m, idx, i=i: mse(m, "train", i, idx), len(data["train", i][0]),
                      lambda m, i=i: {s: mse(m, s, i).item() for s in ("train", "val", "test")},
                      epochs=epochs, lr=stage_lr, batch_size=batch_size, seed=seed + i)
        selected.append(history.selected_epoch)
        model.eval()
        row_val, row_test, row_routes = [], [], []
        with torch.no_grad():
            for j in range(len(instructions)):
                row_test.append(mse(model, "test", j).item())
                row_val.append(mse(model, "val", j).item())  # last: the routes below are the val split's
                row_routes.append(_routes(model))
        val_mse.append(row_val)
        test_mse.append(row_test)
        snapshots.append(row_routes)
        if row_routes[0] is not None:
            usage.append([atom_usage(r) for r in row_routes])
            drift.append(None if i == 0 else [route_drift(snapshots[i - 1][j], r) for j, r in enumerate(row_routes)])
    routed = bool(usage)
    return ContinualResult(method, dict(knobs), [m.name for m in spec.members], instructions, seed, val_mse,
                           test_mse, forgetting(val_mse), usage if routed else None,
                           drift if routed else None, selected)
