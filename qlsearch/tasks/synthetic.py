"""The paper's synthetic source → target regression tasks (§4.1, §B.3).

Nine two-dimensional non-convex functions, written from Surjanovic & Bingham's
Virtual Library of Simulation Experiments (VLSE) with its standard domains and
constants; Sin-Cos is not in that library and is defined here.

**Source.** ``f(x; θ)`` with the library's coefficients ``θ``.

**Target** (seeded by ``seed``, independent of the sample seed streams). Every
function is shifted the same three ways; only *which* coefficients form ``θ``
differs, and each registry entry lists them (``FunctionSpec.shifted``):

1. each listed coefficient is scaled by ``1 + N(0, 0.1²)`` (element-wise for
   vectors, e.g. Langermann's amplitudes ``c``);
2. the input is rotated by an angle ``φ ~ N(0, 0.1²)`` rad (≈ 6°) about the
   centre of the domain box (in the normalised coordinates below);
3. the standardised output is rescaled affinely, ``y ↦ s·y + b`` with
   ``s ~ 1 + N(0, 0.1²)`` and ``b ~ N(0, 0.1²)``.

Per function, the coefficients of step 1 (the "coefficients on the non-linear
terms" of the paper; constants not listed stay fixed):

=================  ==================  ==========================================
function           domain              shifted coefficients (source value)
=================  ==================  ==========================================
ackley             [-32.768, 32.768]²  a=20 (depth), b=0.2 (decay), c=2π (frequency)
dropwave           [-5.12, 5.12]²      w=12 (frequency), q=0.5 (quadratic damping)
langermann         [0, 10]²            c=(1,2,5,2,3) (amplitudes), w=π (frequency)
levy               [-10, 10]²          k=π (frequency), amp=10, k_last=2π (last frequency)
matyas             [-10, 10]²          a=0.26 (x1²+x2²), b=0.48 (x1·x2)
michalewicz        [0, π]²             m=10 (steepness), k=1/π (frequency)
rastrigin          [-5.12, 5.12]²      a=10 (amplitude), w=2π (frequency)
sin_cos            [-π, π]²            w1=1, w2=1 (frequencies)
styblinski_tang    [-5, 5]²            q=1 (x⁴), s=16 (x²)
=================  ==================  ==========================================

**Normalisation.** The backbone sees O(1) numbers: inputs are returned in
``[-1, 1]²`` (the domain box mapped affinely), and labels are standardised with
the *source* function's statistics (mean and standard deviation of ``f`` on a
201×201 grid of the box, ``FunctionSpec.y_stats()``), for the target too, so the
shift stays visible. The Gaussian label noise (std 0.05) is added on that
standardised scale, so every function has the same noise floor (MSE 0.0025).
Raw-scale MSE = standardised MSE × ``y_std²``.

Example::

    >>> splits = make_splits("ackley", seed=0)
    >>> x, y = splits.target_train          # float32, 320×2 and 320×1
    >>> x, y = splits.target_val            # 80 of the paper's 400 training samples, held out
"""

from __future__ import annotations

import functools
import inspect
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qlsearch._registry import Registry

NOISE_STD = 0.05
SHIFT_STD = 0.1  # relative coefficient perturbation, rotation (rad), output scale and offset

Pair = tuple[Tensor, Tensor]


# ---- the functions (x1, x2: float64 tensors; coefficients as keyword defaults) ----------


def ackley(x1: Tensor, x2: Tensor, a: float = 20.0, b: float = 0.2, c: float = 2 * math.pi) -> Tensor:
    """Ackley: ``-a·exp(-b·sqrt(mean x²)) - exp(mean cos(c·x)) + a + e``; minimum 0 at 0."""
    radius = torch.sqrt((x1**2 + x2**2) / 2)
    waves = (torch.cos(c * x1) + torch.cos(c * x2)) / 2
    return -a * torch.exp(-b * radius) - torch.exp(waves) + a + math.e


def dropwave(x1: Tensor, x2: Tensor, w: float = 12.0, q: float = 0.5) -> Tensor:
    """Drop-Wave: ``-(1 + cos(w·|x|)) / (q·|x|² + 2)``; minimum -1 at 0."""
    r2 = x1**2 + x2**2
    return -(1 + torch.cos(w * torch.sqrt(r2))) / (q * r2 + 2)


