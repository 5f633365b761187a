"""The synthetic source → target tasks (paper §4.1, §B.3)."""

from __future__ import annotations

import math

import pytest
import torch

from qlsearch.tasks import FUNCTIONS, make_splits, sample, target_shift
from qlsearch.tasks import synthetic as syn


def _at(fn, x1: float, x2: float, **coefficients) -> float:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return fn(t(x1), t(x2), **coefficients).item()


@pytest.mark.parametrize(
    ("fn", "point", "value"),
    [
        (syn.ackley, (0.0, 0.0), 0.0),
        (syn.rastrigin, (0.0, 0.0), 0.0),
        (syn.matyas, (0.0, 0.0), 0.0),
        (syn.levy, (1.0, 1.0), 0.0),
        (syn.dropwave, (0.0, 0.0), -1.0),
        (syn.michalewicz, (2.20290552, 1.57079633), -1.8013),
        (syn.styblinski_tang, (-2.903534, -2.903534), -78.33233),
        (syn.sin_cos, (-math.pi / 2, 0.0), -1.0),
        # VLSE's Langermann sign: the literature's optimum (2.00299219, 1.006096), |f| = 5.1621.
        (syn.langermann, (2.00299219, 1.006096), 5.1621259),
    ],
)
def test_known_values(fn, point, value):
    assert _at(fn, *point) == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_finite_on_domain(name):
    spec = FUNCTIONS[name]
    axis = torch.linspace(-1, 1, 101, dtype=torch.float64)
    y = spec.fn(*spec.to_raw(torch.cartesian_prod(axis, axis)).unbind(-1))
    assert y.shape == (101 * 101,)
    assert torch.isfinite(y).all()
    mean, std = spec.y_stats()
    assert math.isfinite(mean) and std > 0


def test_registry_entries_name_real_coefficients():
    for spec in FUNCTIONS.values():
        assert spec.shifted and set(spec.coefficients) == set(spec.shifted)
        low, high = zip(*spec.domain, strict=True)
        assert all(lo < hi for lo, hi in zip(low, high, strict=True))


def test_unknown_function_names_the_allowed_ones():
    with pytest.raises(ValueError, match="ackley.*styblinski_tang"):
        sample("rosenbrock", 10, seed=0, domain_shift=False)


def test_samples_are_normalised_float32():
    x, y = sample("styblinski_tang", 2000, seed=0, domain_shift=False)
    assert x.dtype == y.dtype == torch.float32
    assert x.shape == (2000, 2) and y.shape == (2000, 1)
    assert x.min() >= -1 and x.max() <= 1
    assert abs(y.mean().item()) < 0.1 and abs(y.std().item() - 1) < 0.1


@pytest.mark.parametrize("name", ["ackley", "langermann", "michalewicz"])
def test_target_differs_from_source_deterministically(name):
    shift = target_shift(name, seed=3)
    assert shift == target_shift(name, seed=3)
    assert shift != target_shift(name, seed=4)
    assert shift.coefficients != FUNCTIONS[name].coefficients
    assert shift.angle != 0 and shift.scale != 1
    xs, ys = sample(name, 500, seed=3, domain_shift=False)
    xt, yt = sample(name, 500, seed=3, domain_shift=True)
    assert torch.equal(yt, sample(name, 500, seed=3, domain_shift=True)[1])
    assert not torch.equal(xs, xt)  # independent draws


def test_target_function_differs_at_the_same_inputs():
    # Same points through the source and the shifted function: only the shift differs.
    spec, shift = FUNCTIONS["dropwave"], target_shift("dropwave", seed=0)
    u = torch.rand(256, 2, dtype=torch.float64) * 2 - 1
    source = spec.fn(*spec.to_raw(u).unbind(-1))
    target = spec.fn(*spec.to_raw(u).unbind(-1), **shift.coefficients)
    assert (source - target).abs().mean() > 1e-3


def test_label_noise_std_is_0_05():
    # Same seed → same inputs and noise stream, so noise = y - f(x) on the source.
    spec = FUNCTIONS["matyas"]
    x, y = sample("matyas", 20_000, seed=1, domain_shift=False)
    mean, std = spec.y_stats()
    clean = (spec.fn(*spec.to_raw(x.double()).unbind(-1)) - mean) / std
    assert (y.squeeze(-1).double() - clean).std().item() == pytest.approx(0.05, rel=0.05)


def test_splits_have_the_paper_sizes_and_are_deterministic():
    splits = make_splits("levy", seed=7)
    sizes = [len(x) for x, _ in (splits.source_train, splits.source_test,
                                 splits.target_train, splits.target_val, splits.target_test)]
    assert sizes == [2400, 600, 320, 80, 800]  # validation: 20 % of the paper's 400 training samples
    for x, y in (splits.source_train, splits.target_test):
        assert x.shape[1] == 2 and y.shape[1] == 1 and x.dtype == torch.float32
    again = make_splits("levy", seed=7)
    assert torch.equal(splits.target_train[1], again.target_train[1])
    assert torch.equal(splits.source_test[0], again.source_test[0])
    other = make_splits("levy", seed=8)
    assert not torch.equal(splits.source_train[0], other.source_train[0])


def test_validation_is_a_seeded_slice_of_the_training_samples_disjoint_from_test():
    splits = make_splits("levy", seed=3)
    rows = lambda pair: {tuple(r) for r in pair[0].tolist()}  # noqa: E731
    train, val, test = rows(splits.target_train), rows(splits.target_val), rows(splits.target_test)
    assert not (train & val) and not (val & test) and not (train & test)
    # together they are the paper's 400 adaptation samples (the first 400 target draws)
    assert train | val == rows((sample("levy", 1200, 3, domain_shift=True)[0][:400],))
    assert not torch.equal(splits.target_val[0], make_splits("levy", seed=4).target_val[0])
    with pytest.raises(ValueError, match="val_frac"):
        make_splits("levy", seed=0, val_frac=1.0)


def test_split_sizes_are_checked():
    small = make_splits("sin_cos", seed=0, source_n=100, source_train_frac=0.5, target_n=30, target_train_n=10)
    assert [len(small.source_train[0]), len(small.target_test[0])] == [50, 20]
    with pytest.raises(ValueError, match="target_train_n"):
        make_splits("sin_cos", seed=0, target_n=100, target_train_n=100)
    with pytest.raises(ValueError, match="source_train_frac"):
        make_splits("sin_cos", seed=0, source_train_frac=1.0)
