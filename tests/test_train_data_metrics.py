"""Embedded data (exact densities, determinism) and the quality metrics against closed forms."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowkern.data import DATASET_NAMES, get_dataset
from flowkern.metrics import histogram_kl, projections, sliced_wasserstein2


def test_checkerboard_support_and_density():
    d = get_dataset("checkerboard")
    x = d.sample(40_000, torch.Generator().manual_seed(0))
    cell = torch.floor((x + 4) / 2).long()
    assert bool(((x > -4) & (x < 4)).all()) and bool((cell.sum(-1) % 2 == 0).all())
    counts = torch.bincount(cell[:, 0] * 4 + cell[:, 1], minlength=16).float()
    black = counts[counts > 0]
    assert len(black) == 8 and float((black / 5000 - 1).abs().max()) < 0.05    # uniform over the 8 squares
    assert -d.log_prob(x).mean().item() == pytest.approx(math.log(32), abs=1e-6)  # 3.4657 nats
    assert -d.log_prob(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(3.4657, abs=1e-4)
    assert d.log_prob(torch.tensor([[1.0, -0.5], [4.5, 0.0]])).tolist() == [-math.inf, -math.inf]  # white; outside


def test_eight_gaussians_density_integrates_to_one():
    d = get_dataset("8gaussians")
    g = torch.linspace(-5, 5, 801, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    mass = d.log_prob(grid).double().exp().sum().item() * (10 / 800) ** 2
    assert mass == pytest.approx(1.0, abs=2e-3)
    x = d.sample(20_000, torch.Generator().manual_seed(1))
    nearest = torch.cdist(x, d.centers()).argmin(-1)
    spread = (x - d.centers()[nearest]).std(0)
    torch.testing.assert_close(spread, torch.full((2,), d.std), atol=0.01, rtol=0)


@pytest.mark.parametrize("name", [n for n in DATASET_NAMES if n != "digits"])
def test_sampling_is_deterministic(name):
    d = get_dataset(name)
    a = d.sample(100, torch.Generator().manual_seed(3))
    b = d.sample(100, torch.Generator().manual_seed(3))
    c = d.sample(100, torch.Generator().manual_seed(4))
    assert a.shape == (100, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(d.held_out(100), d.sample(100, torch.Generator().manual_seed(0)))


def test_digits():
    pytest.importorskip("sklearn")
    d = get_dataset("digits")
    x = d.sample(500, torch.Generator().manual_seed(0))
    assert x.shape == (500, 64) and x.min().item() == -1.0 and x.max().item() == 1.0
    held = d.held_out()
    assert held.shape == (297, 64)
    train = d.images[:1500]
    assert not bool((torch.cdist(held, train).min(1).values == 0).all())        # a disjoint split (by index)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; known datasets: checkerboard"):
        get_dataset("mnist")


def test_sw2_closed_forms():
    x = torch.randn(5000, 3, generator=torch.Generator().manual_seed(0))
    assert sliced_wasserstein2(x, x) == 0.0
    c = torch.tensor([1.0, -2.0, 0.5])
    theta = projections(3, 256, 0)
    expected = math.sqrt(((theta @ c.double()) ** 2).mean().item())      # every slice moves by θ·c
    assert sliced_wasserstein2(x, x + c) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(c.norm().item() / math.sqrt(3), rel=0.1)   # E(θ·c)² = |c|²/d
    # N(0, I) vs N(0, 4I): every slice is N(0, 1) vs N(0, 4), W2 = |1 − 2| = 1
    y = 2 * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1))
    z = torch.randn(10_000, 2, generator=torch.Generator().manual_seed(2))   # unequal sizes: quantile path
    assert sliced_wasserstein2(z, y) == pytest.approx(1.0, abs=0.04)
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein2(x, y)


def test_histogram_kl_closed_form():
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0))
    assert histogram_kl(x, x) == 0.0
    # points at bin centres of a 2-bin grid on [0, 2]²: P puts 3/4 in bin (0,0), 1/4 in (1,1); Q 1/4 and 3/4
    p = torch.tensor([[0.5, 0.5]] * 300 + [[1.5, 1.5]] * 100)
    q = torch.tensor([[0.5, 0.5]] * 100 + [[1.5, 1.5]] * 300)
    eps = 1e-9
    expected = 0.75 * math.log(3) + 0.25 * math.log(1 / 3)
    assert histogram_kl(p, q, low=0, high=2, bins=2, eps=eps) == pytest.approx(expected, rel=1e-6)
    # D ≠ 2: the mean of per-coordinate 1-D KLs
    p3, q3 = torch.cat([p, p[:, :1]], 1), torch.cat([q, p[:, :1]], 1)
    assert histogram_kl(p3, q3, low=0, high=2, bins=2, eps=eps) == pytest.approx(2 * expected / 3, rel=1e-6)
    # mass off the grid counts: Q with half of it outside
    q_out = torch.cat([p, torch.full((400, 2), 10.0)])
    assert histogram_kl(p, q_out, low=0, high=2, bins=2, eps=eps) == pytest.approx(math.log(2), rel=1e-6)
    with pytest.raises(ValueError, match="high"):
        histogram_kl(p, q, low=1, high=0)


def test_metrics_agree_with_numpy_sorting():
    """SW2 for equal sizes = mean over the fixed directions of the sorted-projection squared differences."""
    x = np.random.default_rng(0).normal(size=(300, 2))
    y = np.random.default_rng(1).normal(size=(300, 2)) * 1.5 + 0.3
    theta = projections(2, 64, 7).numpy()
    expected = np.sqrt(np.mean((np.sort(x @ theta.T, 0) - np.sort(y @ theta.T, 0)) ** 2))
    got = sliced_wasserstein2(torch.from_numpy(x), torch.from_numpy(y), projections_count=64, seed=7)
    assert got == pytest.approx(expected, rel=1e-10)


def test_data_std():
    """σ_data for the EDM preconditioning: checkerboard on [−4, 4]² is uniform over its squares (variance 16/3)."""
    assert get_dataset("checkerboard").data_std() == pytest.approx(math.sqrt(16 / 3), rel=0.02)
    assert get_dataset("moons").data_std() == get_dataset("moons").data_std()   # a fixed draw