_LANGERMANN_A = ((3.0, 5.0), (5.0, 2.0), (2.0, 1.0), (1.0, 4.0), (7.0, 9.0))


def langermann(x1: Tensor, x2: Tensor, c: tuple[float, ...] = (1.0, 2.0, 5.0, 2.0, 3.0),
               w: float = math.pi) -> Tensor:
    """Langermann (VLSE sign): ``Σ_i c_i·exp(-d_i/π)·cos(w·d_i)``, ``d_i = |x - A_i|²``.

    The centres ``A`` (5×2) and the decay ``1/π`` stay fixed.
    """
    centres = torch.tensor(_LANGERMANN_A, dtype=x1.dtype, device=x1.device)
    amplitudes = torch.as_tensor(c, dtype=x1.dtype, device=x1.device)
    d = (x1[..., None] - centres[:, 0]) ** 2 + (x2[..., None] - centres[:, 1]) ** 2
    return (amplitudes * torch.exp(-d / math.pi) * torch.cos(w * d)).sum(-1)


def levy(x1: Tensor, x2: Tensor, k: float = math.pi, amp: float = 10.0,
         k_last: float = 2 * math.pi) -> Tensor:
    """Levy, ``w_i = 1 + (x_i - 1)/4``:
    ``sin²(k·w1) + (w1-1)²·(1 + amp·sin²(k·w1 + 1)) + (w2-1)²·(1 + sin²(k_last·w2))``;
    minimum 0 at (1, 1)."""
    w1, w2 = 1 + (x1 - 1) / 4, 1 + (x2 - 1) / 4
    return (torch.sin(k * w1) ** 2
            + (w1 - 1) ** 2 * (1 + amp * torch.sin(k * w1 + 1) ** 2)
            + (w2 - 1) ** 2 * (1 + torch.sin(k_last * w2) ** 2))


def matyas(x1: Tensor, x2: Tensor, a: float = 0.26, b: float = 0.48) -> Tensor:
    """Matyas: ``a·(x1² + x2²) - b·x1·x2``; minimum 0 at 0."""
    return a * (x1**2 + x2**2) - b * x1 * x2


def michalewicz(x1: Tensor, x2: Tensor, m: float = 10.0, k: float = 1 / math.pi) -> Tensor:
    """Michalewicz: ``-Σ_i sin(x_i)·sin(k·i·x_i²)^(2m)``; minimum ≈ -1.8013 at (2.20, 1.57)."""
    return -(torch.sin(x1) * (torch.sin(k * x1**2) ** 2) ** m
             + torch.sin(x2) * (torch.sin(2 * k * x2**2) ** 2) ** m)


def rastrigin(x1: Tensor, x2: Tensor, a: float = 10.0, w: float = 2 * math.pi) -> Tensor:
    """Rastrigin: ``2a + Σ_i (x_i² - a·cos(w·x_i))``; minimum 0 at 0."""
    return 2 * a + x1**2 - a * torch.cos(w * x1) + x2**2 - a * torch.cos(w * x2)


def sin_cos(x1: Tensor, x2: Tensor, w1: float = 1.0, w2: float = 1.0) -> Tensor:
    """Sin-Cos (defined here, not in VLSE): ``sin(w1·x1)·cos(w2·x2)`` on [-π, π]²;
    minimum -1 at (-π/2, 0), maximum 1 at (π/2, 0)."""
    return torch.sin(w1 * x1) * torch.cos(w2 * x2)


def styblinski_tang(x1: Tensor, x2: Tensor, q: float = 1.0, s: float = 16.0) -> Tensor:
    """Styblinski-Tang: ``½·Σ_i (q·x_i⁴ - s·x_i² + 5·x_i)``; minimum ≈ -39.166 per
    coordinate (-78.332 in 2-D) at x_i = -2.903534."""
    return 0.5 * (q * x1**4 - s * x1**2 + 5 * x1 + q * x2**4 - s * x2**2 + 5 * x2)


