"""Multi-task synthetic regression with instructions that carry information.

The paper's instruction channel (``tau_lang``, ``lambda_ctx``) only matters when
the instruction tells the model something its input does not. The single
synthetic tasks have no instruction at all; here several target surfaces are
trained together **on the same inputs**, so ``x`` alone cannot say which one an
example belongs to, and each example's instruction names its surface in words
(``"Fit the Levy surface shifted right by 0.5."``). The instruction is encoded
by the frozen sentence encoder of the queryable adapter (all-MiniLM-L6-v2,
offline); methods without an instruction channel see ``x`` only, and can at
best fit the members' mean. That asymmetry is the point of the task, not a
flaw of the comparison: it measures what the instruction channel can buy.

**Members.** A member is one of the nine functions (``synthetic.py``) under its
seeded target shift (coefficients, rotation, output affine map: as the single
tasks), then moved by ``(dx, dy)`` in the normalised input coordinates: the
member's value at ``u`` is the shifted target's at ``u - (dx, dy)`` (so "right
by 0.5" moves the surface towards +x1). Labels keep the function's source
standardisation and get the same N(0, 0.05²) noise.

**Backbone.** Pre-trained on the source of one function (``base``), exactly as
the single tasks pre-train theirs (and cached with them), so the adapters start
from a model that knows the base surface but none of the members.

**Splits.** Per member, ``train_n`` examples to adapt on, ``val_n`` to select the
epoch, ``test_n`` held out; fresh draws for each, deterministic under the seed.
The sizes are the single tasks' (320 / 80 adaptation samples per function) cut to
keep a trial at a few seconds on a CPU.

Example::

    >>> splits = make_multitask_splits("levy-shifts", seed=0)
    >>> x, y, task = splits.train            # 640×2, 640×1, 640 member indices
    >>> splits.instructions[task[0]]
    'Fit the Levy surface shifted right by 0.5.'
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qlsearch._registry import Registry
from qlsearch.tasks.synthetic import NOISE_STD, _generator, get_function, target_values

Triple = tuple[Tensor, Tensor, Tensor]  # x (n×2), y (n×1), member index (n)


def _title(function: str) -> str:
    return function.replace("_", "-").title()


@dataclass(frozen=True)
class Member:
    """One target surface of a multi-task: ``function``'s target moved by ``(dx, dy)``."""

    function: str
    dx: float = 0.0
    dy: float = 0.0

    @property
    def name(self) -> str:
        moves = [f"{axis}{value:+g}" for axis, value in (("x", self.dx), ("y", self.dy)) if value]
        return "-".join([self.function, *moves])

    @property
    def instruction(self) -> str:
        """The member in words: which surface, which way it is shifted and how far."""
        moves = [f"{word} by {abs(value):g}" for value, word in
                 ((self.dx, "right" if self.dx > 0 else "left"), (self.dy, "up" if self.dy > 0 else "down"))
                 if value]
        where = f" shifted {' and '.join(moves)}" if moves else ", not shifted"
        return f"Fit the {_title(self.function)} surface{where}."

    def values(self, u: Tensor, seed: int) -> Tensor:
        """Noise-free standardised target at normalised inputs ``u`` (n×2, float64)."""
        move = torch.tensor([self.dx, self.dy], dtype=u.dtype)
        return target_values(self.function, u - move, seed)


@dataclass(frozen=True)
class MultiTask:
    """Members trained together on one backbone pre-trained on ``base``'s source."""

    base: str
    members: tuple[Member, ...]
    summary: str = ""

    def __post_init__(self) -> None:
        for name in (self.base, *(m.function for m in self.members)):
            get_function(name)  # a miss names the allowed functions
        if len(self.members) < 2:
            raise ValueError(f"members: got {len(self.members)}; allowed: at least two")
        if len({m.instruction for m in self.members}) != len(self.members):
            raise ValueError("members: two members have the same instruction; allowed: distinct members")


_HALF = 0.5
MULTITASKS: dict[str, MultiTask] = {
    # Four copies of one surface, moved apart: the instruction is the only way to tell them apart.
    "levy-shifts": MultiTask("levy", (Member("levy", _HALF, 0), Member("levy", -_HALF, 0),
                                      Member("levy", 0, _HALF), Member("levy", 0, -_HALF)),
                             "Levy moved right, left, up and down by 0.5, trained together"),
    # Three different surfaces on one Levy-pre-trained backbone (the continual-routing stream).
    "levy-rastrigin-ackley": MultiTask("levy", (Member("levy"), Member("rastrigin"), Member("ackley")),
                                       "Levy, Rastrigin and Ackley targets, trained together or in sequence"),
}

#: The built-ins, a ``MultiTask`` named ``module:attribute``, or an entry point of ``qlsearch.multitasks``.
MULTITASK_REGISTRY: Registry[MultiTask] = Registry("multi-task", "multitask", "qlsearch.multitasks",
                                                   MultiTask, MULTITASKS)


def get_multitask(name: str) -> MultiTask:
    """The multi-task ``name`` names; a miss names the allowed ones."""
    return MULTITASK_REGISTRY.get(name)


@dataclass(frozen=True)
class MultiTaskSplits:
    """Train, validation and test triples ``(x, y, member index)`` of one multi-task under one seed."""

    train: Triple
    val: Triple
    test: Triple
    members: tuple[Member, ...]
    seed: int

    @property
    def instructions(self) -> list[str]:
        return [m.instruction for m in self.members]


def member_sample(name: str, member: Member, n: int, seed: int, split: str) -> tuple[Tensor, Tensor]:
    """``n`` noisy samples of one member for ``split``: float32 ``x`` (n×2) and ``y`` (n×1)."""
    gen = _generator("multitask", name, member.name, split, seed)
    u = 2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1
    noise = NOISE_STD * torch.randn(n, generator=gen, dtype=torch.float64)
    return u.float(), (member.values(u, seed) + noise).float().unsqueeze(-1)


def make_multitask_splits(name: str, seed: int, train_n: int = 160, val_n: int = 40,
                          test_n: int = 200) -> MultiTaskSplits:
    """Every member's samples, concatenated per split (members in order)."""
    spec = get_multitask(name)
    for field, value in (("train_n", train_n), ("val_n", val_n), ("test_n", test_n)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{field}: got {value!r}; allowed: an integer >= 1")
    splits = {}
    for split, n in (("train", train_n), ("val", val_n), ("test", test_n)):
        parts = [member_sample(name, m, n, seed, split) for m in spec.members]
        splits[split] = (torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts]),
                         torch.arange(len(parts)).repeat_interleave(n))
    return MultiTaskSplits(**splits, members=spec.members, seed=seed)