# ---- the registry -------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    """A synthetic function: ``fn(x1, x2, **coefficients)``, its domain box
    ``((low1, high1), (low2, high2))`` and the names of the coefficients the target
    shift perturbs (their source values are ``fn``'s keyword defaults)."""

    fn: Callable[..., Tensor]
    domain: tuple[tuple[float, float], tuple[float, float]]
    shifted: tuple[str, ...]

    @property
    def coefficients(self) -> dict[str, float | tuple[float, ...]]:
        """Source values of the shifted coefficients."""
        params = inspect.signature(self.fn).parameters
        return {name: params[name].default for name in self.shifted}

    def to_raw(self, u: Tensor) -> Tensor:
        """Map normalised inputs ``u ∈ [-1, 1]²`` (n×2) onto the domain box."""
        low, high = torch.tensor(self.domain, dtype=u.dtype, device=u.device).T
        return (low + high) / 2 + (high - low) / 2 * u

    def y_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the source ``f`` on a 201×201 grid of the box."""
        return _grid_stats(self)


def _square(low: float, high: float) -> tuple[tuple[float, float], tuple[float, float]]:
    return ((low, high), (low, high))


FUNCTIONS: dict[str, FunctionSpec] = {
    "ackley": FunctionSpec(ackley, _square(-32.768, 32.768), ("a", "b", "c")),
    "dropwave": FunctionSpec(dropwave, _square(-5.12, 5.12), ("w", "q")),
    "langermann": FunctionSpec(langermann, _square(0.0, 10.0), ("c", "w")),
    "levy": FunctionSpec(levy, _square(-10.0, 10.0), ("k", "amp", "k_last")),
    "matyas": FunctionSpec(matyas, _square(-10.0, 10.0), ("a", "b")),
    "michalewicz": FunctionSpec(michalewicz, _square(0.0, math.pi), ("m", "k")),
    "rastrigin": FunctionSpec(rastrigin, _square(-5.12, 5.12), ("a", "w")),
    "sin_cos": FunctionSpec(sin_cos, _square(-math.pi, math.pi), ("w1", "w2")),
    "styblinski_tang": FunctionSpec(styblinski_tang, _square(-5.0, 5.0), ("q", "s")),
}


#: The built-ins, a ``FunctionSpec`` named ``module:attribute``, or an entry point of
#: ``qlsearch.functions``: a user's function gets the same shift, splits and backbone cache.
FUNCTION_REGISTRY: Registry[FunctionSpec] = Registry("function", "function", "qlsearch.functions",
                                                     FunctionSpec, FUNCTIONS)


def get_function(name: str) -> FunctionSpec:
    """The function ``name`` names; a miss names the allowed functions."""
    return FUNCTION_REGISTRY.get(name)


@functools.cache
def _grid_stats(spec: FunctionSpec) -> tuple[float, float]:
    axis = torch.linspace(-1, 1, 201, dtype=torch.float64)
    u = torch.cartesian_prod(axis, axis)
    y = spec.fn(*spec.to_raw(u).unbind(-1))
    return y.mean().item(), y.std().item()


# ---- the shift and the samples ------------------------------------------------------


def _generator(*key: object) -> torch.Generator:
    """A CPU generator seeded from a stable hash of ``key`` (Python's ``hash`` is salted)."""
    return torch.Generator().manual_seed(zlib.crc32("/".join(map(str, key)).encode()))


@dataclass(frozen=True)
class TargetShift:
    """The seeded source → target shift of one function (see the module docstring)."""

    coefficients: dict[str, float | tuple[float, ...]]
    angle: float  # radians, about the box centre, in normalised coordinates
    scale: float  # on the standardised output
    offset: float


def target_shift(function: str, seed: int) -> TargetShift:
    """The target's coefficients, rotation and output affine map under ``seed``."""
    spec = get_function(function)
    gen = _generator(function, "shift", seed)
    coefficients: dict[str, float | tuple[float, ...]] = {}
    for name, value in spec.coefficients.items():
        source = torch.as_tensor(value, dtype=torch.float64)
        factor = 1 + SHIFT_STD * torch.randn(source.shape, generator=gen, dtype=torch.float64)
        shifted = source * factor
        coefficients[name] = tuple(shifted.tolist()) if shifted.ndim else shifted.item()
    angle, scale, offset = (SHIFT_STD * torch.randn(3, generator=gen, dtype=torch.float64)).tolist()
    return TargetShift(coefficients, angle, 1 + scale, offset)


def sample(function: str, n: int, seed: int, domain_shift: bool) -> Pair:
    """``n`` noisy samples ``(x, y)`` (float32, n×2 and n×1) of the source function, or of
    its target version under ``target_shift(function, seed)`` when ``domain_shift``.

    ``x`` is uniform over the domain box, returned in normalised coordinates ``[-1, 1]²``;
    ``y`` is standardised with the source statistics, plus N(0, 0.05²) noise.
    """
    get_function(function)  # an unknown name is named before anything else
    if not (isinstance(n, int) and n >= 1):
        raise ValueError(f"n: got {n!r}; allowed: an integer >= 1")
    gen = _generator(function, "target" if domain_shift else "source", seed)
    u = 2 * torch.rand(n, 2, generator=gen, dtype=torch.float64) - 1
    noise = NOISE_STD * torch.randn(n, generator=gen, dtype=torch.float64)
    y = target_values(function, u, seed) if domain_shift else source_values(function, u)
    return u.float(), (y + noise).float().unsqueeze(-1)


def source_values(function: str, u: Tensor) -> Tensor:
    """The source function at normalised inputs ``u`` (n×2), standardised, without noise."""
    spec = get_function(function)
    mean, std = spec.y_stats()
    return (spec.fn(*spec.to_raw(u).unbind(-1)) - mean) / std


def target_values(function: str, u: Tensor, seed: int) -> Tensor:
    """The target function under ``target_shift(function, seed)`` at normalised inputs ``u``
    (n×2, float64), standardised with the source statistics, without noise."""
    spec = get_function(function)
    mean, std = spec.y_stats()
    shift = target_shift(function, seed)
    cos, sin = math.cos(shift.angle), math.sin(shift.angle)
    rotation = torch.tensor([[cos, -sin], [sin, cos]], dtype=torch.float64)
    z = (spec.fn(*spec.to_raw(u @ rotation.T).unbind(-1), **shift.coefficients) - mean) / std
    return shift.scale * z + shift.offset


@dataclass(frozen=True)
class SyntheticSplits:
    """Source and target splits of one function under one seed; each an ``(x, y)`` pair."""

    source_train: Pair
    source_test: Pair
    target_train: Pair
    target_val: Pair  # a seeded slice of the paper's target training samples: selects epochs
    target_test: Pair
    function: str
    seed: int


def make_splits(function: str, seed: int, source_n: int = 3000, source_train_frac: float = 0.8,
                target_n: int = 1200, target_train_n: int = 400, val_frac: float = 0.2) -> SyntheticSplits:
    """The paper's splits (§B.3): 3,000 source samples, 80 % to pre-train on; 1,200 fresh
    target samples, 400 to adapt on and 800 held out for test. Deterministic under ``seed``.

    The paper selects on test; we hold out ``val_frac`` of the 400 adaptation samples
    (a seeded random subset, 80 by default) as the validation split that selects the
    epoch, so the adapters train on the other 320 and the 800 test samples stay unseen.
    """
    if not 0 < val_frac < 1:
        raise ValueError(f"val_frac: got {val_frac!r}; allowed: 0 < value < 1")
    if not 0 < source_train_frac < 1:
        raise ValueError(f"source_train_frac: got {source_train_frac!r}; allowed: 0 < value < 1")
    n_train = round(source_n * source_train_frac)
    if not 1 <= n_train < source_n:
        raise ValueError(f"source_n: got {source_n!r}; too few samples for both source splits")
    if not (isinstance(target_train_n, int) and 1 <= target_train_n < target_n):
        raise ValueError(f"target_train_n: got {target_train_n!r}; allowed: 1 to target_n - 1 ({target_n - 1})")
    # Samples are i.i.d., so contiguous slices are random splits.
    xs, ys = sample(function, source_n, seed, domain_shift=False)
    xt, yt = sample(function, target_n, seed, domain_shift=True)
    order = torch.randperm(target_train_n, generator=_generator(function, "validation", seed))
    n_val = max(1, round(val_frac * target_train_n))
    if n_val >= target_train_n:
        raise ValueError(f"target_train_n: got {target_train_n!r}; too few samples for train and validation")
    train, val = order[n_val:], order[:n_val]
    return SyntheticSplits(
        source_train=(xs[:n_train], ys[:n_train]),
        source_test=(xs[n_train:], ys[n_train:]),
        target_train=(xt[train], yt[train]),
        target_val=(xt[val], yt[val]),
        target_test=(xt[target_train_n:], yt[target_train_n:]),
        function=function,
        seed=seed,
    )
